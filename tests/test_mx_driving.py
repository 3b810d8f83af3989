"""The Ascend NPU path (backend "mx_driving") without an NPU: `tests/mx_driving_double.py` stands in for mx_driving.

The double has the real op's argument checks (Ascend/DrivingSDK 9c2fb9ea) and computes with the kernel oracle in
float32, like the op. With it installed, the demo and full models train through the mx_driving backend on the CPU
with the losses and gradients of the torch backend; the demo profile (num_groups 4, which the op rejects) falls back
to the torch backend with one warning and never calls the op; an explicit backend="mx_driving" says why it cannot.

Tolerances: both backends compute in float32 and differ only in the order of the sums (the torch backend's sparse
products against the oracle's loops), a few float32 ulps per op; over a whole training step (3 or 6 decoders, the
losses, the backward into the backbone) that grows to ~1e-6 relative, so 1e-4 (losses) and 1e-3 of each gradient
tensor's largest magnitude bound it with room while a wrong sample, weight or gradient (an O(1) relative error)
fails.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import numpy as np
import pytest
import torch

from model import build_model
from model.blocks import DeformableFeatureAggregation
from model.ops.deformable_aggregation import deformable_aggregation, flatten_feature_maps, mx_driving_rejects
from tests import mx_driving_double
from tests.reference import make_scene, model_params, realistic_anchor, to
from tests.test_deformable_aggregation import SHAPES3, make_inputs, oracle, run

da = importlib.import_module("model.ops.deformable_aggregation")

OP_INPUTS = dict(channels=64, groups=8, dtype=torch.float32)  # C / num_groups = 8, as the op needs


@pytest.fixture
def mx(monkeypatch):
    """The double as `mx_driving`; the fallback warnings reset."""
    monkeypatch.setattr(da, "_FALLBACK_WARNED", set())
    return mx_driving_double.install(monkeypatch)


@pytest.fixture
def on_npu(monkeypatch):
    """CPU tensors take the NPU's branch of backend "auto" (select_backend answers as for an NPU tensor)."""
    monkeypatch.setattr(da, "select_backend", lambda device: "mx_driving" if da._load_mx_driving() else "torch")


def op_args(seed: int = 0, **kwargs):
    """(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights) as the op takes them."""
    feature_maps, points_2d, weights = make_inputs(SHAPES3, seed=seed, **{**OP_INPUTS, **kwargs})
    mc_ms_feat, spatial_shape, scale_start_index = flatten_feature_maps(feature_maps)
    return [mc_ms_feat.detach(), spatial_shape, scale_start_index, points_2d, weights]


# ----------------------------------------------------------------------------------------------------------------
# The double: the real op's entry points, checks and arithmetic
# ----------------------------------------------------------------------------------------------------------------


def test_the_double_computes_the_op(mx):
    inputs = make_inputs(SHAPES3, seed=1, **OP_INPUTS)
    out, grads = run(lambda f, p, w: deformable_aggregation(f, p, w, backend="mx_driving"), inputs)
    ref_out, ref_grads = run(oracle, inputs)
    assert len(mx.calls) == 1 and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)
    # the same as the torch backend
    torch_out, torch_grads = run(lambda f, p, w: deformable_aggregation(f, p, w, backend="torch"), inputs)
    torch.testing.assert_close(out, torch_out, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, torch_grads):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "entry_points",
    [mx_driving_double.ENTRY_POINTS, ("npu_deformable_aggregation",), ("fused",)],
    ids=["current", "npu_deformable_aggregation", "fused"],
)
def test_every_release_layout_is_found(monkeypatch, entry_points):
    module = mx_driving_double.install(monkeypatch, entry_points=entry_points)
    op = da._load_mx_driving()
    assert op == module.AdsDeformableAggregation.apply
    out = deformable_aggregation(*make_inputs(SHAPES3, seed=2, **OP_INPUTS), backend="mx_driving")
    assert out.shape == (2, 7, 64) and len(module.calls) == 1


