"""Training targets: Hungarian matching of predictions to ground truth, and denoising queries.

Matching cost = focal-style class cost * cls_weight + weighted L1 box cost * box_weight (in the
encoded layout), solved per sample with scipy. Denoising: each of `num_dn_groups` groups holds
the (first `max_dn_gt`) ground-truth boxes with uniform noise (positives) and, with
`add_neg_dn`, the same boxes with larger noise (negatives); `num_temp_dn_groups` groups are
carried to the next frame and re-targeted by instance id.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from model.box3d import HEIGHT, LENGTH, WIDTH, YAW, X, Y, Z

# Class targets of denoising queries other than a class index (the reference's codes):
NEGATIVE_QUERY = -3  # a box with the larger noise: a negative for every class
NO_TARGET = -1  # padding (a sample with fewer boxes), or a carried-over query whose instance is gone;
# also the instance id of padding


def encode_box(box: torch.Tensor) -> torch.Tensor:
    """(..., 10) decoded boxes -> (..., 11) x, y, z, log l, log w, log h, sin, cos, vx, vy, vz."""
    return torch.cat(
        [
            box[..., [X, Y, Z]],
            box[..., [LENGTH, WIDTH, HEIGHT]].log(),
            box[..., YAW, None].sin(),
            box[..., YAW, None].cos(),
            box[..., YAW + 1 :],
        ],
        dim=-1,
    )


def block_diagonal_mask(groups: int, size: int, device: torch.device) -> torch.Tensor:
    """(groups*size, groups*size) attention mask, True = blocked: each group sees only itself."""
    mask = torch.ones(groups * size, groups * size, dtype=torch.bool, device=device)
    for g in range(groups):
        mask[g * size : (g + 1) * size, g * size : (g + 1) * size] = False
    return mask


def swap_in_groups(temp: torch.Tensor, cur: torch.Tensor, use_temp: torch.Tensor) -> torch.Tensor:
    """The current groups (bs, G, M, ...) with the first ones replaced by the cached groups
    (bs, temp groups, temp M, ...) in the samples where `use_temp` (bs,) is set; the cached groups
    are cut or zero-padded (not valid) to M queries first."""
    num_temp_groups, num_temp_dn = temp.shape[1:3]
    num_dn = cur.shape[2]
    if num_temp_dn < num_dn:
        pad = (0, num_dn - num_temp_dn) if temp.dim() == 3 else (0, 0, 0, num_dn - num_temp_dn)
        temp = F.pad(temp, pad, value=0)
    else:
        temp = temp[:, :, :num_dn]
    mask = use_temp[:, None, None] if cur.dim() == 3 else use_temp[:, None, None, None]
    temp = torch.where(mask, temp, cur[:, :num_temp_groups])
    return torch.cat([temp, cur[:, num_temp_groups:]], dim=1)


class SparseBox3DTarget:
    """Target assignment: matches predictions to ground truth and makes the denoising queries
    (the reference's `sampler` of the head)."""

    def __init__(
        self,
        *,
        cls_weight: float,
        box_weight: float,
        reg_weights: list[float],
        cls_wise_reg_weights: dict[int, list[float]] | None,
        num_dn_groups: int,
        num_temp_dn_groups: int,
        dn_noise_scale: list[float] | float,
        max_dn_gt: int,
        alpha: float = 0.25,
        gamma: float = 2.0,
        eps: float = 1e-12,
        add_neg_dn: bool = True,
    ):
        """The settings are model.matching's and model's (build_model); alpha, gamma, eps (the focal
        cost) and add_neg_dn are the reference's constants, which no profile changes."""
        self.cls_weight, self.alpha, self.gamma, self.eps, self.box_weight = cls_weight, alpha, gamma, eps, box_weight
        self.reg_weights = reg_weights
        self.cls_wise_reg_weights = cls_wise_reg_weights
        self.num_dn_groups, self.num_temp_dn_groups = num_dn_groups, num_temp_dn_groups
        self.dn_noise_scale, self.max_dn_gt, self.add_neg_dn = dn_noise_scale, max_dn_gt, add_neg_dn
        self.dn_metas: dict | None = None  # denoising queries cached for the next frame

    # ----------------------------------------------------------------- matching
    def sample(
        self,
        cls_pred: torch.Tensor,
        box_pred: torch.Tensor,
        cls_target: list[torch.Tensor],
        box_target: list[torch.Tensor],
    ):
        """Match (bs, n, num_cls) logits and (bs, n, 10) encoded boxes (first 10 values) to the
        per-sample targets. Returns class targets (bs, n) (num_cls = background), box targets
        (bs, n, 10) and regression weights (bs, n, 10)."""
        bs, num_pred, num_cls = cls_pred.shape
        box_target = [encode_box(b).to(box_pred.device) for b in box_target]
        instance_weights = []
        for cls_t, box_t in zip(cls_target, box_target):
            weights = (~box_t.isnan()).to(box_t.dtype)
            for cls, w in (self.cls_wise_reg_weights or {}).items():
                weights = torch.where((cls_t == cls)[:, None], weights.new_tensor(w), weights)
            instance_weights.append(weights)
        out_cls = torch.full((bs, num_pred), num_cls, dtype=torch.long, device=cls_pred.device)
        out_box = box_pred.new_zeros(box_pred.shape)
        out_weights = box_pred.new_zeros(box_pred.shape)
        cls_prob = cls_pred.detach().sigmoid()
        for i in range(bs):
            if len(cls_target[i]) == 0:
                continue
            cost = self._cls_cost(cls_prob[i], cls_target[i]) + self._box_cost(
                box_pred[i].detach(), box_target[i], instance_weights[i]
            )
            cost = cost.cpu().numpy()
            cost = np.where(np.isneginf(cost) | np.isnan(cost), 1e8, cost)
            pred_idx, target_idx = (
                torch.as_tensor(x, dtype=torch.long, device=cls_pred.device) for x in linear_sum_assignment(cost)
            )
            out_cls[i, pred_idx] = cls_target[i][target_idx]
            out_box[i, pred_idx] = box_target[i][target_idx]
            out_weights[i, pred_idx] = instance_weights[i][target_idx]
        return out_cls, out_box, out_weights

    def _cls_cost(self, prob: torch.Tensor, cls_target: torch.Tensor) -> torch.Tensor:
        """(n, num_cls) probabilities vs (m,) classes -> (n, m)."""
        neg = -(1 - prob + self.eps).log() * (1 - self.alpha) * prob.pow(self.gamma)
        pos = -(prob + self.eps).log() * self.alpha * (1 - prob).pow(self.gamma)
        return (pos[:, cls_target] - neg[:, cls_target]) * self.cls_weight

    def _box_cost(self, box_pred: torch.Tensor, box_target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(n, 10) vs (m, 10) with (m, 10) weights -> (n, m) weighted L1."""
        reg_weights = box_pred.new_tensor(self.reg_weights)
        diff = (box_pred[:, None, : len(self.reg_weights)] - box_target[None]).abs()
        return (diff * weights[None] * reg_weights).sum(-1) * self.box_weight

    # ---------------------------------------------------------------- denoising
    def get_dn_anchors(
        self,
        cls_target: list[torch.Tensor],
        box_target: list[torch.Tensor],
        gt_instance_id: list[torch.Tensor] | None = None,
    ):
        """Noisy anchors (bs, G*M, 10) (encoded ground truth has no vz), their box (bs, G*M, 10) and class (bs, G*M) targets
        (NEGATIVE_QUERY, NO_TARGET: padding), the attention mask between groups (G*M, G*M; True = blocked),
        the valid mask (bs, G*M) and instance ids (bs, G*M) or None; None without denoising.
        M queries per group: the (first max_dn_gt) boxes, twice with add_neg_dn."""
        if self.num_dn_groups <= 0:
            return None
        if self.num_temp_dn_groups <= 0:
            gt_instance_id = None
        padded = self._padded_targets(cls_target, box_target, gt_instance_id)
        if padded is None:
            return None
        cls_t, box_t, ids = padded
        bs, groups = cls_t.shape[0], self.num_dn_groups
        if groups > 1:
            cls_t, box_t = cls_t.tile(groups, 1), box_t.tile(groups, 1, 1)
            ids = ids.tile(groups, 1) if ids is not None else None
        dn_anchor = self._noisy_anchors(box_t)  # (G*bs, M, 10)
        num_queries = dn_anchor.shape[1]
        dn_box, dn_cls, dn_ids = self._assign_dn_targets(dn_anchor, box_t, cls_t, ids)

        def by_sample(x: torch.Tensor) -> torch.Tensor:
            # (G*bs, M, ...) -> (bs, G*M, ...)
            return x.reshape(groups, bs, num_queries, *x.shape[2:]).transpose(0, 1).flatten(1, 2)

        dn_anchor, dn_box, dn_cls = by_sample(dn_anchor), by_sample(dn_box), by_sample(dn_cls)
        dn_ids = by_sample(dn_ids) if dn_ids is not None else None
        valid_mask = dn_cls >= 0
        if self.add_neg_dn:
            orig_cls = by_sample(torch.cat([cls_t, cls_t], dim=1))
            valid_mask = valid_mask | ((orig_cls >= 0) & (dn_cls == NEGATIVE_QUERY))  # not padding
        attn_mask = block_diagonal_mask(groups, num_queries, dn_anchor.device)
        return dn_anchor, dn_box, dn_cls.long(), attn_mask, valid_mask, dn_ids

    def _padded_targets(self, cls_target, box_target, gt_instance_id):
        """The first max_dn_gt boxes of each sample, padded to the batch's most: classes (bs, M)
        (NO_TARGET for padding), encoded boxes (bs, M, 10) (zeros for padding), ids (bs, M) or
        None; None when no sample has a box."""
        if self.max_dn_gt > 0:
            cls_target = [x[: self.max_dn_gt] for x in cls_target]
            box_target = [x[: self.max_dn_gt] for x in box_target]
            if gt_instance_id is not None:
                gt_instance_id = [x[: self.max_dn_gt] for x in gt_instance_id]
        max_gt = max(len(x) for x in cls_target)
        if max_gt == 0:
            return None
        cls_t = torch.stack([F.pad(x, (0, max_gt - len(x)), value=NO_TARGET) for x in cls_target])
        box_t = torch.stack([F.pad(encode_box(x).to(cls_t.device), (0, 0, 0, max_gt - len(x))) for x in box_target])
        box_t = torch.where(cls_t[..., None] == NO_TARGET, box_t.new_tensor(0.0), box_t)
        ids = None
        if gt_instance_id is not None:
            ids = torch.stack([F.pad(x, (0, max_gt - len(x)), value=NO_TARGET) for x in gt_instance_id])
        return cls_t, box_t, ids

    def _noisy_anchors(self, box_t: torch.Tensor) -> torch.Tensor:
        """(n, M, 10) boxes -> (n, M, 10) with uniform noise in [-scale, scale], followed with
        add_neg_dn by (n, M, 10) negatives with noise of 1 to 2 scales."""
        scale = box_t.new_tensor(self.dn_noise_scale)
        dn_anchor = box_t + (torch.rand_like(box_t) * 2 - 1) * scale
        if self.add_neg_dn:
            # the reference's draw order: magnitudes first, then signs (a seeded step equals the reference's)
            magnitude = torch.rand_like(box_t) + 1
            sign = torch.where(torch.rand_like(box_t) > 0.5, box_t.new_tensor(1.0), box_t.new_tensor(-1.0))
            dn_anchor = torch.cat([dn_anchor, box_t + magnitude * sign * scale], dim=1)
        return dn_anchor

    def _assign_dn_targets(self, dn_anchor, box_t, cls_t, ids):
        """Each box's target goes to its nearest noisy anchor (Hungarian on the L1 box cost, per row
        of (n, Q, 10) anchors vs (n, M, 10) boxes); the other queries are NEGATIVE_QUERY with
        zero boxes and NO_TARGET ids. Returns boxes (n, Q, 10), classes (n, Q), ids (n, Q) or None."""
        dn_box = torch.zeros_like(dn_anchor)
        dn_cls = torch.full_like(cls_t, NEGATIVE_QUERY)
        dn_ids = torch.full_like(ids, NO_TARGET) if ids is not None else None
        if self.add_neg_dn:
            dn_cls = torch.cat([dn_cls, dn_cls], dim=1)
            dn_ids = torch.cat([dn_ids, dn_ids], dim=1) if dn_ids is not None else None
        for i in range(dn_anchor.shape[0]):
            cost_i = self._box_cost(dn_anchor[i], box_t[i], torch.ones_like(box_t[i])).cpu().numpy()
            a_idx, g_idx = (
                torch.as_tensor(x, dtype=torch.long, device=dn_anchor.device) for x in linear_sum_assignment(cost_i)
            )
            dn_box[i, a_idx] = box_t[i, g_idx]
            dn_cls[i, a_idx] = cls_t[i, g_idx]
            if dn_ids is not None:
                dn_ids[i, a_idx] = ids[i, g_idx]
        return dn_box, dn_cls, dn_ids

    def update_dn(
        self,
        instance_feature,
        anchor,
        dn_reg_target,
        dn_cls_target,
        valid_mask,
        dn_id_target,
        num_normal_anchor,
        temporal_valid_mask,
    ):
        """After the single-frame decoder: replace the first `num_temp_dn_groups` denoising groups
        with last frame's cached ones (where the frame is usable), re-targeted by instance id."""
        bs, num_anchor = instance_feature.shape[:2]
        if temporal_valid_mask is None:
            self.dn_metas = None
        if self.dn_metas is None or num_normal_anchor >= num_anchor:
            return instance_feature, anchor, dn_reg_target, dn_cls_target, valid_mask, dn_id_target
        groups = self.num_dn_groups
        num_dn = (num_anchor - num_normal_anchor) // groups
        dn_feat = instance_feature[:, num_normal_anchor:].reshape(bs, groups, num_dn, -1)
        dn_anchor = anchor[:, num_normal_anchor:].reshape(bs, groups, num_dn, -1)
        instance_feature, anchor = instance_feature[:, :num_normal_anchor], anchor[:, :num_normal_anchor]
        current = [
            dn_feat,
            dn_anchor,
            dn_reg_target.reshape(bs, groups, num_dn, -1),
            dn_cls_target.reshape(bs, groups, num_dn),
            valid_mask.reshape(bs, groups, num_dn),
            dn_id_target.reshape(bs, groups, num_dn),
        ]
        cached = self._retargeted_cache(current[2], current[5])
        output = [swap_in_groups(temp, cur, temporal_valid_mask).flatten(1, 2) for temp, cur in zip(cached, current)]
        output[0] = torch.cat([instance_feature, output[0]], dim=1)
        output[1] = torch.cat([anchor, output[1]], dim=1)
        return tuple(output)

    def _retargeted_cache(self, reg_target: torch.Tensor, id_target: torch.Tensor) -> list[torch.Tensor]:
        """Last frame's cached groups with this frame's targets: a cached query takes the box target
        (bs, G, M, 10) of the current ground truth with its instance id (bs, G, M), and NO_TARGET as
        class where that instance is gone. Returns feature, anchor, box, class, valid and id, each
        (bs, temp groups, temp M, ...)."""
        temp_ids = self.dn_metas["dn_id_target"]
        num_temp_groups = temp_ids.shape[1]
        # (bs, temp groups, temp M, M): which current gt each cached query belonged to
        match = temp_ids[..., None] == id_target[:, :num_temp_groups, None]
        temp_reg = (match[..., None] * reg_target[:, :num_temp_groups, None]).sum(dim=3)
        temp_cls = torch.where(
            (~match).all(dim=-1), self.dn_metas["dn_cls_target"].new_tensor(NO_TARGET), self.dn_metas["dn_cls_target"]
        )
        meta = self.dn_metas
        return [meta["dn_instance_feature"], meta["dn_anchor"], temp_reg, temp_cls, meta["valid_mask"], temp_ids]

    def cache_dn(self, dn_instance_feature, dn_anchor, dn_cls_target, valid_mask, dn_id_target) -> None:
        """Keep `num_temp_dn_groups` random denoising groups for the next frame."""
        if self.num_temp_dn_groups < 0:
            return
        groups = self.num_dn_groups
        bs, num_dn = dn_instance_feature.shape[:2]
        per_group = num_dn // groups
        keep = (torch.randperm(groups) < self.num_temp_dn_groups).to(dn_anchor.device)
        self.dn_metas = {
            "dn_instance_feature": dn_instance_feature.detach().reshape(bs, groups, per_group, -1)[:, keep],
            "dn_anchor": dn_anchor.detach().reshape(bs, groups, per_group, -1)[:, keep],
            "dn_cls_target": dn_cls_target.reshape(bs, groups, per_group)[:, keep],
            "valid_mask": valid_mask.reshape(bs, groups, per_group)[:, keep],
            "dn_id_target": dn_id_target.reshape(bs, groups, per_group)[:, keep] if dn_id_target is not None else None,
        }
