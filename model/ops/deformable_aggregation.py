"""Deformable feature aggregation of Sparse4Dv3: one function, three backends.

For every anchor, Sparse4D projects ``num_pts`` 3D key points into every camera, samples each multi-scale
feature map there (bilinear, zero padding, ``align_corners=False``) and takes a weighted sum over points,
cameras and levels, with one weight per channel group::

    out[b, a, g*Cg:(g+1)*Cg] = sum_{p, n, l} weights[b, a, p, n, l, g]
                                             * bilinear(feature_maps[l][b, n, g*Cg:(g+1)*Cg], points_2d[b, a, p, n])

``points_2d`` holds normalised image coordinates (x / W, y / H); values outside [0, 1] are outside the image.

Backends (``deformable_aggregation(..., backend=...)``):

* ``"torch"``: pure PyTorch fast path with the compiled op's semantics (below), equal to it up to float
  rounding in values and gradients (checked against a line-by-line transcription of the CUDA kernel,
  ``tests/kernel_oracle.py``)
  (features, weights and points). It only samples the (anchor, point, camera) triples whose sample can be
  non-zero (a key point usually lands in one or two of the six cameras) and never materialises the
  (bs, anchors, cams, levels, pts, C) tensor: the weighted bilinear sum is a sparse matrix (16 entries per
  triple and group: 4 levels x 4 corners) times the channel-last feature rows. On CPU and CUDA that product,
  its transpose (feature gradients) and the sampled dense product that the weight and point gradients need
  run as ``torch.sparse`` CSR kernels (MKL / cuSPARSE); on other devices as index_select / index_add_ loops.
* ``"cuda_ext"``: the compiled CUDA op of the reference implementation (module ``deformable_aggregation_ext``
  built by ``projects/mmdet3d_plugin/ops/setup.py`` of HorizonRobotics/Sparse4D), wrapped in an autograd
  Function that calls its ``deformable_aggregation_forward`` / ``deformable_aggregation_backward``.
* ``"grid_sample"``: the plain formulation, :func:`deformable_aggregation_grid_sample` (``grid_sample`` over every
  camera and level, then a dense weighted sum), as the reference's CPU fallback (``use_deformable_func=False``).
  Only the baseline of ``benchmarks/deformable_aggregation_speed.py``: it differs from the op at the borders.
* ``"exportable"``: :func:`deformable_aggregation_exportable`, grid_sample with the op's border rule (the pairs the op
  skips get weight 0): the op's semantics in ONNX operators, traced by ``model.export`` for ``model.onnx``.
* ``"mx_driving"``: the Ascend NPU op ``mx_driving.deformable_aggregation`` (older releases:
  ``mx_driving.npu_deformable_aggregation`` or ``mx_driving.fused.npu_deformable_aggregation``), which has its
  own autograd.

``"auto"`` picks ``mx_driving`` for NPU tensors when it imports, ``cuda_ext`` for CUDA tensors when the extension
imports, and ``torch`` otherwise (and always for float64 inputs: the compiled ops compute in float32). Neither torch_npu, mx_driving nor the extension is imported at module import.

mx_driving's op serves only some shapes (:func:`mx_driving_rejects`): its C++ entry point rejects ``num_groups`` not a
multiple of 8 (``mx_driving/csrc/DeformableAggregation.cpp``), and its documentation limits the rest (num_groups 8,
C <= 256 with C / num_groups a multiple of 8, <= 6 cameras, <= 4 levels, <= 2048 anchors and points;
``docs/api/context/deformable_aggregation.md``, Ascend/DrivingSDK 9c2fb9ea). Where it
cannot serve, ``"auto"`` runs the torch backend and warns once per reason (``RuntimeWarning``); an explicit
``backend="mx_driving"`` raises ``ValueError`` naming the reason. On NPU tensors without mx_driving, ``"auto"`` also
warns once that the torch backend runs.

Both compiled ops take the features flattened channel-last, see :func:`flatten_feature_maps`. Their semantics,
which the released checkpoints were trained with and which the torch backend follows: a (point, camera) whose
normalised x or y is not strictly inside (0, 1) is skipped at every level; otherwise the sample is bilinear at
pixel ``loc * size - 0.5`` with zero padding. ``grid_sample`` differs in a half-pixel band around each map (it
still blends the border pixels with the padding there).

The torch backend reads the same channel-last layout. ``feature_maps`` is either the list of levels, flattened
inside the call, or the frame's :class:`FlattenedFeatures`, which flattens them once for every call that passes it:
the model's decoder layers, as the reference flattens once per frame in ``extract_feat`` (``feature_maps_format``).

Only torch APIs available in torch 2.1 are used (the Ascend stack runs torch 2.1 / Python 3.8).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "BACKENDS",
    "CUDA_EXT_MODULES",
    "FlattenedFeatures",
    "deformable_aggregation",
    "deformable_aggregation_exportable",
    "deformable_aggregation_grid_sample",
    "flatten_feature_maps",
    "mx_driving_rejects",
    "select_backend",
]

BACKENDS = ("auto", "torch", "grid_sample", "exportable", "cuda_ext", "mx_driving")

# Import names tried for the reference's compiled CUDA op (TORCH_EXTENSION_NAME in its setup.py); the reference
# imports it relatively from projects/mmdet3d_plugin/ops, so it is found here when built on sys.path or next to
# this file.
CUDA_EXT_MODULES: Tuple[str, ...] = ("deformable_aggregation_ext",) + (
    (f"{__package__}.deformable_aggregation_ext",) if __package__ else ()
)

# Devices whose torch.sparse CSR kernels (matmul, transpose matmul, sampled_addmm) the torch backend uses.
_SPARSE_DEVICE_TYPES = ("cpu", "cuda")

# What mx_driving's deformable aggregation takes (Ascend/DrivingSDK 9c2fb9ea): the C++ entry point
# (mx_driving/csrc/DeformableAggregation.cpp) checks the dims and `num_groups % 8 == 0`; its documentation
# (docs/api/context/deformable_aggregation.md, its constraints section, which also binds the backward) states the limits
# below. Its batch and element-count limits (bs <= 128, 1.5e8 elements per tensor) are not checked here: they grow with
# the user's batch, and the port itself trains 12 per device through the op (2.8e8 feature elements at 256 x 704).
MX_DRIVING_GROUP_MULTIPLE = 8
MX_DRIVING_LIMITS = {
    "num_groups": 8,  # "group = 8"
    "channels": 256,  # "c <= 256"
    "channels_per_group_multiple": 8,  # "c / group is a multiple of 8"
    "num_cams": 6,  # "cam <= 6"
    "num_levels": 4,  # "scale <= 4"
    "num_anchor": 2048,  # "anchor <= 2048"
    "num_pts": 2048,  # "pts <= 2048"
}

# Reasons "auto" already warned about (one RuntimeWarning per distinct reason and process).
_FALLBACK_WARNED: Set[str] = set()


# ----------------------------------------------------------------------------------------------------------------
# Input checks and shapes
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(
    feature_maps: Sequence[torch.Tensor], points_2d: torch.Tensor, weights: torch.Tensor
) -> Tuple[int, int, int, int, int, int, int]:
    """Validates the shapes; returns (bs, num_anchor, num_pts, num_cams, num_levels, num_groups, C)."""
    if not isinstance(feature_maps, (list, tuple)) or len(feature_maps) == 0:
        raise ValueError("feature_maps must be a non-empty list of (bs, num_cams, C, H, W) tensors, one per level")
    if points_2d.dim() != 5 or points_2d.shape[-1] != 2:
        raise ValueError(
            f"points_2d must be (bs, num_anchor, num_pts, num_cams, 2), got shape {tuple(points_2d.shape)}"
        )
    bs, num_anchor, num_pts, num_cams, _ = points_2d.shape
    for level, fm in enumerate(feature_maps):
        if fm.dim() != 5:
            raise ValueError(f"feature_maps[{level}] must be (bs, num_cams, C, H, W), got shape {tuple(fm.shape)}")
        if fm.shape[:3] != feature_maps[0].shape[:3]:
            raise ValueError(
                f"feature_maps[{level}] has (bs, num_cams, C) = {tuple(fm.shape[:3])}, "
                f"level 0 has {tuple(feature_maps[0].shape[:3])}"
            )
    fm_bs, fm_cams, channels = feature_maps[0].shape[:3]
    if (fm_bs, fm_cams) != (bs, num_cams):
        raise ValueError(f"feature_maps have (bs, num_cams) = {(fm_bs, fm_cams)} but points_2d has {(bs, num_cams)}")
    num_levels = len(feature_maps)
    if weights.dim() != 6 or tuple(weights.shape[:4]) != (bs, num_anchor, num_pts, num_cams):
        raise ValueError(
            f"weights must be (bs, num_anchor, num_pts, num_cams, num_levels, num_groups) = "
            f"({bs}, {num_anchor}, {num_pts}, {num_cams}, {num_levels}, num_groups), got {tuple(weights.shape)}"
        )
    if weights.shape[4] != num_levels:
        raise ValueError(f"weights have {weights.shape[4]} levels but {num_levels} feature maps were given")
    num_groups = weights.shape[5]
    if num_groups == 0 or channels % num_groups != 0:
        raise ValueError(f"the channel count ({channels}) must be divisible by num_groups ({num_groups})")
    return bs, num_anchor, num_pts, num_cams, num_levels, num_groups, channels


def _spatial_shapes(feature_maps: Sequence[torch.Tensor]) -> List[Tuple[int, int]]:
    """[(H_l, W_l)] per level."""
    return [(int(fm.shape[-2]), int(fm.shape[-1])) for fm in feature_maps]


# ----------------------------------------------------------------------------------------------------------------
# Plain formulation (benchmark baseline)
# ----------------------------------------------------------------------------------------------------------------


def deformable_aggregation_grid_sample(
    feature_maps: Sequence[torch.Tensor], points_2d: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The plain formulation: ``grid_sample`` every level of every camera at every key point, then a weighted sum.

    Same computation as the reference's CPU fallback (``feature_sampling`` + ``multi_view_level_fusion`` + the
    sum over points in its ``DeformableFeatureAggregation``, points already projected); not the op's border rule.

    Args:
        feature_maps: one (bs, num_cams, C, H_l, W_l) tensor per level.
        points_2d: (bs, num_anchor, num_pts, num_cams, 2) normalised image coordinates (x / W, y / H).
        weights: (bs, num_anchor, num_pts, num_cams, num_levels, num_groups).

    Returns:
        (bs, num_anchor, C)
    """
    bs, num_anchor, num_pts, num_cams, num_levels, num_groups, channels = _check_inputs(
        feature_maps, points_2d, weights
    )
    grid = (points_2d * 2 - 1).permute(0, 3, 1, 2, 4).flatten(0, 1)  # (bs * num_cams, num_anchor, num_pts, 2)
    sampled = torch.stack(
        [
            F.grid_sample(fm.flatten(0, 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            for fm in feature_maps
        ],
        dim=1,
    )  # (bs * num_cams, num_levels, C, num_anchor, num_pts)
    sampled = sampled.reshape(
        bs, num_cams, num_levels, num_groups, channels // num_groups, num_anchor, num_pts
    ).permute(0, 5, 6, 1, 2, 3, 4)  # (bs, num_anchor, num_pts, num_cams, num_levels, num_groups, C / num_groups)
    out = (weights[..., None] * sampled).sum(dim=(2, 3, 4))  # (bs, num_anchor, num_groups, C / num_groups)
    return out.reshape(bs, num_anchor, channels)


def deformable_aggregation_exportable(
    feature_maps: Sequence[torch.Tensor], points_2d: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The op's semantics in operators every ONNX runtime has (GridSample, opset 16, and element-wise ops): what
    ``model.export`` traces. ``grid_sample`` per level over every camera, with the (point, camera) pairs that the op
    skips (normalised x or y not strictly inside (0, 1)) given weight 0 first, so the half-pixel band that
    ``grid_sample`` still blends with the padding contributes nothing. Equal to the op up to float rounding, in
    values and gradients (tests/test_deformable_aggregation.py against the kernel oracle); it materialises one
    (bs * num_cams, C, num_anchor, num_pts) sample per level, so it is the deployment formulation, not the
    training one.

    Args and returns as :func:`deformable_aggregation_grid_sample`.
    """
    bs, num_anchor, num_pts, num_cams, num_levels, num_groups, channels = _check_inputs(
        feature_maps, points_2d, weights
    )
    x, y = points_2d[..., 0], points_2d[..., 1]
    inside = (x > 0) & (x < 1) & (y > 0) & (y < 1)  # (bs, num_anchor, num_pts, num_cams)
    weights = weights * inside[..., None, None].to(weights.dtype)
    # (bs, num_anchor, num_pts, num_cams, num_levels, num_groups) -> (bs, num_cams, num_levels, num_groups, 1, A, P)
    weights = weights.permute(0, 3, 4, 5, 1, 2).unsqueeze(4)
    grid = (points_2d * 2 - 1).permute(0, 3, 1, 2, 4).flatten(0, 1)  # (bs * num_cams, num_anchor, num_pts, 2)
    out = None
    for level, fm in enumerate(feature_maps):
        sampled = F.grid_sample(fm.flatten(0, 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.reshape(bs, num_cams, num_groups, channels // num_groups, num_anchor, num_pts)
        term = (sampled * weights[:, :, level]).sum(dim=(1, 5))  # (bs, num_groups, C / num_groups, num_anchor)
        out = term if out is None else out + term
    return out.reshape(bs, channels, num_anchor).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Channel-last flattened features (layout of the compiled ops, also used by the torch backend)
# ----------------------------------------------------------------------------------------------------------------


def _transpose_levels_to_rows(feature_maps: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Writes channel-first levels into channel-last rows.

    feature_maps: levels of (bs, num_cams, C, H_l, W_l); out: (bs, num_cams, sum(H_l * W_l), C).
    One 2D transpose per (batch, camera, level): torch's blocked transpose copy is several times faster than a
    permute of the 5D tensor.
    """
    bs, num_cams, channels = feature_maps[0].shape[:3]
    for b in range(bs):
        for n in range(num_cams):
            start = 0
            for fm in feature_maps:
                hw = fm.shape[-2] * fm.shape[-1]
                out[b, n, start : start + hw].copy_(fm[b, n].reshape(channels, hw).t())
                start += hw
    return out


def _transpose_rows_to_levels(
    rows: torch.Tensor, shapes: Sequence[Tuple[int, int]], dtypes: Sequence[torch.dtype]
) -> List[torch.Tensor]:
    """Inverse of :func:`_transpose_levels_to_rows`: (bs, num_cams, sum(H*W), C) -> levels of (bs, num_cams, C, H, W)."""
    bs, num_cams, _, channels = rows.shape
    levels = [rows.new_empty((bs, num_cams, channels, h, w), dtype=dt) for (h, w), dt in zip(shapes, dtypes)]
    for b in range(bs):
        for n in range(num_cams):
            start = 0
            for (h, w), level in zip(shapes, levels):
                level[b, n].view(channels, h * w).copy_(rows[b, n, start : start + h * w].t())
                start += h * w
    return levels


class _FlattenFeatures(torch.autograd.Function):
    """Levels of (bs, num_cams, C, H_l, W_l) -> (bs, num_cams * sum(H_l * W_l), C), differentiable."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *feature_maps: torch.Tensor) -> torch.Tensor:
        bs, num_cams, channels = feature_maps[0].shape[:3]
        shapes = _spatial_shapes(feature_maps)
        ctx.shapes = shapes
        ctx.dtypes = [fm.dtype for fm in feature_maps]
        total = sum(h * w for h, w in shapes)
        rows = feature_maps[0].new_empty((bs, num_cams, total, channels), dtype=dtype)
        _transpose_levels_to_rows(feature_maps, rows)
        return rows.view(bs, num_cams * total, channels)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_rows: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        total = sum(h * w for h, w in ctx.shapes)
        bs, _, channels = grad_rows.shape
        grads = _transpose_rows_to_levels(grad_rows.reshape(bs, -1, total, channels), ctx.shapes, ctx.dtypes)
        return (None, *grads)


def flatten_feature_maps(
    feature_maps: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattens the levels the way the compiled ops (CUDA ext, mx_driving) expect them.

    Args:
        feature_maps: one (bs, num_cams, C, H_l, W_l) tensor per level.
        dtype: dtype of the flattened features (default: that of level 0).

    Returns:
        mc_ms_feat: (bs, num_cams * sum(H_l * W_l), C); row ``n * sum(H*W) + scale_start_index... `` holds the
            C channels of one pixel: camera-major, then level, then row-major pixel.
        spatial_shape: (num_cams, num_levels, 2) int32, (H_l, W_l) per camera and level.
        scale_start_index: (num_cams, num_levels) int32, first row of (camera, level) inside a batch element.
    Differentiable w.r.t. the feature maps.
    """
    bs, num_cams, _ = feature_maps[0].shape[:3]
    shapes = _spatial_shapes(feature_maps)
    device = feature_maps[0].device
    mc_ms_feat = _FlattenFeatures.apply(dtype or feature_maps[0].dtype, *feature_maps)
    spatial_shape = torch.tensor([shapes] * num_cams, dtype=torch.int32, device=device)  # (num_cams, levels, 2)
    sizes = spatial_shape[..., 0].long() * spatial_shape[..., 1].long()  # (num_cams, num_levels)
    scale_start_index = (sizes.flatten().cumsum(0) - sizes.flatten()).reshape(sizes.shape).to(torch.int32)
    return mc_ms_feat, spatial_shape, scale_start_index


class FlattenedFeatures:
    """One frame's image features, flattened once for every aggregation that reads them.

    Holds the levels, one (bs, num_cams, C, H_l, W_l) tensor each (the grid_sample backend and the shape checks
    read them), and their :func:`flatten_feature_maps` triple per dtype, made on first use and kept: every decoder
    layer then reads the same flattened tensor, so a frame makes one channel-last copy (not one per layer) and
    autograd runs one backward from it into the levels, however many layers add to its gradient.
    A separate triple is kept per grad mode, so a flattening made under no_grad never cuts a later graph.
    """

    def __init__(self, feature_maps: Sequence[torch.Tensor]) -> None:
        self.feature_maps = feature_maps
        self._flattened: Dict[Tuple[torch.dtype, bool], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def flattened(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mc_ms_feat, spatial_shape, scale_start_index) in ``dtype``, as :func:`flatten_feature_maps` returns them."""
        key = (dtype, torch.is_grad_enabled())
        if key not in self._flattened:
            self._flattened[key] = flatten_feature_maps(self.feature_maps, dtype=dtype)
        return self._flattened[key]


Features = Union[Sequence[torch.Tensor], FlattenedFeatures]


def _as_flattened(feature_maps: Features) -> FlattenedFeatures:
    """A frame's features as given, or the levels to be flattened in this call only."""
    return feature_maps if isinstance(feature_maps, FlattenedFeatures) else FlattenedFeatures(feature_maps)


# ----------------------------------------------------------------------------------------------------------------
# Torch fast path
# ----------------------------------------------------------------------------------------------------------------


class _Plan:
    """Which (batch, anchor, point, camera) triples are sampled, and their bilinear corners.

    Built from points only (no grad). T = number of triples the compiled op samples: normalised x and y
    strictly inside (0, 1). Tensors:

        mask   (bs, num_anchor, num_pts, num_cams) bool, the selected triples
        row    (T,) int64, output row b * num_anchor + a of each triple
        index  (T, num_levels, 4) int64, feature row (inside one flattened batch) of each corner
                  corners: (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1); clamped when outside
        bil    (T, num_levels, 4) bilinear weight of each corner, 0 where the corner is outside the map
        dbx, dby (T, num_levels, 4) d bil / d (normalised x, y)
    """

    def __init__(
        self, points_2d: torch.Tensor, shapes: Sequence[Tuple[int, int]], num_cams: int, dtype: torch.dtype
    ) -> None:
        bs, num_anchor, num_pts = points_2d.shape[:3]
        device = points_2d.device
        heights = torch.tensor([h for h, _ in shapes], dtype=dtype, device=device)  # (num_levels,)
        widths = torch.tensor([w for _, w in shapes], dtype=dtype, device=device)
        # The compiled op's rule: a (point, camera) whose normalised x or y is not strictly inside (0, 1) is
        # skipped at every level; otherwise pixel = loc * size - 0.5, written as the kernel computes it.
        points = points_2d.to(dtype)
        x, y = points[..., 0], points[..., 1]  # (bs, num_anchor, num_pts, num_cams)
        self.mask = (x > 0) & (x < 1) & (y > 0) & (y < 1)
        ix = x[..., None] * widths - 0.5  # (bs, num_anchor, num_pts, num_cams, num_levels)
        iy = y[..., None] * heights - 0.5
        triple = self.mask.nonzero()  # (T, 4): b, a, p, n
        self.num = triple.shape[0]
        self.row = triple[:, 0] * num_anchor + triple[:, 1]  # (T,)
        ix, iy = ix[self.mask], iy[self.mask]  # (T, num_levels)

        x0f, y0f = ix.floor(), iy.floor()
        fx, fy = ix - x0f, iy - y0f  # (T, num_levels)
        x0, y0 = x0f.long(), y0f.long()
        xs = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)  # (T, num_levels, 4)
        ys = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
        w_max = torch.tensor([w - 1 for _, w in shapes], device=device)[:, None]  # (num_levels, 1)
        h_max = torch.tensor([h - 1 for h, _ in shapes], device=device)[:, None]
        valid = ((xs >= 0) & (xs <= w_max) & (ys >= 0) & (ys <= h_max)).to(dtype)  # (T, num_levels, 4)

        gx, gy = 1 - fx, 1 - fy
        self.bil = torch.stack([gx * gy, fx * gy, gx * fy, fx * fy], dim=-1) * valid
        # d ix / d x = W, d iy / d y = H
        wl, hl = widths[:, None], heights[:, None]
        self.dbx = torch.stack([-gy, gy, -fy, fy], dim=-1) * valid * wl
        self.dby = torch.stack([-gx, -fx, gx, fx], dim=-1) * valid * hl

        sizes = [h * w for h, w in shapes]
        total = sum(sizes)
        level_start = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], device=device)[:, None]
        cam_row = (triple[:, 0] * num_cams + triple[:, 3]) * total  # (T,)
        self.index = (
            cam_row[:, None, None]
            + level_start
            + ys.clamp(min=0).minimum(h_max) * (w_max + 1)
            + xs.clamp(min=0).minimum(w_max)
        )  # (T, num_levels, 4)
        self.num_rows = bs * num_cams * total  # feature rows of all batch elements


def _csr(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: Tuple[int, int], index_dtype: torch.dtype
) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta state"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow.to(index_dtype), col.to(index_dtype), values, size=size)


class _SparseKernels:
    """The three products of the torch backend as torch.sparse CSR kernels.

    With K = num_levels * 4 corners per triple, S is the (T * G, num_rows * G) matrix whose row t * G + g holds,
    at column index[t, k] * G + g, the coefficient coef[t, g, k] = weights[t, k // 4, g] * bil[t, k]. The
    channel-last features (num_rows, C) viewed as (num_rows * G, C / G) then give the per-triple output as
    S @ features, the feature gradient as S^T @ grad, and the per-corner dot products as sampled_addmm.
    """

    def __init__(self, index: torch.Tensor, coef: torch.Tensor, num_rows: int, num_groups: int) -> None:
        self.num, self.k = index.shape[0], index.shape[1] * index.shape[2]
        self.groups, self.num_rows = num_groups, num_rows
        self.index = index.reshape(self.num, self.k)  # (T, K)
        self.coef = coef  # (T, G, K)
        big = max(num_rows, self.num) * num_groups * max(self.k, 1)
        self.index_dtype = torch.int32 if big < 2**31 - 1 else torch.int64
        device = index.device
        group = torch.arange(num_groups, device=device)
        crow = torch.arange(0, self.num * num_groups * self.k + 1, self.k, device=device)
        col = (self.index[:, None, :] * num_groups + group[None, :, None]).reshape(-1)  # (T * G * K,)
        self.matrix = _csr(
            crow, col, coef.reshape(-1), (self.num * num_groups, num_rows * num_groups), self.index_dtype
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (num_rows, C) -> (T, C)."""
        out = self.matrix @ features.view(self.num_rows * self.groups, -1)  # (T * G, C / G)
        return out.view(self.num, -1)

    def grad_features(self, grad: torch.Tensor) -> torch.Tensor:
        """grad (T, C) of the per-triple output -> (num_rows, C) gradient of the features (S^T @ grad)."""
        groups, k, num = self.groups, self.k, self.num
        device = grad.device
        flat = self.index.reshape(-1)  # (T * K,) feature row of every corner
        sorted_rows, order = torch.sort(flat)
        count = torch.bincount(flat, minlength=self.num_rows)  # (num_rows,)
        start = count.cumsum(0) - count
        first = start[sorted_rows]  # (T * K,) first sorted position of the same feature row
        rank = torch.arange(flat.numel(), device=device) - first
        group = torch.arange(groups, device=device)
        # transposed matrix, row r * G + g: the corners of feature row r, for group g
        position = (first * groups + rank)[:, None] + group[None, :] * count[sorted_rows][:, None]  # (T * K, G)
        triple = torch.div(order, k, rounding_mode="floor")  # (T * K,)
        values = torch.empty(flat.numel() * groups, dtype=self.coef.dtype, device=device)
        values[position.reshape(-1)] = self.coef.permute(0, 2, 1).reshape(num * k, groups)[order].reshape(-1)
        col = torch.empty(flat.numel() * groups, dtype=torch.int64, device=device)
        col[position.reshape(-1)] = (triple[:, None] * groups + group[None, :]).reshape(-1)
        crow = torch.zeros(self.num_rows * groups + 1, dtype=torch.int64, device=device)
        torch.cumsum(count.repeat_interleave(groups), 0, out=crow[1:])
        transposed = _csr(crow, col, values, (self.num_rows * groups, num * groups), self.index_dtype)
        out = transposed @ grad.reshape(num * groups, -1)  # (num_rows * G, C / G)
        return out.view(self.num_rows, -1)

    def corner_dots(self, grad: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(T, G, K): dot(grad[t, group g], features[index[t, k], group g])."""
        groups = self.groups
        dots = torch.sparse.sampled_addmm(
            self.matrix,
            grad.reshape(self.num * groups, -1),
            features.view(self.num_rows * groups, -1).t(),
            beta=0.0,
        )
        return dots.values().view(self.num, groups, self.k)


class _GatherKernels:
    """The same three products with index_select / index_add_ (any device), one corner at a time."""

    def __init__(self, index: torch.Tensor, coef: torch.Tensor, num_rows: int, num_groups: int) -> None:
        self.num, self.k = index.shape[0], index.shape[1] * index.shape[2]
        self.groups, self.num_rows = num_groups, num_rows
        self.index = index.reshape(self.num, self.k)  # (T, K)
        self.coef = coef  # (T, G, K)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = features.new_zeros((self.num, self.groups, features.shape[1] // self.groups))  # (T, G, C / G)
        for k in range(self.k):
            rows = features.index_select(0, self.index[:, k]).view(out.shape)
            out.addcmul_(rows, self.coef[:, :, k, None])
        return out.view(self.num, -1)

    def grad_features(self, grad: torch.Tensor) -> torch.Tensor:
        out = grad.new_zeros((self.num_rows, grad.shape[1]))
        grad = grad.view(self.num, self.groups, -1)
        for k in range(self.k):
            out.index_add_(0, self.index[:, k], (grad * self.coef[:, :, k, None]).view(self.num, -1))
        return out

    def corner_dots(self, grad: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        grad = grad.view(self.num, self.groups, -1)
        dots = grad.new_empty((self.num, self.groups, self.k))
        for k in range(self.k):
            rows = features.index_select(0, self.index[:, k]).view(grad.shape)
            dots[:, :, k] = (rows * grad).sum(-1)
        return dots


class _TorchAggregation(torch.autograd.Function):
    """Sparse aggregation on channel-last features; hand-written backward (no double backward)."""

    @staticmethod
    def forward(
        ctx: Any,
        shapes: List[Tuple[int, int]],
        use_sparse: bool,
        mc_ms_feat: torch.Tensor,
        points_2d: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        # mc_ms_feat (bs, num_cams * sum(H*W), C); points_2d (bs, A, P, N, 2); weights (bs, A, P, N, L, G)
        bs, num_anchor, _, num_cams = points_2d.shape[:4]
        num_groups = weights.shape[-1]
        channels = mc_ms_feat.shape[-1]
        dtype = mc_ms_feat.dtype
        plan = _Plan(points_2d, shapes, num_cams, dtype)
        ctx.plan, ctx.kernels, ctx.picked = plan, None, None
        ctx.points_meta = (points_2d.shape, points_2d.dtype)
        ctx.weights_meta = (weights.shape, weights.dtype)
        out = mc_ms_feat.new_zeros((bs * num_anchor, channels))
        if plan.num > 0:
            features = mc_ms_feat.reshape(-1, channels)  # (num_rows, C)
            picked = weights[plan.mask].to(dtype)  # (T, L, G)
            coef = (picked.transpose(1, 2)[..., None] * plan.bil[:, None]).flatten(2)  # (T, G, L * 4)
            kernels_cls = _SparseKernels if use_sparse else _GatherKernels
            ctx.kernels = kernels_cls(plan.index, coef, plan.num_rows, num_groups)
            ctx.picked = picked
            out.index_add_(0, plan.row, ctx.kernels.forward(features))
        ctx.save_for_backward(mc_ms_feat)
        return out.view(bs, num_anchor, channels)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        need_feat, need_points, need_weights = ctx.needs_input_grad[2:5]
        (mc_ms_feat,) = ctx.saved_tensors
        (points_shape, points_dtype), (weights_shape, weights_dtype) = ctx.points_meta, ctx.weights_meta
        plan, kernels = ctx.plan, ctx.kernels
        grad_feat = torch.zeros_like(mc_ms_feat) if need_feat else None
        grad_points = grad_out.new_zeros(points_shape, dtype=points_dtype) if need_points else None
        grad_weights = grad_out.new_zeros(weights_shape, dtype=weights_dtype) if need_weights else None
        if kernels is None:  # no triple can be sampled: every gradient is zero
            return None, None, grad_feat, grad_points, grad_weights
        channels = mc_ms_feat.shape[-1]
        grad_t = grad_out.reshape(-1, channels).to(mc_ms_feat.dtype).index_select(0, plan.row)  # (T, C)
        if need_feat:
            grad_feat = kernels.grad_features(grad_t).view(mc_ms_feat.shape)
        if need_points or need_weights:
            num_levels, num_groups = weights_shape[-2:]
            dots = kernels.corner_dots(grad_t, mc_ms_feat.reshape(-1, channels))
            dots = dots.view(plan.num, num_groups, num_levels, 4)  # (T, G, L, 4)
            if need_weights:
                grad_picked = (dots * plan.bil[:, None]).sum(-1).transpose(1, 2)  # (T, L, G)
                grad_weights[plan.mask] = grad_picked.to(weights_dtype)
            if need_points:
                per_corner = (dots * ctx.picked.transpose(1, 2)[..., None]).sum(1)  # (T, L, 4)
                grad_xy = torch.stack(
                    [(per_corner * plan.dbx).sum((1, 2)), (per_corner * plan.dby).sum((1, 2))], dim=-1
                )  # (T, 2)
                grad_points[plan.mask] = grad_xy.to(points_dtype)
        return None, None, grad_feat, grad_points, grad_weights


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _result_dtype(feature_maps: Sequence[torch.Tensor], points_2d: torch.Tensor, weights: torch.Tensor) -> torch.dtype:
    """The dtype every backend returns: the inputs' promoted dtype, whatever it computed in."""
    return torch.promote_types(torch.promote_types(feature_maps[0].dtype, points_2d.dtype), weights.dtype)


def _torch_aggregation(
    feature_maps: Features,
    points_2d: torch.Tensor,
    weights: torch.Tensor,
    use_sparse: Optional[bool] = None,
) -> torch.Tensor:
    """The pure PyTorch fast path; (bs, num_anchor, C) in the inputs' promoted dtype."""
    features = _as_flattened(feature_maps)
    levels = features.feature_maps
    dtype = _compute_dtype(levels[0].dtype, points_2d.dtype, weights.dtype)
    if use_sparse is None:
        use_sparse = points_2d.device.type in _SPARSE_DEVICE_TYPES
    mc_ms_feat = features.flattened(dtype)[0]
    out = _TorchAggregation.apply(_spatial_shapes(levels), use_sparse, mc_ms_feat, points_2d, weights)
    return out.to(_result_dtype(levels, points_2d, weights))


# ----------------------------------------------------------------------------------------------------------------
# Compiled backends (CUDA extension of the reference, Ascend mx_driving)
# ----------------------------------------------------------------------------------------------------------------


def _load_cuda_ext() -> Optional[Any]:
    """The reference's compiled op module, or None when it does not import."""
    for name in CUDA_EXT_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _load_mx_driving() -> Optional[Callable[..., torch.Tensor]]:
    """mx_driving's deformable aggregation (an autograd Function's apply), or None when it does not import."""
    try:
        mx_driving = importlib.import_module("mx_driving")
    except ImportError:
        return None
    for name in ("deformable_aggregation", "npu_deformable_aggregation"):
        fn = getattr(mx_driving, name, None)
        if fn is not None:
            return fn
    try:  # early DrivingSDK releases
        return importlib.import_module("mx_driving.fused").npu_deformable_aggregation
    except (ImportError, AttributeError):
        return None


class _CudaExtAggregation(torch.autograd.Function):
    """Autograd wrapper of ``deformable_aggregation_ext`` (float32, contiguous, int32 shape tensors)."""

    @staticmethod
    def forward(
        ctx: Any,
        ext: Any,
        mc_ms_feat: torch.Tensor,
        spatial_shape: torch.Tensor,
        scale_start_index: torch.Tensor,
        sampling_location: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        # mc_ms_feat (bs, N * sum(H*W), C); spatial_shape (N, L, 2); scale_start_index (N, L);
        # sampling_location (bs, A, P, N, 2); weights (bs, A, P, N, L, G) -> (bs, A, C)
        args = (
            mc_ms_feat.contiguous().float(),
            spatial_shape.contiguous().int(),
            scale_start_index.contiguous().int(),
            sampling_location.contiguous().float(),
            weights.contiguous().float(),
        )
        ctx.ext = ext
        ctx.save_for_backward(*args)
        return ext.deformable_aggregation_forward(*args)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights = ctx.saved_tensors
        grad_feat = torch.zeros_like(mc_ms_feat)
        grad_location = torch.zeros_like(sampling_location)
        grad_weights = torch.zeros_like(weights)
        ctx.ext.deformable_aggregation_backward(
            mc_ms_feat,
            spatial_shape,
            scale_start_index,
            sampling_location,
            weights,
            grad_out.contiguous().float(),
            grad_feat,
            grad_location,
            grad_weights,
        )
        return None, grad_feat, None, None, grad_location, grad_weights


def _compiled_aggregation(
    op: Callable[..., torch.Tensor],
    features: FlattenedFeatures,
    points_2d: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Calls ``op(mc_ms_feat, spatial_shape, scale_start_index, points, weights)`` on the float32 flattening."""
    bs, num_anchor = points_2d.shape[:2]
    mc_ms_feat, spatial_shape, scale_start_index = features.flattened(torch.float32)
    out = op(
        mc_ms_feat,
        spatial_shape,
        scale_start_index,
        points_2d.float().contiguous(),  # (bs, num_anchor, num_pts, num_cams, 2)
        weights.float().contiguous(),  # (bs, num_anchor, num_pts, num_cams, num_levels, num_groups)
    )
    return out.reshape(bs, num_anchor, -1).to(_result_dtype(features.feature_maps, points_2d, weights))


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def select_backend(device: torch.device | str) -> str:
    """The backend ``"auto"`` uses for tensors on ``device`` (before the shape checks of :func:`mx_driving_rejects`)."""
    device_type = torch.device(device).type
    if device_type == "npu" and _load_mx_driving() is not None:
        return "mx_driving"
    if device_type == "cuda" and _load_cuda_ext() is not None:
        return "cuda_ext"
    return "torch"


def mx_driving_rejects(
    feature_maps: Sequence[torch.Tensor], points_2d: torch.Tensor, weights: torch.Tensor
) -> Optional[str]:
    """Why mx_driving's deformable aggregation cannot take these inputs, or None when it can.

    Inputs as :func:`deformable_aggregation` takes them (already checked by it). The first reason found: the C++
    check (``num_groups % 8 == 0``), then the documented limits (:data:`MX_DRIVING_LIMITS`). The op's dtype and
    layout requirements (float32 features, points and weights, int32 shapes, contiguous) are met by
    :func:`flatten_feature_maps` and the casts of the compiled path, so they never reject.
    """
    bs, num_anchor, num_pts, num_cams = points_2d.shape[:4]
    num_levels, num_groups = weights.shape[4], weights.shape[5]
    channels = feature_maps[0].shape[2]
    op = "mx_driving's deformable aggregation"
    if num_groups % MX_DRIVING_GROUP_MULTIPLE:
        return f"{op} needs num_groups divisible by {MX_DRIVING_GROUP_MULTIPLE}, got {num_groups}"
    limits = MX_DRIVING_LIMITS
    if num_groups != limits["num_groups"]:
        return f"{op} is documented for num_groups = {limits['num_groups']} only, got {num_groups}"
    if (channels // num_groups) % limits["channels_per_group_multiple"]:
        return (
            f"{op} needs channels per group (C / num_groups) divisible by {limits['channels_per_group_multiple']}, "
            f"got {channels} / {num_groups}"
        )
    for name, value in (
        ("channels", channels),
        ("num_cams", num_cams),
        ("num_levels", num_levels),
        ("num_anchor", num_anchor),
        ("num_pts", num_pts),
    ):
        if value > limits[name]:
            return f"{op} is documented for {name} <= {limits[name]}, got {value}"
    return None


def _warn_once(message: str) -> None:
    if message not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)  # the caller of deformable_aggregation


def _auto_backend(feature_maps: Sequence[torch.Tensor], points_2d: torch.Tensor, weights: torch.Tensor) -> str:
    """The backend ``"auto"`` runs: :func:`select_backend`, then the torch backend where mx_driving cannot serve."""
    # the compiled ops compute in float32: float64 (the parity tests, gradcheck) stays on the torch backend
    if torch.float64 in (feature_maps[0].dtype, points_2d.dtype, weights.dtype):
        return "torch"
    backend = select_backend(points_2d.device)
    if backend == "mx_driving":
        reason = mx_driving_rejects(feature_maps, points_2d, weights)
        if reason is not None:
            _warn_once(f"{reason}: using the torch backend")
            return "torch"
    elif backend == "torch" and points_2d.device.type == "npu":
        _warn_once("mx_driving (Ascend DrivingSDK) does not import: using the torch backend on the NPU")
    return backend


def deformable_aggregation(
    feature_maps: Features,
    points_2d: torch.Tensor,
    weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted multi-point, multi-camera, multi-level bilinear feature aggregation of Sparse4Dv3.

    Args:
        feature_maps: one (bs, num_cams, C, H_l, W_l) tensor per level, flattened in this call; or a frame's
            :class:`FlattenedFeatures` of them, flattened once for all calls that pass it (same results).
        points_2d: (bs, num_anchor, num_pts, num_cams, 2) key points projected into every camera, normalised
            image coordinates (x / W, y / H); a (point, camera) not strictly inside (0, 1) x (0, 1) is skipped.
        weights: (bs, num_anchor, num_pts, num_cams, num_levels, num_groups); C must be divisible by num_groups.
        backend: "auto", "torch", "grid_sample", "exportable", "cuda_ext" or "mx_driving" (see the module docstring).

    Returns:
        (bs, num_anchor, C): for channel group g, the sum over points, cameras and levels of
        weights[..., g] * bilinear(feature_maps[level][b, cam, group g], points_2d) (zero padding, pixel
        loc * size - 0.5; the "grid_sample" backend also samples the half-pixel band outside).
        Differentiable w.r.t. the feature maps, the points and the weights.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    features = _as_flattened(feature_maps)
    levels = features.feature_maps
    _check_inputs(levels, points_2d, weights)
    if backend == "auto":
        backend = _auto_backend(levels, points_2d, weights)
    if backend == "grid_sample":
        return deformable_aggregation_grid_sample(levels, points_2d, weights)
    if backend == "exportable":
        return deformable_aggregation_exportable(levels, points_2d, weights)
    if backend == "torch":
        return _torch_aggregation(features, points_2d, weights)
    if backend == "cuda_ext":
        ext = _load_cuda_ext()
        if ext is None:
            raise RuntimeError(
                f"backend 'cuda_ext' needs the compiled deformable aggregation op; none of {CUDA_EXT_MODULES} imports"
            )
        return _compiled_aggregation(lambda *args: _CudaExtAggregation.apply(ext, *args), features, points_2d, weights)
    op = _load_mx_driving()
    if op is None:
        raise RuntimeError("backend 'mx_driving' needs mx_driving (Ascend DrivingSDK), which does not import")
    reason = mx_driving_rejects(levels, points_2d, weights)
    if reason is not None:
        raise ValueError(f"backend 'mx_driving' cannot take these inputs: {reason} (backend 'auto' or 'torch' can)")
    return _compiled_aggregation(op, features, points_2d, weights)
