"""The Sparse4Dv3 head: instance bank, decoders (temporal and spatial graph attention, deformable
aggregation, FFN, refinement), denoising, losses and post-processing.

Operation order (the reference's): the first decoder is single-frame —
    deformable, ffn, norm, refine
and each of the following ones is
    temp_gnn, gnn, norm, deformable, ffn, norm, refine
`self.layers` holds one module per operation in that order (so parameter names are
`layers.<index>...`, as in the released checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmdet.core import reduce_mean

from model.blocks import AsymmetricFFN, DeformableFeatureAggregation
from model.detection3d import AnchorEncoder, RefinementModule
from model.instance_bank import InstanceBank
from model.losses import SparseBox3DLoss, as_fp32
from model.ops import FlattenedFeatures
from model.post_process import BoxPostProcessor
from model.target import SparseBox3DTarget


def operation_order(num_decoder: int, num_single_frame_decoder: int, temporal: bool) -> list[str]:
    single = ["gnn", "norm", "deformable", "ffn", "norm", "refine"]
    multi = (["temp_gnn"] if temporal else []) + single
    return (single * num_single_frame_decoder + multi * (num_decoder - num_single_frame_decoder))[2:]


@dataclass
class Denoising:
    """A training frame's denoising queries, which follow the `num_free` free instances."""

    num_free: int
    reg_target: torch.Tensor  # (bs, num_dn, 10) encoded boxes
    cls_target: torch.Tensor  # (bs, num_dn): class, NEGATIVE_QUERY or NO_TARGET (model.target)
    valid_mask: torch.Tensor  # (bs, num_dn): not padding
    id_target: torch.Tensor | None  # (bs, num_dn) instance ids; None without temporal denoising
    # After the single-frame decoders with temporal denoising: (reg_target, cls_target, valid_mask)
    # of the queries with last frame's groups swapped in.
    temporal: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class Sparse4DHead(nn.Module):
    def __init__(
        self,
        anchor: np.ndarray,
        *,
        num_classes: int,
        embed_dims: int,
        num_groups: int,
        num_levels: int,
        num_cams: int,
        num_decoder: int,
        num_single_frame_decoder: int,
        num_temp_instances: int,
        confidence_decay: float,
        dropout: float,
        attn_drop: float,
        num_learnable_pts: int,
        fix_scale,
        target_assigner: SparseBox3DTarget,
        reg_weights: list[float],
        cls_threshold_to_reg: float,
        cls_allow_reverse: list[int] | None,
        loss_cls: nn.Module,
        box_loss_weight: float,
        detach_centerness_target: bool,
        num_output: int,
        correct_projected_yaw: bool,
        sort_cls_scores: bool,
    ):
        """Every argument is a setting of the `model` section, read by build_model."""
        super().__init__()
        self.num_decoder = num_decoder
        self.num_single_frame_decoder = num_single_frame_decoder
        self.cls_threshold_to_reg = cls_threshold_to_reg
        self.reg_weights = reg_weights
        self.embed_dims = embed_dims
        temporal = num_temp_instances > 0
        self.operation_order = operation_order(num_decoder, num_single_frame_decoder, temporal)
        self.instance_bank = InstanceBank(
            embed_dims,
            anchor,
            num_temp_instances=num_temp_instances,
            confidence_decay=confidence_decay,
            correct_projected_yaw=correct_projected_yaw,
        )
        self.anchor_encoder = AnchorEncoder([embed_dims // 2, embed_dims // 8, embed_dims // 8, embed_dims // 4])
        # Matching and denoising targets (the reference's `sampler`; it holds no parameters).
        self.target_assigner = target_assigner
        # Boxes out of the last decoder (the reference's `decoder`; it holds no parameters).
        self.post_processor = BoxPostProcessor(num_output=num_output, sort_cls_scores=sort_cls_scores)
        self.loss_cls = loss_cls
        self.loss_reg = SparseBox3DLoss(
            box_weight=box_loss_weight,
            cls_allow_reverse=cls_allow_reverse,
            detach_centerness_target=detach_centerness_target,
        )

        def build(op: str) -> nn.Module:
            if op in ("temp_gnn", "gnn"):
                return MultiheadAttention(
                    embed_dims * 2,
                    num_groups,
                    attn_drop=dropout,
                    dropout_layer=dict(type="Dropout", drop_prob=dropout),
                    batch_first=True,
                )
            if op == "norm":
                return nn.LayerNorm(embed_dims)
            if op == "ffn":
                return AsymmetricFFN(embed_dims * 2, embed_dims, embed_dims * 4, ffn_drop=dropout)
            if op == "deformable":
                return DeformableFeatureAggregation(
                    embed_dims,
                    num_groups,
                    num_levels,
                    num_cams,
                    attn_drop,
                    num_learnable_pts,
                    fix_scale,
                )
            return RefinementModule(embed_dims, num_classes)

        self.layers = nn.ModuleList(build(op) for op in self.operation_order)
        # Decoupled attention: queries and keys are [feature, anchor embedding] (2C wide).
        self.fc_before = nn.Linear(embed_dims, embed_dims * 2, bias=False)
        self.fc_after = nn.Linear(embed_dims * 2, embed_dims, bias=False)

    def init_weights(self) -> None:
        for op, layer in zip(self.operation_order, self.layers):
            if op != "refine":
                for p in layer.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)
        for m in self.modules():
            if hasattr(m, "init_weight"):
                m.init_weight()

    def graph_model(self, index: int, query, key=None, value=None, query_pos=None, key_pos=None, attn_mask=None):
        query = torch.cat([query, query_pos], dim=-1)
        if key is not None:
            key = torch.cat([key, key_pos], dim=-1)
        if value is not None:
            value = self.fc_before(value)
        return self.fc_after(self.layers[index](query, key, value, attn_mask=attn_mask))

    def forward(self, feature_maps: list[torch.Tensor], metas: dict) -> dict:
        """feature_maps: levels of (bs, cams, C, H, W); metas: projection_mat (bs, cams, 4, 4),
        image_wh (bs, cams, 2), timestamp (bs,), img_metas (per sample T_global, T_global_inv,
        and instance_id in training), gt_labels_3d / gt_bboxes_3d lists in training.

        Returns per decoder `prediction` (bs, n, 11), `classification` (bs, n, num_cls) and
        `quality` (bs, n, 2) of the n = num_anchor free instances; in training also the same for
        the denoising queries and their targets (`dn_*`, `temp_dn_*`); in evaluation the tracking
        `instance_id` (bs, n)."""
        bs = feature_maps[0].shape[0]
        # flattened once per frame for every decoder's aggregation, as the reference's extract_feat
        features = FlattenedFeatures(feature_maps)
        assigner = self.target_assigner
        if assigner.dn_metas is not None and assigner.dn_metas["dn_anchor"].shape[0] != bs:
            assigner.dn_metas = None
        instance_feature, anchor, temp_feature, temp_anchor, time_interval = self.instance_bank.get(
            bs, metas, dn_metas=assigner.dn_metas
        )
        dn, attn_mask = None, None
        dn_queries = self._denoising_queries(metas, anchor.device) if self.training else None
        if dn_queries is not None:
            instance_feature, anchor, attn_mask, dn = self._append_denoising(instance_feature, anchor, dn_queries)

        anchor_embed = self.anchor_encoder(anchor)
        temp_anchor_embed = self.anchor_encoder(temp_anchor) if temp_anchor is not None else None
        prediction, classification, quality = [], [], []
        for i, op in enumerate(self.operation_order):
            if op != "refine":
                instance_feature = self._interact(
                    i,
                    instance_feature,
                    anchor,
                    anchor_embed,
                    temp_feature,
                    temp_anchor_embed,
                    attn_mask,
                    features,
                    metas,
                )
                continue
            last = i == len(self.operation_order) - 1
            anchor, cls, qt = self.layers[i](
                instance_feature,
                anchor,
                anchor_embed,
                time_interval=time_interval,
                return_cls=self.training or len(prediction) == self.num_single_frame_decoder - 1 or last,
            )
            prediction.append(anchor)
            classification.append(cls)
            quality.append(qt)
            if len(prediction) == self.num_single_frame_decoder:
                instance_feature, anchor = self._add_temporal_instances(instance_feature, anchor, cls, dn)
            if not last:
                anchor_embed = self.anchor_encoder(anchor)
            if len(prediction) > self.num_single_frame_decoder and temp_anchor_embed is not None:
                temp_anchor_embed = anchor_embed[:, : self.instance_bank.num_temp_instances]

        output: dict = {}
        if dn is not None:
            output = self._split_denoising(dn, prediction, classification, quality, instance_feature, anchor)
            free = slice(None, dn.num_free)
            classification = [x[:, free] for x in classification]
            prediction = [x[:, free] for x in prediction]
            quality = [x[:, free] if x is not None else None for x in quality]
            instance_feature, anchor, cls = instance_feature[:, free], anchor[:, free], cls[:, free]
        output.update(classification=classification, prediction=prediction, quality=quality)
        self.instance_bank.cache(instance_feature, anchor, cls, metas)
        if not self.training:
            # as the reference: new ids for instances above the post-processor's score threshold (None: all);
            # the tracking output applies its own threshold to cls_scores later
            output["instance_id"] = self.instance_bank.get_instance_id(cls, self.post_processor.score_threshold)
        return output

    def _interact(
        self, i, instance_feature, anchor, anchor_embed, temp_feature, temp_anchor_embed, attn_mask, features, metas
    ) -> torch.Tensor:
        """Operation i (any but refine) on the (bs, n, C) instance features."""
        op = self.operation_order[i]
        if op == "temp_gnn":
            return self.graph_model(
                i,
                instance_feature,
                temp_feature,
                temp_feature,
                query_pos=anchor_embed,
                key_pos=temp_anchor_embed,
                attn_mask=attn_mask if temp_feature is None else None,
            )
        if op == "gnn":
            return self.graph_model(
                i, instance_feature, value=instance_feature, query_pos=anchor_embed, attn_mask=attn_mask
            )
        if op == "deformable":
            return self.layers[i](
                instance_feature, anchor, anchor_embed, features, metas["projection_mat"], metas["image_wh"]
            )
        return self.layers[i](instance_feature)  # norm, ffn

    def _denoising_queries(self, metas: dict, device: torch.device) -> tuple | None:
        """The target assigner's noisy ground-truth queries for this frame (None: no denoising)."""
        gt_ids = None
        if "instance_id" in metas["img_metas"][0]:
            gt_ids = [torch.as_tensor(np.asarray(m["instance_id"]), device=device) for m in metas["img_metas"]]
        return self.target_assigner.get_dn_anchors(metas["gt_labels_3d"], metas["gt_bboxes_3d"], gt_ids)

    def _append_denoising(self, instance_feature: torch.Tensor, anchor: torch.Tensor, dn_queries: tuple):
        """Denoising queries appended after the free instances: zero features, their noisy anchors,
        and the self-attention mask (bs-independent (n, n), True = blocked) that keeps the free
        instances and each denoising group to themselves."""
        dn_anchor, dn_reg_target, dn_cls_target, dn_attn_mask, valid_mask, dn_id_target = dn_queries
        bs, num_dn = dn_anchor.shape[:2]
        if dn_anchor.shape[-1] != anchor.shape[-1]:
            dn_anchor = torch.cat(
                [dn_anchor, dn_anchor.new_zeros(bs, num_dn, anchor.shape[-1] - dn_anchor.shape[-1])], dim=-1
            )
        anchor = torch.cat([anchor, dn_anchor], dim=1)
        instance_feature = torch.cat(
            [instance_feature, instance_feature.new_zeros(bs, num_dn, instance_feature.shape[-1])], dim=1
        )
        num_instance = instance_feature.shape[1]
        num_free = num_instance - num_dn
        attn_mask = torch.ones(num_instance, num_instance, dtype=torch.bool, device=anchor.device)
        attn_mask[:num_free, :num_free] = False
        attn_mask[num_free:, num_free:] = dn_attn_mask
        dn = Denoising(num_free, dn_reg_target, dn_cls_target, valid_mask, dn_id_target)
        return instance_feature, anchor, attn_mask, dn

    def _add_temporal_instances(self, instance_feature, anchor, cls, dn: Denoising | None):
        """After the single-frame decoders: the instance bank puts last frame's instances in front
        of the best new ones, and the target assigner swaps in last frame's denoising groups."""
        instance_feature, anchor = self.instance_bank.update(instance_feature, anchor, cls)
        assigner = self.target_assigner
        if dn is None or assigner.num_temp_dn_groups <= 0 or dn.id_target is None:
            return instance_feature, anchor
        instance_feature, anchor, temp_reg, temp_cls, temp_valid, dn.id_target = assigner.update_dn(
            instance_feature,
            anchor,
            dn.reg_target,
            dn.cls_target,
            dn.valid_mask,
            dn.id_target,
            self.instance_bank.num_anchor,
            self.instance_bank.mask,
        )
        dn.temporal = (temp_reg, temp_cls, temp_valid)
        return instance_feature, anchor

    def _split_denoising(self, dn: Denoising, prediction, classification, quality, instance_feature, anchor) -> dict:
        """The denoising queries' outputs and targets for the loss; their last state is cached by
        the target assigner for the next frame."""
        queries = slice(dn.num_free, None)
        output = dict(
            dn_prediction=[x[:, queries] for x in prediction],
            dn_classification=[x[:, queries] for x in classification],
            dn_reg_target=dn.reg_target,
            dn_cls_target=dn.cls_target,
            dn_valid_mask=dn.valid_mask,
        )
        cls_target, valid_mask = dn.cls_target, dn.valid_mask
        if dn.temporal is not None:
            temp_reg, cls_target, valid_mask = dn.temporal
            output.update(
                temp_dn_reg_target=temp_reg,
                temp_dn_cls_target=cls_target,
                temp_dn_valid_mask=valid_mask,
                dn_id_target=dn.id_target,
            )
        self.target_assigner.cache_dn(
            instance_feature[:, queries], anchor[:, queries], cls_target, valid_mask, dn.id_target
        )
        return output

    def loss(self, model_outs: dict, data: dict) -> dict[str, torch.Tensor]:
        """Per decoder: focal class loss and box losses of the matched instances, then the same
        for the denoising queries (their targets are known)."""
        output = {}
        for idx, (cls, reg, qt) in enumerate(
            zip(model_outs["classification"], model_outs["prediction"], model_outs["quality"])
        ):
            output.update(self._matched_loss(idx, cls, reg, qt, data))
        if "dn_prediction" not in model_outs:
            return output
        dn = self._prepare_dn(model_outs)
        for idx, (cls, reg) in enumerate(zip(model_outs["dn_classification"], model_outs["dn_prediction"])):
            if "temp_dn_valid_mask" in model_outs and idx == self.num_single_frame_decoder:
                dn = self._prepare_dn(model_outs, prefix="temp_")
            valid, cls_target, reg_target, pos, reg_weights, num_dn_pos = dn
            output[f"loss_cls_dn_{idx}"] = self.loss_cls(
                as_fp32(cls).flatten(end_dim=1)[valid], cls_target, avg_factor=num_dn_pos
            )
            pred = as_fp32(reg).flatten(end_dim=1)[valid][pos][..., : len(self.reg_weights)]
            output.update(
                self.loss_reg(pred, reg_target, weight=reg_weights, avg_factor=num_dn_pos, suffix=f"_dn_{idx}")
            )
        return output

    def _matched_loss(self, idx: int, cls, reg, qt, data: dict) -> dict[str, torch.Tensor]:
        """Decoder idx's losses: (bs, n, num_cls) logits against the matched classes (background
        elsewhere); (bs, n, 11) boxes and (bs, n, 2) quality of the matched instances the decoder
        is confident enough about (cls_threshold_to_reg), all over the number of matches."""
        num_reg = len(self.reg_weights)
        cls, reg = as_fp32(cls), as_fp32(reg[..., :num_reg])
        cls_target, reg_target, reg_weights = self.target_assigner.sample(
            cls, reg, data["gt_labels_3d"], data["gt_bboxes_3d"]
        )
        reg_target = reg_target[..., :num_reg]
        mask = ~torch.all(reg_target == 0, dim=-1)
        num_pos = max(float(reduce_mean(mask.sum().to(reg.dtype))), 1.0)
        if self.cls_threshold_to_reg > 0:
            mask = mask & (cls.max(dim=-1).values.sigmoid() > self.cls_threshold_to_reg)
        output = {
            f"loss_cls_{idx}": self.loss_cls(cls.flatten(end_dim=1), cls_target.flatten(end_dim=1), avg_factor=num_pos)
        }
        mask = mask.reshape(-1)
        reg_weights = (reg_weights * reg.new_tensor(self.reg_weights)).flatten(end_dim=1)[mask]
        reg_target = reg_target.flatten(end_dim=1)[mask]
        reg = reg.flatten(end_dim=1)[mask]
        reg_target = torch.where(reg_target.isnan(), reg.new_tensor(0.0), reg_target)
        cls_target = cls_target.flatten(end_dim=1)[mask]
        if qt is not None:
            qt = qt.flatten(end_dim=1)[mask]
        output.update(
            self.loss_reg(
                reg,
                reg_target,
                weight=reg_weights,
                avg_factor=num_pos,
                suffix=f"_{idx}",
                quality=qt,
                cls_target=cls_target,
            )
        )
        return output

    def _prepare_dn(self, model_outs: dict, prefix: str = ""):
        """Targets of the (`prefix` "temp_": temporally swapped) denoising queries: the valid mask
        (bs*num_dn,), the valid queries' classes (v,), box targets (p, 10) and weights of the
        positive ones, the positive mask (v,), and the valid count (mean over ranks, at least 1)."""
        valid = model_outs[f"{prefix}dn_valid_mask"].flatten(end_dim=1)
        cls_target = model_outs[f"{prefix}dn_cls_target"].flatten(end_dim=1)[valid]
        reg_target = as_fp32(model_outs[f"{prefix}dn_reg_target"]).flatten(end_dim=1)[valid][
            ..., : len(self.reg_weights)
        ]
        pos = cls_target >= 0
        reg_target = reg_target[pos]
        reg_weights = reg_target.new_tensor(self.reg_weights)[None].tile(reg_target.shape[0], 1)
        num_dn_pos = max(float(reduce_mean(valid.sum().to(reg_weights.dtype))), 1.0)
        return valid, cls_target, reg_target, pos, reg_weights, num_dn_pos

    def post_process(self, model_outs: dict, output_idx: int = -1) -> list[dict]:
        return self.post_processor.decode(
            model_outs["classification"],
            model_outs["prediction"],
            model_outs.get("instance_id"),
            model_outs.get("quality"),
            output_idx,
        )
