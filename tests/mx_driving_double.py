"""A test double of Ascend DrivingSDK's ``mx_driving`` (its deformable aggregation only), runnable on a CPU.

What it copies from the seed (Ascend/DrivingSDK 9c2fb9ea, the commit of model_examples/Sparse4D):

* the entry points the port and our ``_load_mx_driving`` look up: ``mx_driving.deformable_aggregation`` and
  ``mx_driving.npu_deformable_aggregation`` (both ``AdsDeformableAggregation.apply``,
  ``mx_driving/ops/npu_deformable_aggregation.py``), ``mx_driving.fused.npu_deformable_aggregation`` (what
  ``Sparse4D.patch`` imports, ``mx_driving/fused.py``), and the bindings ``mx_driving._C.npu_deformable_aggregation``
  / ``npu_deformable_aggregation_backward`` (``mx_driving/csrc/pybind.cpp``);
* the Python wrapper: ``Exception("Erorr! Input Tensor can not be a empty Tensor.\\n")`` on empty features or
  weights, then ``.contiguous().float()`` / ``.contiguous().int()`` of every input (only with ``strict=False``: by
  default the double hands the inputs to ``_C`` as they come, so a caller that relies on these silent copies, or
  on float64 being cut to float32, fails); the backward's (..., 8) padded location-gradient buffer, cut by
  ``torch.chunk(..., 4, dim=-1)``;
* the C++ checks (``mx_driving/csrc/DeformableAggregation.cpp``), as ``RuntimeError`` (what TORCH_CHECK raises)
  with the same messages: every input an NPU tensor (only with ``require_npu=True``: the double runs on the CPU),
  ``mc_ms_feat.dim() == 3``, ``spatial_shape.dim() == 3``, ``scale_start_index.dim() == 2``,
  ``sampling_location.dim() == 5``, ``weights.dim() == 6``, and in the forward ``weights.sizes()[5] % 8 == 0``;
* the op definitions (``kernels/op_host/deformable_aggregation{,_grad}.cpp``): float32 features, locations,
  weights and gradients, int32 ``spatial_shape`` and ``scale_start_index``, ND layout; the kernel
  (``kernels/op_kernel/deformable_aggregation.cpp``) indexes them as dense row-major buffers, so the double also
  rejects non-contiguous tensors (RuntimeError, "aclnnDeformableAggregation: ...": the messages of the real
  aclnn layer differ);
* the kernel's arithmetic, which is the CUDA kernel's (location (x, y) = (w, h) order: ``locW`` is read first,
  although the API document says "y, x"; skip unless 0 < x, y < 1; pixel ``loc * size - 0.5``; zero padding; the
  channel's group weight): computed in float32 by ``tests/kernel_oracle.py`` on the (point, camera) pairs that
  sample (``oracle_forward`` / ``oracle_backward`` of ``tests/reference.py``; the backward is torch autograd
  through the oracle).

Beyond the real op, the double also rejects (RuntimeError, "[mx_driving double] ..."): shapes that disagree
(``spatial_shape`` (N, L, 2), ``scale_start_index`` (N, L), locations (bs, A, P, N, 2), ``num_feat`` = the sum of
H * W, channels divisible by the groups: the kernel reads out of bounds instead), and inputs outside the limits the
API document states (``docs/api/context/deformable_aggregation.md``: group = 8, c <= 256, c / group a multiple of 8,
cam <= 6, scale <= 4, anchor <= 2048, pts <= 2048; only with ``limits=True``, the default; not its bs <= 128 and
1.5e8 elements per tensor, which the port's own 12-per-device training exceeds).

Install it with :func:`install` (a pytest ``monkeypatch``): ``sys.modules["mx_driving"]`` (and ``mx_driving._C``,
``mx_driving.fused``) become the double, whose ``calls`` list records every wrapper call.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from tests.reference import oracle_backward, oracle_forward

SEED_COMMIT = "9c2fb9ea"
ENTRY_POINTS = ("deformable_aggregation", "npu_deformable_aggregation", "fused")
EMPTY_MESSAGE = "Erorr! Input Tensor can not be a empty Tensor.\n"  # sic, mx_driving/ops/npu_deformable_aggregation.py
LIMITS = {  # docs/api/context/deformable_aggregation.md, its constraints section
    "channels": 256,
    "num_cams": 6,
    "num_levels": 4,
    "num_anchor": 2048,
    "num_pts": 2048,
    "num_groups": 8,
    "channels_per_group_multiple": 8,
}
NAMES = ("mc_ms_feat", "spatial_shape", "scale_start_index", "sampling_location", "weights")
DIMS = (3, 3, 2, 5, 6)
DTYPES = (torch.float32, torch.int32, torch.int32, torch.float32, torch.float32)


def _check(condition: bool, message: str) -> None:
    """TORCH_CHECK: a c10::Error, which Python sees as RuntimeError."""
    if not condition:
        raise RuntimeError(message)


def check_inputs(
    tensors: Sequence[torch.Tensor], backward: bool = False, require_npu: bool = False, limits: bool = True
) -> Tuple[int, ...]:
    """The op's checks on (mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights[, grad_output]).

    Returns (bs, num_feat, C, num_anchor, num_pts, num_cams, num_levels, num_groups).
    """
    names = NAMES + (("grad_output",) if backward else ())
    if require_npu:  # TORCH_CHECK_NPU (include/csrc/common.h)
        for name, tensor in zip(names, tensors):
            _check(tensor.device.type == "npu", f"{name} must be NPU tensor")
    for name, tensor, dim in zip(NAMES, tensors, DIMS):  # DeformableAggregation.cpp
        _check(tensor.dim() == dim, f"{name}.dim() must be {dim}, but got: {tensor.dim()}")
    mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights = tensors[:5]
    bs, num_feat, channels = mc_ms_feat.shape
    num_anchor, num_pts, num_cams, num_levels, num_groups = weights.shape[1:]
    if not backward:
        _check(num_groups % 8 == 0, f"weights.sizes()[5] must be multiple of 8, but got: {num_groups}")
    op = "aclnnDeformableAggregation" + ("Grad" if backward else "")
    dtypes = DTYPES + ((torch.float32,) if backward else ())
    for name, tensor, dtype in zip(names, tensors, dtypes):  # op_host: DataType DT_FLOAT / DT_INT32, FORMAT_ND
        _check(tensor.dtype == dtype, f"{op}: {name} must be {dtype} (the op's only dtype), got {tensor.dtype}")
        _check(tensor.is_contiguous(), f"{op}: {name} must be contiguous (the kernel reads a dense row-major buffer)")

    double = "[mx_driving double]"
    expected = {
        "spatial_shape": (num_cams, num_levels, 2),
        "scale_start_index": (num_cams, num_levels),
        "sampling_location": (bs, num_anchor, num_pts, num_cams, 2),
        "weights": (bs, num_anchor, num_pts, num_cams, num_levels, num_groups),
    }
    if backward:
        expected["grad_output"] = (bs, num_anchor, channels)
    for name, tensor in zip(names, tensors):
        if name in expected:
            _check(
                tuple(tensor.shape) == expected[name],
                f"{double} {name} must be {expected[name]}, got {tuple(tensor.shape)}",
            )
    _check(channels % num_groups == 0, f"{double} C ({channels}) must be divisible by the groups ({num_groups})")
    sizes = spatial_shape[..., 0].long() * spatial_shape[..., 1].long()  # (N, L)
    _check(bool((sizes > 0).all()), f"{double} every (H, W) of spatial_shape must be positive")
    ends = scale_start_index.long() + sizes
    _check(
        bool((scale_start_index >= 0).all()) and int(ends.max()) <= num_feat,
        f"{double} spatial_shape and scale_start_index reach past num_feat ({num_feat})",
    )
    _check(
        int(sizes.sum()) == num_feat, f"{double} num_feat ({num_feat}) must be the sum of H * W ({int(sizes.sum())})"
    )
    if limits:
        documented = f"{double} outside the documented constraints (docs/api/context/deformable_aggregation.md):"
        _check(num_groups == LIMITS["num_groups"], f"{documented} group = 8, got {num_groups}")
        _check(
            (channels // num_groups) % LIMITS["channels_per_group_multiple"] == 0,
            f"{documented} c / group a multiple of 8, got {channels} / {num_groups}",
        )
        for name, value in (
            ("channels", channels),
            ("num_cams", num_cams),
            ("num_levels", num_levels),
            ("num_anchor", num_anchor),
            ("num_pts", num_pts),
        ):
            _check(value <= LIMITS[name], f"{documented} {name} <= {LIMITS[name]}, got {value}")
    return bs, num_feat, channels, num_anchor, num_pts, num_cams, num_levels, num_groups


def make_module(
    strict: bool = True,
    require_npu: bool = False,
    limits: bool = True,
    entry_points: Sequence[str] = ENTRY_POINTS,
) -> types.ModuleType:
    """A fresh ``mx_driving`` double (with ``_C`` and, when "fused" is among ``entry_points``, ``fused``).

    strict: the wrapper passes its inputs to ``_C`` unconverted (default); False: it converts them as the real one.
    require_npu: the C++ TORCH_CHECK_NPU (inputs on the CPU then raise). limits: enforce the documented limits.
    entry_points: which of "deformable_aggregation", "npu_deformable_aggregation", "fused" exist (older releases).
    """
    calls: List[Dict[str, Any]] = []
    binding = types.ModuleType("mx_driving._C")
    binding.__doc__ = "Test double of mx_driving's compiled bindings (tests/mx_driving_double.py)."

    def npu_deformable_aggregation(
        mc_ms_feat: torch.Tensor,
        spatial_shape: torch.Tensor,
        scale_start_index: torch.Tensor,
        sampling_location: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        args = (mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)
        check_inputs(args, require_npu=require_npu, limits=limits)
        with torch.no_grad():
            return oracle_forward(*args)

    def npu_deformable_aggregation_backward(
        mc_ms_feat: torch.Tensor,
        spatial_shape: torch.Tensor,
        scale_start_index: torch.Tensor,
        sampling_location: torch.Tensor,
        weights: torch.Tensor,
        grad_output: torch.Tensor,
        grad_mc_ms_feat: torch.Tensor,
        grad_sampling_location: torch.Tensor,
        grad_weights: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        args = (mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)
        check_inputs((*args, grad_output), backward=True, require_npu=require_npu, limits=limits)
        _check(grad_sampling_location.shape[:-1] == sampling_location.shape[:-1], "grad_sampling_location: bad shape")
        grads = oracle_backward(*args, grad_output)
        grad_mc_ms_feat.add_(grads[0])
        grad_sampling_location[..., :2].add_(grads[1])  # the wrapper's buffer is padded to (..., 8)
        grad_weights.add_(grads[2])
        return grad_mc_ms_feat, grad_sampling_location, grad_weights

    binding.npu_deformable_aggregation = npu_deformable_aggregation
    binding.npu_deformable_aggregation_backward = npu_deformable_aggregation_backward

    class AdsDeformableAggregation(torch.autograd.Function):
        """mx_driving/ops/npu_deformable_aggregation.py, with the double's ``_C``."""

        @staticmethod
        def forward(ctx, mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights):
            args = (mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)
            calls.append(
                dict(
                    dtypes=tuple(t.dtype for t in args),
                    contiguous=tuple(t.is_contiguous() for t in args),
                    shapes=tuple(tuple(t.shape) for t in args),
                    device=mc_ms_feat.device.type,
                )
            )
            if torch.numel(mc_ms_feat) == 0 or torch.numel(weights) == 0:
                raise Exception(EMPTY_MESSAGE)
            if not strict:
                args = (
                    mc_ms_feat.contiguous().float(),
                    spatial_shape.contiguous().int(),
                    scale_start_index.contiguous().int(),
                    sampling_location.contiguous().float(),
                    weights.contiguous().float(),
                )
            output = binding.npu_deformable_aggregation(*args)
            ctx.save_for_backward(*args)
            return output

        @staticmethod
        def backward(ctx, grad_output):
            mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights = ctx.saved_tensors
            if torch.numel(mc_ms_feat) == 0 or torch.numel(spatial_shape) == 0 or torch.numel(sampling_location) == 0:
                raise Exception(EMPTY_MESSAGE)
            grad_mc_ms_feat = torch.zeros_like(mc_ms_feat)
            padding = torch.zeros((*sampling_location.shape[:4], 8), device=mc_ms_feat.device)
            grad_weights = torch.zeros_like(weights)
            grad_mc_ms_feat, _, grad_weights = binding.npu_deformable_aggregation_backward(
                mc_ms_feat,
                spatial_shape,
                scale_start_index,
                sampling_location,
                weights,
                grad_output.contiguous(),
                grad_mc_ms_feat,
                padding,
                grad_weights,
            )
            grad_sampling_location = torch.chunk(padding, 4, dim=-1)[0]
            return grad_mc_ms_feat, None, None, grad_sampling_location, grad_weights

    module = types.ModuleType("mx_driving")
    module.__doc__ = "Test double of Ascend DrivingSDK's mx_driving (tests/mx_driving_double.py)."
    module._C = binding
    module.calls = calls
    module.AdsDeformableAggregation = AdsDeformableAggregation
    for name in ("deformable_aggregation", "npu_deformable_aggregation"):
        if name in entry_points:
            setattr(module, name, AdsDeformableAggregation.apply)
    if "fused" in entry_points:
        fused = types.ModuleType("mx_driving.fused")
        fused.npu_deformable_aggregation = AdsDeformableAggregation.apply
        module.fused = fused
    return module


def install(monkeypatch: Any, **options: Any) -> types.ModuleType:
    """Put a fresh double (``make_module(**options)``) into ``sys.modules`` for the test's duration."""
    module = make_module(**options)
    monkeypatch.setitem(sys.modules, "mx_driving", module)
    monkeypatch.setitem(sys.modules, "mx_driving._C", module._C)
    fused: Optional[types.ModuleType] = getattr(module, "fused", None)
    if fused is not None:
        monkeypatch.setitem(sys.modules, "mx_driving.fused", fused)
    else:
        monkeypatch.delitem(sys.modules, "mx_driving.fused", raising=False)
    return module
