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
from pipeline.settings import CLASSES

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
        use_grid_mask: bool = True,
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


# The reference's loss and matching weights (model.loss / model.matching in params.yaml); per-dimension
# weights over the encoded box x, y, z, log l, log w, log h, sin yaw, cos yaw, vx, vy.
LOSS_DEFAULTS: dict[str, Any] = {
    "cls_weight": 2.0,
    "focal_gamma": 2.0,
    "focal_alpha": 0.25,
    "box_weight": 0.25,
    "reg_weights": [2.0] * 3 + [1.0] * 7,
    "cls_threshold_to_reg": 0.05,
    "detach_centerness_target": False,  # the reference; the Ascend port (the seed profiles): True
}
MATCHING_DEFAULTS: dict[str, Any] = {
    "cls_weight": 2.0,
    "box_weight": 0.25,
    "reg_weights": [2.0] * 3 + [0.5] * 3 + [0.0] * 4,
    "cone_reg_weights": [2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0],
    "dn_noise_scale": [2.0] * 3 + [0.5] * 7,
}


def build_model(cfg: dict[str, Any], anchor: np.ndarray | None = None) -> Sparse4D:
    """The detector from the `model` section of params.yaml.

    anchor: (num_anchor, 11) anchors; default: 900 rows of zeros (the full profile's shape, e.g. to
    load a checkpoint that carries its anchors).
    """
    depth = int(cfg.get("depth", 50))
    embed_dims = int(cfg.get("embed_dims", 256))
    num_levels = int(cfg.get("num_levels", 4))
    num_classes = len(cfg.get("classes", CLASSES))
    if anchor is None:
        anchor = np.zeros((900, 11), np.float32)
    backbone = ResNet(
        depth=depth,
        num_stages=4,
        out_indices=tuple(range(num_levels)),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch",
        with_cp=bool(cfg.get("with_cp", True)),
    )
    neck = FPN(
        in_channels=RESNET_CHANNELS[depth][:num_levels],
        out_channels=embed_dims,
        num_outs=num_levels,
        start_level=0,
        add_extra_convs="on_output",
        relu_before_extra_convs=True,
    )
    classes = list(cfg.get("classes", CLASSES))
    loss = {**LOSS_DEFAULTS, **cfg.get("loss", {})}
    matching = {**MATCHING_DEFAULTS, **cfg.get("matching", {})}
    target_assigner = SparseBox3DTarget(
        cls_weight=float(matching["cls_weight"]),
        box_weight=float(matching["box_weight"]),
        reg_weights=[float(w) for w in matching["reg_weights"]],
        cls_wise_reg_weights={classes.index("traffic_cone"): [float(w) for w in matching["cone_reg_weights"]]}
        if "traffic_cone" in classes
        else None,
        num_dn_groups=int(cfg.get("num_dn_groups", 5)),
        num_temp_dn_groups=int(cfg.get("num_temp_dn_groups", 3)),
        dn_noise_scale=[float(w) for w in matching["dn_noise_scale"]],
        max_dn_gt=int(cfg.get("max_dn_gt", 32)),
        add_neg_dn=True,
    )
    head = Sparse4DHead(
        anchor=anchor,
        num_classes=num_classes,
        embed_dims=embed_dims,
        num_groups=int(cfg.get("num_groups", 8)),
        num_levels=num_levels,
        num_cams=int(cfg.get("num_cams", 6)),
        num_decoder=int(cfg.get("num_decoder", 6)),
        num_single_frame_decoder=int(cfg.get("num_single_frame_decoder", 1)),
        num_temp_instances=int(cfg.get("num_temp_instances", 600)),
        confidence_decay=float(cfg.get("confidence_decay", 0.6)),
        dropout=float(cfg.get("dropout", 0.1)),
        attn_drop=float(cfg.get("attn_drop", 0.15)),
        num_learnable_pts=int(cfg.get("num_learnable_pts", 6)),
        fix_scale=FIX_SCALE,
        target_assigner=target_assigner,
        reg_weights=[float(w) for w in loss["reg_weights"]],
        cls_threshold_to_reg=float(loss["cls_threshold_to_reg"]),
        loss_cls=SigmoidFocalLoss(
            gamma=float(loss["focal_gamma"]), alpha=float(loss["focal_alpha"]), loss_weight=float(loss["cls_weight"])
        ),
        box_loss_weight=float(loss["box_weight"]),
        cls_allow_reverse=[classes.index("barrier")] if "barrier" in classes else None,
        num_output=int(cfg.get("num_output", 300)),
        correct_projected_yaw=bool(cfg.get("correct_projected_yaw", False)),
        sort_cls_scores=bool(cfg.get("sort_cls_scores", False)),
    )
    head.loss_reg.detach_centerness_target = bool(loss["detach_centerness_target"])
    depth_layers = int(cfg.get("num_depth_layers", 3))
    depth_branch = (
        DenseDepthNet(embed_dims, depth_layers, loss_weight=float(cfg.get("depth_loss_weight", 0.2)))
        if depth_layers > 0
        else None
    )
    model = Sparse4D(backbone, neck, head, depth_branch, use_grid_mask=bool(cfg.get("use_grid_mask", True)))
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
