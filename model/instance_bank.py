"""The instance bank: learnable anchors plus instances carried over from the previous frame.

Between frames of a sequence the top `num_temp_instances` instances (by confidence, decayed by
`confidence_decay` per frame) are kept with their features, and their anchors are moved into the
current LiDAR frame with ego motion and their own velocity. A new scene (no cached frame, other
batch size) or a gap longer than `max_time_interval` seconds starts afresh.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.blocks import KeyPointsGenerator


def topk(confidence: torch.Tensor, k: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Top-k of (bs, n) confidence and the matching rows of each (bs, n, ...) input (as (bs, k, -1))."""
    bs, n = confidence.shape[:2]
    confidence, indices = torch.topk(confidence, k, dim=1)
    flat = (indices + torch.arange(bs, device=indices.device)[:, None] * n).reshape(-1)
    return confidence, [x.flatten(end_dim=1)[flat].reshape(bs, k, -1) for x in inputs]


class InstanceBank(nn.Module):
    def __init__(
        self,
        embed_dims: int,
        anchor: np.ndarray,
        *,
        num_temp_instances: int,
        confidence_decay: float,
        correct_projected_yaw: bool,
        default_time_interval: float = 0.5,
        max_time_interval: float = 2.0,
    ):
        """The settings are model's (build_model); the two intervals are the reference's constants."""
        super().__init__()
        self.correct_projected_yaw = correct_projected_yaw  # see KeyPointsGenerator.anchor_projection
        self.embed_dims = embed_dims
        self.num_temp_instances = num_temp_instances
        self.default_time_interval = default_time_interval
        self.confidence_decay = confidence_decay
        self.max_time_interval = max_time_interval
        self.anchor_handler = KeyPointsGenerator(embed_dims)  # anchor_projection only: no learnable points
        anchor = np.asarray(anchor, dtype=np.float32)  # (num_anchor, 11)
        self.num_anchor = len(anchor)
        self.anchor = nn.Parameter(torch.tensor(anchor))
        self.anchor_init = anchor
        # fixed zeros, as the reference configures it (feat_grad=False)
        self.instance_feature = nn.Parameter(torch.zeros(self.num_anchor, embed_dims), requires_grad=False)
        self.reset()

    def init_weight(self) -> None:
        self.anchor.data = self.anchor.data.new_tensor(self.anchor_init)

    def reset(self) -> None:
        self.cached_feature = None  # (bs, num_temp, C)
        self.cached_anchor = None  # (bs, num_temp, 11)
        self.metas = None
        self.mask = None  # (bs,) whether the cached frame is recent enough to use
        self.confidence = None
        self.temp_confidence = None
        self.instance_id = None
        self.prev_id = 0

    def get(self, batch_size: int, metas: dict, dn_metas: dict | None = None):
        """Learnable instances tiled over the batch, the cached ones moved to the current frame,
        and the time since the cached frame (bs,) (the default interval when there is none)."""
        instance_feature = torch.tile(self.instance_feature[None], (batch_size, 1, 1))
        anchor = torch.tile(self.anchor[None], (batch_size, 1, 1))
        if self.cached_anchor is not None and batch_size == self.cached_anchor.shape[0]:
            time_interval = (metas["timestamp"] - self.metas["timestamp"]).to(instance_feature.dtype)
            self.mask = time_interval.abs() <= self.max_time_interval
            # previous LiDAR frame -> global -> current LiDAR frame
            temp2cur = self.cached_anchor.new_tensor(
                np.stack(
                    [
                        cur["T_global_inv"] @ prev["T_global"]
                        for cur, prev in zip(metas["img_metas"], self.metas["img_metas"])
                    ]
                )
            )
            fix = self.correct_projected_yaw
            self.cached_anchor = self.anchor_handler.anchor_projection(
                self.cached_anchor, temp2cur, -time_interval, fix
            )
            if dn_metas is not None and batch_size == dn_metas["dn_anchor"].shape[0]:
                num_dn_group, num_dn = dn_metas["dn_anchor"].shape[1:3]
                moved = self.anchor_handler.anchor_projection(
                    dn_metas["dn_anchor"].flatten(1, 2), temp2cur, -time_interval, fix
                )
                dn_metas["dn_anchor"] = moved.reshape(batch_size, num_dn_group, num_dn, -1)
            time_interval = torch.where(
                (time_interval != 0) & self.mask, time_interval, time_interval.new_tensor(self.default_time_interval)
            )
        else:
            self.reset()
            time_interval = instance_feature.new_tensor([self.default_time_interval] * batch_size)
        return instance_feature, anchor, self.cached_feature, self.cached_anchor, time_interval

    def update(self, instance_feature: torch.Tensor, anchor: torch.Tensor, confidence: torch.Tensor):
        """After the single-frame decoder: keep the best (num_anchor - num_temp) new instances
        and put the cached ones in front of them (where the cached frame is usable)."""
        if self.cached_feature is None:
            return instance_feature, anchor
        num_dn = instance_feature.shape[1] - self.num_anchor
        if num_dn > 0:
            dn_instance_feature, dn_anchor = instance_feature[:, -num_dn:], anchor[:, -num_dn:]
            instance_feature, anchor = instance_feature[:, : self.num_anchor], anchor[:, : self.num_anchor]
            confidence = confidence[:, : self.num_anchor]
        n = self.num_anchor - self.num_temp_instances
        _, (selected_feature, selected_anchor) = topk(confidence.max(dim=-1).values, n, instance_feature, anchor)
        selected_feature = torch.cat([self.cached_feature, selected_feature], dim=1)
        selected_anchor = torch.cat([self.cached_anchor, selected_anchor], dim=1)
        instance_feature = torch.where(self.mask[:, None, None], selected_feature, instance_feature)
        anchor = torch.where(self.mask[:, None, None], selected_anchor, anchor)
        if self.instance_id is not None:
            self.instance_id = torch.where(self.mask[:, None], self.instance_id, self.instance_id.new_tensor(-1))
        if num_dn > 0:
            instance_feature = torch.cat([instance_feature, dn_instance_feature], dim=1)
            anchor = torch.cat([anchor, dn_anchor], dim=1)
        return instance_feature, anchor

    def cache(
        self, instance_feature: torch.Tensor, anchor: torch.Tensor, confidence: torch.Tensor, metas: dict
    ) -> None:
        """Keep the top instances of this frame for the next one (no gradients flow back)."""
        if self.num_temp_instances <= 0:
            return
        instance_feature, anchor = instance_feature.detach(), anchor.detach()
        confidence = confidence.detach().max(dim=-1).values.sigmoid()
        self.metas = metas
        if self.confidence is not None:
            confidence[:, : self.num_temp_instances] = torch.maximum(
                self.confidence * self.confidence_decay, confidence[:, : self.num_temp_instances]
            )
        self.temp_confidence = confidence
        self.confidence, (self.cached_feature, self.cached_anchor) = topk(
            confidence, self.num_temp_instances, instance_feature, anchor
        )

    def get_instance_id(self, confidence: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Tracking ids (bs, n): carried-over instances keep theirs, new ones get new ids (only those
        with confidence >= threshold when one is given; the reference passes the decoder's
        score_threshold, None in its config, so every new instance gets an id)."""
        confidence = confidence.max(dim=-1).values.sigmoid()
        instance_id = confidence.new_full(confidence.shape, -1).long()
        if self.instance_id is not None and self.instance_id.shape[0] == instance_id.shape[0]:
            instance_id[:, : self.instance_id.shape[1]] = self.instance_id
        mask = instance_id < 0
        if threshold is not None:
            mask = mask & (confidence >= threshold)
        num_new = int(mask.sum())
        instance_id[torch.where(mask)] = torch.arange(num_new, device=instance_id.device) + self.prev_id
        self.prev_id += num_new
        temp_conf = confidence if self.temp_confidence is None else self.temp_confidence
        kept = topk(temp_conf, self.num_temp_instances, instance_id)[1][0].squeeze(-1)
        self.instance_id = F.pad(kept, (0, self.num_anchor - self.num_temp_instances), value=-1)
        return instance_id