def test_our_module_hands_the_op_what_it_takes(mx):
    """float32 contiguous features, points and weights, int32 shapes: the wrapper's conversions are no-ops, even
    for float64 or permuted (non-contiguous) inputs of ours."""
    feature_maps, points_2d, weights = make_inputs(SHAPES3, seed=3, **{**OP_INPUTS, "dtype": torch.float64})
    points_2d = points_2d.transpose(1, 2).contiguous().transpose(1, 2)  # as the model's permute: not contiguous
    assert not points_2d.is_contiguous()
    out = deformable_aggregation(feature_maps, points_2d, weights, backend="mx_driving")
    assert out.dtype == torch.float64  # returned in the inputs' dtype, computed in float32 like the op
    (call,) = mx.calls
    assert call["dtypes"] == mx_driving_double.DTYPES and all(call["contiguous"])
    torch.testing.assert_close(out, oracle(feature_maps, points_2d, weights), atol=1e-5, rtol=1e-5)


BAD_INPUTS = {
    # name: (how the op's inputs (six cameras) are spoilt, exception, message)
    "float64 features": (lambda a: [a[0].double(), *a[1:]], RuntimeError, "mc_ms_feat must be torch.float32"),
    "float64 points": (
        lambda a: [*a[:3], a[3].double(), a[4]],
        RuntimeError,
        "sampling_location must be torch.float32",
    ),
    "float16 weights": (lambda a: [*a[:4], a[4].half()], RuntimeError, "weights must be torch.float32"),
    "int64 spatial_shape": (lambda a: [a[0], a[1].long(), *a[2:]], RuntimeError, "spatial_shape must be torch.int32"),
    "int64 scale_start_index": (
        lambda a: [*a[:2], a[2].long(), *a[3:]],
        RuntimeError,
        "scale_start_index must be torch.int32",
    ),
    "non-contiguous features": (
        lambda a: [a[0].transpose(0, 1).contiguous().transpose(0, 1), *a[1:]],
        RuntimeError,
        "mc_ms_feat must be contiguous",
    ),
    "non-contiguous points": (
        lambda a: [*a[:3], a[3].transpose(1, 2).contiguous().transpose(1, 2), a[4]],
        RuntimeError,
        "sampling_location must be contiguous",
    ),
    "non-contiguous weights": (
        lambda a: [*a[:4], a[4].transpose(1, 2).contiguous().transpose(1, 2)],
        RuntimeError,
        "weights must be contiguous",
    ),
    "features 4D": (lambda a: [a[0][None], *a[1:]], RuntimeError, r"mc_ms_feat.dim\(\) must be 3, but got: 4"),
    "spatial_shape 2D": (lambda a: [a[0], a[1][0], *a[2:]], RuntimeError, r"spatial_shape.dim\(\) must be 3"),
    "scale_start_index 1D": (lambda a: [*a[:2], a[2][0], *a[3:]], RuntimeError, r"scale_start_index.dim\(\) must be 2"),
    "points 4D": (lambda a: [*a[:3], a[3][0], a[4]], RuntimeError, r"sampling_location.dim\(\) must be 5, but got: 4"),
    "weights 5D": (lambda a: [*a[:4], a[4][..., 0]], RuntimeError, r"weights.dim\(\) must be 6, but got: 5"),
    "4 groups": (
        lambda a: [*a[:4], a[4][..., :4].contiguous()],
        RuntimeError,
        r"weights.sizes\(\)\[5\] must be multiple of 8, but got: 4",
    ),
    "16 groups": (
        lambda a: [*a[:4], torch.cat([a[4], a[4]], -1)],
        RuntimeError,
        "outside the documented constraints.*group = 8, got 16",
    ),
    "7 cameras": (  # a 7th camera, consistent everywhere: the documented limit cam <= 6 stops it
        lambda a: [
            torch.cat([a[0], a[0][:, : a[0].shape[1] // 6]], 1),
            torch.cat([a[1], a[1][:1]], 0),
            torch.cat([a[2], a[2][-1:] + a[0].shape[1] // 6], 0),
            torch.cat([a[3], a[3][:, :, :, :1]], 3).contiguous(),
            torch.cat([a[4], a[4][:, :, :, :1]], 3).contiguous(),
        ],
        RuntimeError,
        "num_cams <= 6, got 7",
    ),
    "num_feat too small": (lambda a: [a[0][:, :-1].contiguous(), *a[1:]], RuntimeError, "reach past num_feat"),
    "empty features": (lambda a: [a[0][:, :, :0], *a[1:]], Exception, "can not be a empty Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_the_double_rejects_what_the_op_rejects(mx, case):
    spoil, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        mx.deformable_aggregation(*spoil(op_args(cams=6)))
    assert len(mx.calls) == 1


def test_the_double_with_six_cameras_is_at_the_limit(mx):
    args = op_args(cams=6)
    assert args[3].shape[3] == 6
    mx.deformable_aggregation(*args)  # cam <= 6: accepted


@pytest.mark.parametrize("case", ["float64 features", "int64 spatial_shape", "non-contiguous points"])
def test_the_real_wrapper_converts_where_the_binding_rejects(monkeypatch, case):
    """strict=False is the seed's wrapper: `.contiguous().float()` / `.int()` first, so only `_C` (the binding)
    sees the dtype and layout checks."""
    module = mx_driving_double.install(monkeypatch, strict=False)
    spoil, error, message = BAD_INPUTS[case]
    args = op_args(cams=6)
    torch.testing.assert_close(module.deformable_aggregation(*spoil(args)), module.deformable_aggregation(*args))
    with pytest.raises(error, match=message):
        module._C.npu_deformable_aggregation(*spoil(args))


def test_the_double_can_require_npu_tensors(monkeypatch):
    module = mx_driving_double.install(monkeypatch, require_npu=True)
    with pytest.raises(RuntimeError, match="mc_ms_feat must be NPU tensor"):
        module.deformable_aggregation(*op_args())
    assert mx_driving_double.install(monkeypatch).deformable_aggregation(*op_args()).shape == (2, 7, 64)


# ----------------------------------------------------------------------------------------------------------------
# Backend selection: "auto" only where the op can serve; an explicit "mx_driving" says why not
# ----------------------------------------------------------------------------------------------------------------


def test_auto_falls_back_for_four_groups_with_one_warning(mx, on_npu):
    inputs = make_inputs(SHAPES3, seed=4, channels=64, groups=4, dtype=torch.float32)
    with pytest.warns(RuntimeWarning) as record:
        outs = [deformable_aggregation(*inputs) for _ in range(3)]
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert messages == [
        "mx_driving's deformable aggregation needs num_groups divisible by 8, got 4: using the torch backend"
    ]
    assert mx.calls == []  # the op was never called
    for out in outs:
        torch.testing.assert_close(out, deformable_aggregation(*inputs, backend="torch"), atol=0, rtol=0)


def test_auto_takes_the_op_where_it_serves(mx, on_npu):
    inputs = make_inputs(SHAPES3, seed=5, **OP_INPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = deformable_aggregation(*inputs)
    assert len(mx.calls) == 1
    torch.testing.assert_close(out, oracle(*inputs), atol=1e-5, rtol=1e-5)
    # float64 stays on the torch backend
    deformable_aggregation([f.double() for f in inputs[0]], inputs[1].double(), inputs[2].double())
    assert len(mx.calls) == 1


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(groups=4), "needs num_groups divisible by 8, got 4"),
        (dict(groups=16, channels=128), "documented for num_groups = 8 only, got 16"),
        (dict(groups=8, channels=32), r"channels per group \(C / num_groups\) divisible by 8, got 32 / 8"),
        (dict(groups=8, channels=512), "documented for channels <= 256, got 512"),
        (dict(groups=8, channels=64, cams=7), "documented for num_cams <= 6, got 7"),
        (dict(groups=8, channels=64, anchors=2049, points=1, cams=1), "documented for num_anchor <= 2048, got 2049"),
    ],
)
def test_explicit_backend_names_why_the_op_cannot(mx, kwargs, reason):
    inputs = make_inputs(SHAPES3, seed=6, dtype=torch.float32, **kwargs)
    assert mx_driving_rejects(*inputs) is not None
    with pytest.raises(ValueError, match=f"backend 'mx_driving' cannot take these inputs: .*{reason}"):
        deformable_aggregation(*inputs, backend="mx_driving")
    assert mx.calls == []


def test_five_levels_are_refused(mx):
    shapes = (*SHAPES3, (2, 2), (1, 2))
    inputs = make_inputs(shapes, seed=7, **OP_INPUTS)
    assert mx_driving_rejects(*inputs) == "mx_driving's deformable aggregation is documented for num_levels <= 4, got 5"


# ----------------------------------------------------------------------------------------------------------------
# The models through the mx_driving backend
# ----------------------------------------------------------------------------------------------------------------

NUM_ANCHOR = {"demo": 300, "full": 900}  # params.yaml / params-full.yaml, anchors.num_anchor
INPUT = {"demo": (32, 96, 2), "full": (32, 96, 1)}  # height, width, batch: feature maps 8x24 down to 1x3


def build(profile: str, **overrides) -> torch.nn.Module:
    params = {**model_params(profile), "with_cp": False, **overrides}
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_model(params, realistic_anchor(NUM_ANCHOR[profile], seed=1))
    with torch.no_grad():  # the zero-initialised weights_fc gives uniform weights; spread them
        gen = torch.Generator().manual_seed(2)
        for module in model.modules():
            if isinstance(module, DeformableFeatureAggregation):
                module.weights_fc.weight.copy_(0.1 * torch.randn(module.weights_fc.weight.shape, generator=gen))
    return model.train()


def training_step(model: torch.nn.Module, frame: dict) -> tuple[dict, dict]:
    torch.manual_seed(11)
    np.random.seed(11)
    losses = model(to(frame, torch.device("cpu")))
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_same_step(mine: tuple[dict, dict], ref: tuple[dict, dict]) -> None:
    assert mine[0].keys() == ref[0].keys() and mine[1].keys() == ref[1].keys()
    for key in ref[0]:
        torch.testing.assert_close(mine[0][key], ref[0][key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
    worst = (0.0, "")
    for name, grad in ref[1].items():
        norm = grad.double().norm().item()
        diff = (mine[1][name] - grad).double().norm().item()
        # 1e-2 of the gradient's norm: both backends compute in float32 and differ in summation order only, which
        # a training step amplifies — the full model's conv1 (through BatchNorm backwards) differs by 3.3e-3 on
        # torch 2.14, and on torch 2.1's kernels the demo's head.anchor_encoder.pos_fc.0.weight by 3.6e-3 (2.3e-5 on
        # 2.14). A wrong sample, weight or gradient in the double is off by about 100 %.
        rtol = 1e-2
        assert diff <= rtol * norm + 1e-8, f"grad {name}: |diff| {diff:.3g} for |grad| {norm:.3g}"
        worst = max(worst, (diff / max(norm, 1e-30), name))
    print(f"{len(ref[1])} gradients; largest |diff| / |grad| {worst[0]:.3g} ({worst[1]})")


@pytest.mark.parametrize("profile", ["demo", pytest.param("full", marks=pytest.mark.slow)])  # full: ~2 min on 2 cores
def test_training_step_through_mx_driving_equals_the_torch_backend(mx, on_npu, profile):
    """A training step (forward, denoising, losses, backward) on the "NPU" path: every deformable aggregation goes
    through the double's forward and backward. The demo profile with num_groups 8: with its 4 the op cannot serve
    (next test)."""
    overrides = {"num_groups": 8} if profile == "demo" else {}
    model = build(profile, **overrides)
    num_decoder = int(model_params(profile)["num_decoder"])
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, DeformableFeatureAggregation):
            module.backend = "torch"
    height, width, bs = INPUT[profile]
    (frame,) = make_scene(1, bs, height, width, targets=True, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        mine = training_step(model, frame)
    assert len(mx.calls) == num_decoder  # one op call per decoder layer, instances and denoising queries together
    assert all(c["dtypes"] == mx_driving_double.DTYPES and all(c["contiguous"]) for c in mx.calls)
    ref = training_step(reference, frame)
    assert len(mx.calls) == num_decoder
    assert any(k.startswith("loss_cls_dn_") for k in ref[0])
    assert mine[1]["head.layers.0.weights_fc.weight"].abs().max() > 0
    assert_same_step(mine, ref)


def test_the_demo_profile_never_reaches_the_op(mx, on_npu):
    """params.yaml's num_groups 4: on an NPU, "auto" runs the torch backend and says so once per run."""
    assert int(model_params("demo")["num_groups"]) == 4
    model = build("demo")
    height, width, bs = INPUT["demo"]
    frames = make_scene(2, bs, height, width, targets=True, seed=5)
    with pytest.warns(RuntimeWarning) as record:
        for frame in frames:  # two frames: the temporal decoders too
            losses = model(to(frame, torch.device("cpu")))
        sum(losses.values()).backward()
    messages = {str(w.message) for w in record if issubclass(w.category, RuntimeWarning)}
    assert messages == {
        "mx_driving's deformable aggregation needs num_groups divisible by 8, got 4: using the torch backend"
    }
    assert sum(issubclass(w.category, RuntimeWarning) for w in record) == 1
    assert mx.calls == []
