"""Building blocks of the Sparse4Dv3 head and detector.

Parameter names (and so the module nesting) follow the reference implementation so that its
checkpoints load: `linear_relu_ln` stacks index as in the reference, and so on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from mmcv.cnn import Linear

from model.box3d import COS_YAW, HEIGHT, LENGTH, SIN_YAW, VX, WIDTH, X, Y, Z
from model.ops import FlattenedFeatures, deformable_aggregation


def linear_relu_ln(embed_dims: int, in_loops: int, out_loops: int, input_dims: int | None = None) -> list[nn.Module]:
    """[Linear, ReLU] * in_loops followed by a LayerNorm, the whole repeated out_loops times."""
    layers: list[nn.Module] = []
    input_dims = embed_dims if input_dims is None else input_dims
    for _ in range(out_loops):
        for _ in range(in_loops):
            layers += [Linear(input_dims, embed_dims), nn.ReLU(inplace=True)]
            input_dims = embed_dims
        layers.append(nn.LayerNorm(embed_dims))
    return layers


class KeyPointsGenerator(nn.Module):
    """3D key points of each anchor box: fixed offsets (fractions of the box size) and learnt ones.

    Also moves anchors between frames (`anchor_projection`), which is why the instance bank
    holds one (with the default single fixed point) as its `anchor_handler`.
    """

    def __init__(self, embed_dims: int, num_learnable_pts: int = 0, fix_scale=None):
        """num_learnable_pts 0 and fix_scale None: the anchor's centre alone (the instance bank's)."""
        super().__init__()
        if fix_scale is None:
            fix_scale = ((0.0, 0.0, 0.0),)
        self.fix_scale = nn.Parameter(torch.tensor(fix_scale, dtype=torch.float32), requires_grad=False)
        self.num_learnable_pts = num_learnable_pts
        self.num_pts = len(fix_scale) + num_learnable_pts
        if num_learnable_pts > 0:
            self.learnable_fc = Linear(embed_dims, num_learnable_pts * 3)

    def init_weight(self) -> None:
        if self.num_learnable_pts > 0:
            nn.init.xavier_uniform_(self.learnable_fc.weight)
            nn.init.zeros_(self.learnable_fc.bias)

    def forward(self, anchor: torch.Tensor, instance_feature: torch.Tensor | None = None) -> torch.Tensor:
        """anchor (bs, n, 11), instance_feature (bs, n, C) -> key points (bs, n, num_pts, 3)."""
        bs, num_anchor = anchor.shape[:2]
        size = anchor[..., None, [LENGTH, WIDTH, HEIGHT]].exp()  # (bs, n, 1, 3)
        key_points = self.fix_scale * size
        if self.num_learnable_pts > 0 and instance_feature is not None:
            scale = self.learnable_fc(instance_feature).reshape(bs, num_anchor, self.num_learnable_pts, 3)
            key_points = torch.cat([key_points, (scale.sigmoid() - 0.5) * size], dim=-2)
        cos, sin = anchor[..., COS_YAW, None], anchor[..., SIN_YAW, None]  # (bs, n, 1)
        x, y = key_points[..., 0], key_points[..., 1]
        rotated = torch.stack([cos * x - sin * y, sin * x + cos * y, key_points[..., 2]], dim=-1)
        return rotated + anchor[..., None, [X, Y, Z]]

    @staticmethod
    def anchor_projection(
        anchor: torch.Tensor, transform: torch.Tensor, time_interval: torch.Tensor, correct_yaw: bool = False
    ) -> torch.Tensor:
        """Move anchors (bs, n, 11) into another frame: (bs, 4, 4) transform, (bs,) seconds.

        The centre first moves back along the velocity by `time_interval`, then everything is
        rotated (and the centre translated) into the destination frame.

        The reference writes the rotated (cos, sin) into the (SIN_YAW, COS_YAW) slots ("TODO: Fix
        bug" in its code, kept by the Ascend port): every released checkpoint was trained on
        temporal anchors with that swap, so it is the default. `correct_yaw` writes (sin, cos).
        """
        transform = transform.to(anchor.dtype)[:, None]  # (bs, 1, 4, 4)
        vel = anchor[..., VX:]
        vel_dims = vel.shape[-1]
        centre = anchor[..., [X, Y, Z]] - vel * time_interval.to(anchor.dtype)[:, None, None]
        centre = (transform[..., :3, :3] @ centre[..., None]).squeeze(-1) + transform[..., :3, 3]
        cos_sin = (transform[..., :2, :2] @ anchor[..., [COS_YAW, SIN_YAW], None]).squeeze(-1)
        vel = (transform[..., :vel_dims, :vel_dims] @ vel[..., None]).squeeze(-1)
        yaw = torch.cat([cos_sin[..., 1:], cos_sin[..., :1]], dim=-1) if correct_yaw else cos_sin
        return torch.cat([centre, anchor[..., [LENGTH, WIDTH, HEIGHT]], yaw, vel], dim=-1)


class DeformableFeatureAggregation(nn.Module):
    """Samples multi-camera, multi-level image features at each anchor's projected key points.

    Weights over (camera, level, point) per channel group come from the instance feature plus
    the anchor embedding and a camera embedding of each projection matrix; a fraction of
    (camera, point) weights is dropped in training (attn_drop). The output is concatenated to
    the input instance feature (residual "cat"), giving 2 * embed_dims channels.
    """

    def __init__(
        self,
        embed_dims: int,
        num_groups: int,
        num_levels: int,
        num_cams: int,
        attn_drop: float,
        num_learnable_pts: int,
        fix_scale,
    ):
        super().__init__()
        if embed_dims % num_groups:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_groups ({num_groups})")
        self.embed_dims, self.num_groups, self.num_levels, self.num_cams = embed_dims, num_groups, num_levels, num_cams
        self.attn_drop = attn_drop
        self.backend = "auto"  # of model.ops.deformable_aggregation; benchmarks set "grid_sample"
        self.kps_generator = KeyPointsGenerator(embed_dims, num_learnable_pts, fix_scale)
        self.num_pts = self.kps_generator.num_pts
        self.output_proj = Linear(embed_dims, embed_dims)
        self.camera_encoder = nn.Sequential(*linear_relu_ln(embed_dims, 1, 2, 12))
        self.weights_fc = Linear(embed_dims, num_groups * num_levels * self.num_pts)

    def init_weight(self) -> None:
        nn.init.zeros_(self.weights_fc.weight)
        nn.init.zeros_(self.weights_fc.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        instance_feature: torch.Tensor,
        anchor: torch.Tensor,
        anchor_embed: torch.Tensor,
        features: FlattenedFeatures,
        projection_mat: torch.Tensor,
        image_wh: torch.Tensor,
    ) -> torch.Tensor:
        """instance_feature, anchor_embed (bs, n, C); anchor (bs, n, 11); features: the frame's levels of
        (bs, cams, C, H, W), flattened once for all layers; projection_mat (bs, cams, 4, 4) LiDAR -> pixels;
        image_wh (bs, cams, 2).
        Returns (bs, n, 2C): the aggregated features, then the input ones (the reference's residual "cat")."""
        bs, num_anchor = instance_feature.shape[:2]
        key_points = self.kps_generator(anchor, instance_feature)  # (bs, n, pts, 3)
        weights = self._get_weights(instance_feature, anchor_embed, projection_mat)
        points_2d = self.project_points(key_points, projection_mat, image_wh)  # (bs, cams, n, pts, 2)
        points_2d = points_2d.permute(0, 2, 3, 1, 4)  # (bs, n, pts, cams, 2)
        # (bs, n, cams, levels, pts, groups) -> (bs, n, pts, cams, levels, groups)
        weights = weights.permute(0, 1, 4, 2, 3, 5)
        sampled = deformable_aggregation(features, points_2d, weights, backend=self.backend)  # (bs, n, C)
        return torch.cat([self.output_proj(sampled), instance_feature], dim=-1)

    def _get_weights(
        self, instance_feature: torch.Tensor, anchor_embed: torch.Tensor, projection_mat: torch.Tensor
    ) -> torch.Tensor:
        """(bs, n, cams, levels, pts, groups), softmax over (cams, levels, pts) per group."""
        bs, num_anchor = instance_feature.shape[:2]
        feature = instance_feature + anchor_embed
        camera_embed = self.camera_encoder(projection_mat[:, :, :3].reshape(bs, self.num_cams, -1))
        feature = feature[:, :, None] + camera_embed[:, None]  # (bs, n, cams, C)
        weights = self.weights_fc(feature).reshape(bs, num_anchor, -1, self.num_groups).softmax(dim=-2)
        weights = weights.reshape(bs, num_anchor, self.num_cams, self.num_levels, self.num_pts, self.num_groups)
        if self.training and self.attn_drop > 0:
            # drawn from the CPU generator and then moved, as the reference: a seeded step on a GPU is its step
            draw = torch.rand(bs, num_anchor, self.num_cams, 1, self.num_pts, 1)
            keep = draw.to(device=weights.device, dtype=weights.dtype) > self.attn_drop
            weights = keep * weights / (1 - self.attn_drop)
        return weights

    @staticmethod
    def project_points(key_points: torch.Tensor, projection_mat: torch.Tensor, image_wh: torch.Tensor) -> torch.Tensor:
        """(bs, n, pts, 3) LiDAR points -> (bs, cams, n, pts, 2) normalised image coordinates."""
        homogeneous = torch.cat([key_points, torch.ones_like(key_points[..., :1])], dim=-1)
        points = torch.einsum("bcij,bnpj->bcnpi", projection_mat[..., :3, :], homogeneous)
        points_2d = points[..., :2] / points[..., 2:3].clamp(min=1e-5)
        return points_2d / image_wh[:, :, None, None]


class AsymmetricFFN(nn.Module):
    """Pre-norm FFN from 2C (the aggregation's concat) back to C, with a linear identity branch."""

    def __init__(self, in_channels: int, embed_dims: int, feedforward_channels: int, ffn_drop: float):
        super().__init__()
        self.pre_norm = nn.LayerNorm(in_channels)
        self.layers = nn.Sequential(
            nn.Sequential(Linear(in_channels, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(ffn_drop)),
            Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop),
        )
        self.identity_fc = nn.Identity() if in_channels == embed_dims else Linear(in_channels, embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        return self.identity_fc(x) + self.layers(x)


class DenseDepthNet(nn.Module):
    """Auxiliary dense depth from the first FPN levels, supervised by projected LiDAR (loss in fp32)."""

    def __init__(
        self,
        embed_dims: int,
        num_depth_layers: int,
        *,
        loss_weight: float,
        equal_focal: float = 100.0,
        max_depth: float = 60.0,
    ):
        """equal_focal and max_depth are the reference's constants, which no profile changes."""
        super().__init__()
        self.equal_focal, self.max_depth, self.loss_weight = equal_focal, max_depth, loss_weight
        self.num_depth_layers = num_depth_layers
        self.depth_layers = nn.ModuleList(nn.Conv2d(embed_dims, 1, kernel_size=1) for _ in range(num_depth_layers))

    def forward(self, feature_maps: list[torch.Tensor], focal: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Levels of (bs, cams, C, H, W) and focal (bs, cams) -> depths per level (bs*cams, 1, H, W)."""
        focal = self.equal_focal if focal is None else focal.reshape(-1)
        depths = []
        for layer, feat in zip(self.depth_layers, feature_maps[: self.num_depth_layers]):
            # under the detector's autocast when mixed precision is on, as the reference
            depth = layer(feat.flatten(end_dim=1).float()).exp()
            # Depth scales with the focal length: predict at a canonical focal, then rescale.
            depths.append((depth.transpose(0, -1) * focal / self.equal_focal).transpose(0, -1))
        return depths

    def loss(self, depth_preds: list[torch.Tensor], gt_depths: list[torch.Tensor]) -> torch.Tensor:
        loss = depth_preds[0].new_zeros(())
        for pred, gt in zip(depth_preds, gt_depths):
            pred = pred.permute(0, 2, 3, 1).reshape(-1)
            gt = gt.reshape(-1)
            fg = (gt > 0.0) & ~torch.isnan(pred)
            error = (pred[fg].clip(0.0, self.max_depth) - gt[fg]).abs().sum()
            loss = loss + error / max(1.0, float(fg.sum()) * len(depth_preds)) * self.loss_weight
        return loss


class GridMask(nn.Module):
    """Grid-mask image augmentation as the reference configures it (rotate 1, ratio 0.5, mode 1,
    prob 0.7): zeroes a random grid of stripes in training. Uses numpy's global RNG, as the
    reference does (the trainer saves and restores that state)."""

    def __init__(
        self,
        use_h: bool = True,
        use_w: bool = True,
        rotate: int = 1,
        ratio: float = 0.5,
        mode: int = 1,
        prob: float = 0.7,
    ):
        super().__init__()
        self.use_h, self.use_w, self.rotate, self.ratio, self.mode, self.prob = use_h, use_w, rotate, ratio, mode, prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, c, h, w) -> same shape."""
        if np.random.rand() > self.prob or not self.training:
            return x
        n, c, h, w = x.shape
        hh, ww = int(1.5 * h), int(1.5 * w)
        d = np.random.randint(2, h)
        length = min(max(int(d * self.ratio + 0.5), 1), d - 1)
        mask = np.ones((hh, ww), np.float32)
        st_h, st_w = np.random.randint(d), np.random.randint(d)
        if self.use_h:
            for i in range(hh // d):
                s = d * i + st_h
                mask[s : min(s + length, hh), :] = 0
        if self.use_w:
            for i in range(ww // d):
                s = d * i + st_w
                mask[:, s : min(s + length, ww)] = 0
        # rotate = 1 draws an angle of 0 (as in the reference); kept for parity with its RNG use.
        np.random.randint(self.rotate)
        mask = mask[(hh - h) // 2 : (hh - h) // 2 + h, (ww - w) // 2 : (ww - w) // 2 + w]
        mask = torch.from_numpy(np.ascontiguousarray(mask)).to(x)
        if self.mode == 1:
            mask = 1 - mask
        return x * mask
