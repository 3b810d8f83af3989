"""Sparse4D: ResNet + FPN image features, auxiliary dense depth, grid mask, Sparse4Dv3 head."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from mmdet.models.backbones import ResNet
from mmdet.models.necks import FPN

from model.blocks import DenseDepthNet, GridMask
from model.head import Sparse4DHead
from model.losses import SigmoidFocalLoss
from model.target import SparseBox3DTarget

FIX_SCALE = ((0, 0, 0), (0.45, 0, 0), (-0.45, 0, 0), (0, 0.45, 0), (0, -0.45, 0), (0, 0, 0.45), (0, 0, -0.45))
RESNET_CHANNELS = {
    18: [64, 128, 256, 512],
    34: [64, 128, 256, 512],
    50: [256, 512, 1024, 2048],
    101: [256, 512, 1024, 2048],
}


class Sparse4D(nn.Module):
    def __init__(
        self,
        img_backbone: nn.Module,
        img_neck: nn.Module,
        head: Sparse4DHead,
        depth_branch: DenseDepthNet | None,
        use_grid_mask: bool,
    ):
        super().__init__()
        self.img_backbone = img_backbone
        self.img_neck = img_neck
        self.head = head
        self.depth_branch = depth_branch
        self.use_grid_mask = use_grid_mask
        self.grid_mask = GridMask(True, True, rotate=1, ratio=0.5, mode=1, prob=0.7)
        self.channels_last = False
        self.amp_dtype: torch.dtype | None = None

    def set_mixed_precision(self, dtype: torch.dtype | None) -> Sparse4D:
        """Run the image features (grid mask, backbone, neck, depth net) under autocast in `dtype`
        (torch.float16 / torch.bfloat16; None: fp32), as the reference's `auto_fp16` on
        `extract_feat` with `out_fp32=True`: the features leave in fp32, and the head (anchor
        encoder, attention, key points, aggregation, refinement, instance bank) and the losses
        always run in fp32."""
        self.amp_dtype = dtype
        return self

    def use_channels_last(self) -> Sparse4D:
        """NHWC convolutions in the backbone and neck (about 20 % faster on CPU with oneDNN); the
        maths and the state-dict are unchanged. The training and evaluation stages call it on CPU."""
        self.channels_last = True
        self.img_backbone.to(memory_format=torch.channels_last)
        self.img_neck.to(memory_format=torch.channels_last)
        return self

    def extract_feat(self, img: torch.Tensor, focal: torch.Tensor | None = None, return_depth: bool = False):
        """img (bs, cams, 3, H, W) -> levels of (bs, cams, C, H/s, W/s) [and dense depths]."""
        bs, num_cams = img.shape[:2]
        img = img.flatten(end_dim=1)
        # No autocast context at all in fp32: torch 2.1 (the Ascend port's) refuses a disabled CPU
        # autocast whose dtype is not bf16.
        autocast = (
            torch.autocast(device_type=img.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            if self.use_grid_mask:
                img = self.grid_mask(img)
            if self.channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            feature_maps = list(self.img_neck(self.img_backbone(img)))
            feature_maps = [f.reshape((bs, num_cams) + f.shape[1:]) for f in feature_maps]
            depths = None
            if return_depth and self.depth_branch is not None:
                depths = self.depth_branch(feature_maps, focal)
        if self.amp_dtype is not None:  # out_fp32
            feature_maps = [f.float() for f in feature_maps]
            depths = [d.float() for d in depths] if depths is not None else None
        return feature_maps, depths

    def forward_train(self, data: dict[str, Any]) -> dict[str, torch.Tensor]:
        feature_maps, depths = self.extract_feat(data["img"], data.get("focal"), return_depth=True)
        model_outs = self.head(feature_maps, data)
        losses = self.head.loss(model_outs, data)
        if depths is not None and "gt_depth" in data:
            losses["loss_dense_depth"] = self.depth_branch.loss(depths, data["gt_depth"])
        return losses

    @torch.no_grad()
    def forward_test(self, data: dict[str, Any]) -> list[dict]:
        feature_maps, _ = self.extract_feat(data["img"])
        return self.head.post_process(self.head(feature_maps, data))

    def forward(self, data: dict[str, Any]):
        return self.forward_train(data) if self.training else self.forward_test(data)

    def load_backbone_weights(self, path: str | os.PathLike) -> list[str]:
        """Load ImageNet weights (torchvision's ResNet layout) into img_backbone.

        Every key must be consumed except the classifier (`fc.*`), which the detector has no use
        for; returns the names of those ignored keys. Raises with the missing/unexpected names.
        """
        state = torch.load(path, map_location="cpu")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        ignored = sorted(k for k in state if k.startswith("fc."))
        result = self.img_backbone.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False
        )
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{path}: backbone weights do not fit: missing {missing[:10]}, unexpected {result.unexpected_keys[:10]}"
            )
        return ignored


def build_model(cfg: dict[str, Any], anchor: np.ndarray) -> Sparse4D:
    """The detector from a complete `model` section of a params file (pipeline.settings.SCHEMA
    checks every key before any stage calls this): each setting is read here and passed on, and
    no module under model/ has a default of its own for it.

    anchor: (num_anchor, 11) anchors: the anchors stage's, or a checkpoint's own.
    """
    depth, embed_dims, num_levels = int(cfg["depth"]), int(cfg["embed_dims"]), int(cfg["num_levels"])
    classes = list(cfg["classes"])
    loss, matching = cfg["loss"], cfg["matching"]
    backbone = ResNet(
        depth=depth,
        num_stages=4,
        out_indices=tuple(range(num_levels)),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch",
        with_cp=bool(cfg["with_cp"]),
    )
    neck = FPN(
        in_channels=RESNET_CHANNELS[depth][:num_levels],
        out_channels=embed_dims,
        num_outs=num_levels,
        start_level=0,
        add_extra_convs="on_output",
        relu_before_extra_convs=True,
    )
    target_assigner = SparseBox3DTarget(
        cls_weight=float(matching["cls_weight"]),
        box_weight=float(matching["box_weight"]),
        reg_weights=[float(w) for w in matching["reg_weights"]],
        cls_wise_reg_weights={classes.index("traffic_cone"): [float(w) for w in matching["cone_reg_weights"]]}
        if "traffic_cone" in classes
        else None,
        num_dn_groups=int(cfg["num_dn_groups"]),
        num_temp_dn_groups=int(cfg["num_temp_dn_groups"]),
        dn_noise_scale=[float(w) for w in matching["dn_noise_scale"]],
        max_dn_gt=int(cfg["max_dn_gt"]),
    )
    head = Sparse4DHead(
        anchor=anchor,
        num_classes=len(classes),
        embed_dims=embed_dims,
        num_groups=int(cfg["num_groups"]),
        num_levels=num_levels,
        num_cams=int(cfg["num_cams"]),
        num_decoder=int(cfg["num_decoder"]),
        num_single_frame_decoder=int(cfg["num_single_frame_decoder"]),
        num_temp_instances=int(cfg["num_temp_instances"]),
        confidence_decay=float(cfg["confidence_decay"]),
        dropout=float(cfg["dropout"]),
        attn_drop=float(cfg["attn_drop"]),
        num_learnable_pts=int(cfg["num_learnable_pts"]),
        fix_scale=FIX_SCALE,
        target_assigner=target_assigner,
        reg_weights=[float(w) for w in loss["reg_weights"]],
        cls_threshold_to_reg=float(loss["cls_threshold_to_reg"]),
        loss_cls=SigmoidFocalLoss(
            gamma=float(loss["focal_gamma"]), alpha=float(loss["focal_alpha"]), loss_weight=float(loss["cls_weight"])
        ),
        box_loss_weight=float(loss["box_weight"]),
        detach_centerness_target=bool(loss["detach_centerness_target"]),
        cls_allow_reverse=[classes.index("barrier")] if "barrier" in classes else None,
        num_output=int(cfg["num_output"]),
        correct_projected_yaw=bool(cfg["correct_projected_yaw"]),
        sort_cls_scores=bool(cfg["sort_cls_scores"]),
    )
    depth_layers = int(cfg["num_depth_layers"])
    depth_branch = (
        DenseDepthNet(embed_dims, depth_layers, loss_weight=float(cfg["depth_loss_weight"]))
        if depth_layers > 0
        else None
    )
    model = Sparse4D(backbone, neck, head, depth_branch, use_grid_mask=bool(cfg["use_grid_mask"]))
    model.head.init_weights()
    # mmcv logs every initialised parameter at INFO level; keep the logs readable.
    mmcv_logger = logging.getLogger("mmcv")
    level = mmcv_logger.level
    mmcv_logger.setLevel(logging.WARNING)
    try:
        backbone.init_weights()
        neck.init_weights()
    finally:
        mmcv_logger.setLevel(level)
    return model
