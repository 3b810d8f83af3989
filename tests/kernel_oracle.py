"""The reference's compiled deformable-aggregation op, transcribed line by line into differentiable torch.

HorizonRobotics/Sparse4D trains and tests with ``deformable_aggregation_ext`` (``ops/src/
deformable_aggregation_cuda.cu``); its CPU fallback (``grid_sample``) differs in a half-pixel band around every
feature map. This slow oracle follows the kernel's arithmetic instead, so the tests can check our backends
against what the released weights were trained on, and can serve the reference's op path on a CPU:

* one thread per (batch, anchor, point, camera, level, channel); a sampling location whose normalised x or y is
  ``<= 0`` or ``>= 1`` contributes nothing (``if (loc_w <= 0 || loc_w >= 1) return;``);
* otherwise ``h_im = loc_h * H - 0.5``, ``w_im = loc_w * W - 0.5`` and a bilinear blend of the four neighbours,
  each read only when it lies inside the map (zero padding);
* the output accumulates ``sample * weight`` with the weight of the channel's group.

Autograd through these expressions gives the kernel's backward: d/d loc_w = W * d/d w_im, etc.
"""

from __future__ import annotations

import torch


def deformable_aggregation_oracle(
    mc_ms_feat: torch.Tensor,
    spatial_shape: torch.Tensor,
    scale_start_index: torch.Tensor,
    sampling_location: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Same arguments and layout as the reference's ``DeformableAggregationFunction.apply``.

    mc_ms_feat (bs, num_feat, C): channel-last pixels, camera-major, then level, then row-major;
    spatial_shape (num_cams, num_levels, 2) as (H, W); scale_start_index (num_cams, num_levels): first row of
    each (camera, level) inside one batch element; sampling_location (bs, A, P, num_cams, 2) as (x / W, y / H);
    weights (bs, A, P, num_cams, num_levels, G). Returns (bs, A, C) in the inputs' dtype.
    """
    bs, num_feat, channels = mc_ms_feat.shape
    _, num_anchors, num_pts, num_cams, _ = sampling_location.shape
    num_levels, num_groups = weights.shape[-2:]
    group_of_channel = torch.arange(channels, device=mc_ms_feat.device) // (channels // num_groups)  # (C,)
    loc_w, loc_h = sampling_location[..., 0], sampling_location[..., 1]  # (bs, A, P, N)
    active = (loc_w > 0) & (loc_w < 1) & (loc_h > 0) & (loc_h < 1)  # the kernel's early returns
    batch_row = (torch.arange(bs, device=mc_ms_feat.device) * num_feat).view(bs, 1, 1, 1)
    flat = mc_ms_feat.reshape(bs * num_feat, channels)
    output = mc_ms_feat.new_zeros((bs, num_anchors, channels))
    for cam in range(num_cams):
        for level in range(num_levels):
            h, w = int(spatial_shape[cam, level, 0]), int(spatial_shape[cam, level, 1])
            start = int(scale_start_index[cam, level])
            h_im = loc_h[..., cam] * h - 0.5  # (bs, A, P)
            w_im = loc_w[..., cam] * w - 0.5
            h_low, w_low = torch.floor(h_im), torch.floor(w_im)
            lh, lw = h_im - h_low, w_im - w_low
            hh, hw = 1 - lh, 1 - lw
            h_low, w_low = h_low.long(), w_low.long()
            h_high, w_high = h_low + 1, w_low + 1
            corners = (
                (h_low, w_low, hh * hw, (h_low >= 0) & (w_low >= 0)),
                (h_low, w_high, hh * lw, (h_low >= 0) & (w_high <= w - 1)),
                (h_high, w_low, lh * hw, (h_high <= h - 1) & (w_low >= 0)),
                (h_high, w_high, lh * lw, (h_high <= h - 1) & (w_high <= w - 1)),
            )
            sample = 0
            for row, col, bilinear, inside in corners:
                inside = inside & active[..., cam]
                pixel = (start + row.clamp(0, h - 1) * w + col.clamp(0, w - 1))[..., None]  # (bs, A, P, 1)
                index = (batch_row + pixel).reshape(-1)
                value = flat.index_select(0, index).view(bs, num_anchors, num_pts, channels)
                sample = sample + bilinear[..., None] * value * inside[..., None].to(value.dtype)
            weight = weights[:, :, :, cam, level][..., group_of_channel]  # (bs, A, P, C)
            output = output + (sample * weight).sum(dim=2)
    return output
