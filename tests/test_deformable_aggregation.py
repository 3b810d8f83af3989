"""Deformable aggregation: the torch fast path (sparse kernels and gather fallback) against the compiled op.

The ground truth is `tests/kernel_oracle.py`, a line-by-line transcription of the reference's CUDA kernel (what the
released checkpoints were trained with). Values and gradients (features, points, weights) must match it to 1e-5,
including key points far outside every image, on the image borders and within the half pixel outside them (where
the op skips the sample and grid_sample would still blend with the zero padding), and batches where no key point
lands in any image.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, List, Sequence, Tuple

import pytest
import torch

from model.ops.deformable_aggregation import (
    CUDA_EXT_MODULES,
    _torch_aggregation,
    deformable_aggregation,
    deformable_aggregation_grid_sample,
    select_backend,
)
from tests.kernel_oracle import deformable_aggregation_oracle

BS, ANCHORS, POINTS, CAMS, CHANNELS, GROUPS = 2, 7, 5, 3, 8, 2
# the module (model.ops re-exports the function under the same name)
da = importlib.import_module("model.ops.deformable_aggregation")

SHAPES = ((5, 7), (3, 4))  # (H, W) per level
SHAPES3 = ((5, 7), (3, 4), (2, 3))

Inputs = Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]


def make_inputs(
    shapes: Sequence[Tuple[int, int]] = SHAPES,
    low: float = -0.3,
    high: float = 1.3,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    bs: int = BS,
    anchors: int = ANCHORS,
    points: int = POINTS,
    cams: int = CAMS,
    channels: int = CHANNELS,
    groups: int = GROUPS,
) -> Inputs:
    """Random features, points uniform in [low, high] (normalised), random positive and negative weights."""
    gen = torch.Generator().manual_seed(seed)
    feature_maps = [torch.randn(bs, cams, channels, h, w, generator=gen, dtype=dtype) for h, w in shapes]
    points_2d = low + (high - low) * torch.rand(bs, anchors, points, cams, 2, generator=gen, dtype=dtype)
    weights = torch.randn(bs, anchors, points, cams, len(shapes), groups, generator=gen, dtype=dtype)
    return feature_maps, points_2d, weights


def oracle(feature_maps, points_2d, weights):
    """The kernel oracle on the op's input layout, flattened here with plain torch ops."""
    bs, num_cams, channels = feature_maps[0].shape[:3]
    dtype = torch.promote_types(torch.promote_types(feature_maps[0].dtype, points_2d.dtype), weights.dtype)
    rows = [fm.to(dtype).flatten(3).permute(0, 1, 3, 2) for fm in feature_maps]  # (bs, cams, H*W, C) per level
    mc_ms_feat = torch.cat(rows, dim=2).flatten(1, 2)  # (bs, cams * sum(H*W), C)
    sizes = [fm.shape[-2] * fm.shape[-1] for fm in feature_maps]
    spatial_shape = torch.tensor([[fm.shape[-2:] for fm in feature_maps]] * num_cams)
    start = torch.tensor(
        [[n * sum(sizes) + sum(sizes[:level]) for level in range(len(sizes))] for n in range(num_cams)]
    )
    return deformable_aggregation_oracle(mc_ms_feat, spatial_shape, start, points_2d.to(dtype), weights.to(dtype))


def sparse_impl(f, p, w):
    return _torch_aggregation(f, p, w, use_sparse=True)


def gather_impl(f, p, w):
    return _torch_aggregation(f, p, w, use_sparse=False)


def public_torch_impl(f, p, w):
    return deformable_aggregation(f, p, w, backend="torch")


TORCH_IMPLS = {"sparse": sparse_impl, "gather": gather_impl, "public": public_torch_impl}


def exportable_impl(f, p, w):
    return deformable_aggregation(f, p, w, backend="exportable")


def run(
    fn: Callable[..., torch.Tensor], inputs: Inputs, seed: int = 1
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Output and gradients (features..., points, weights) for a fixed random output gradient."""
    feature_maps = [f.detach().clone().requires_grad_() for f in inputs[0]]
    points_2d = inputs[1].detach().clone().requires_grad_()
    weights = inputs[2].detach().clone().requires_grad_()
    out = fn(feature_maps, points_2d, weights)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, [*feature_maps, points_2d, weights], grad_out)
    return out.detach(), grads


def assert_matches_op(fn: Callable[..., torch.Tensor], inputs: Inputs, tol: float = 1e-5) -> None:
    out, grads = run(fn, inputs)
    ref_out, ref_grads = run(oracle, inputs)
    assert out.shape == ref_out.shape == (inputs[1].shape[0], inputs[1].shape[1], inputs[0][0].shape[2])
    assert out.dtype == ref_out.dtype
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    names = [f"features[{i}]" for i in range(len(inputs[0]))] + ["points_2d", "weights"]
    for name, grad, ref in zip(names, grads, ref_grads):
        assert grad.shape == ref.shape and grad.dtype == ref.dtype, name
        torch.testing.assert_close(grad, ref, atol=tol, rtol=tol, msg=lambda m, name=name: f"grad {name}: {m}")


def inside_share(points_2d: torch.Tensor) -> float:
    """Share of (anchor, point, camera) triples inside the image."""
    return ((points_2d > 0) & (points_2d < 1)).all(-1).double().mean().item()


def border_points(shapes: Sequence[Tuple[int, int]], seed: int = 0) -> torch.Tensor:
    """(BS, ANCHORS, POINTS, CAMS, 2) points on the borders of every level and up to one pixel outside them.

    For each level (H, W), pixel coordinates ix in {-1, -0.75, -0.5, -0.2, 0, W - 1, W - 0.5, W - 0.3, W} (and the
    same for iy), i.e. the last pixel centre, the image edge, the half pixel outside it where grid_sample still
    blends with the zero padding and its outer limit, converted to normalised coordinates (ix + 0.5) / W.
    """
    xs, ys = [], []
    for h, w in shapes:
        for size, out in ((w, xs), (h, ys)):
            pix = torch.tensor([-1.0, -0.75, -0.5, -0.2, 0.0, size - 1.0, size - 0.5, size - 0.3, float(size)])
            out.append((pix.double() + 0.5) / size)
    xs.append(torch.tensor([0.0, 1.0, 0.5]).double())  # exactly on the image borders, and the centre
    ys.append(torch.tensor([0.0, 1.0, 0.5]).double())
    x, y = torch.cat(xs), torch.cat(ys)
    gen = torch.Generator().manual_seed(seed)
    n = BS * ANCHORS * POINTS * CAMS
    px = x[torch.randint(len(x), (n,), generator=gen)]
    py = y[torch.randint(len(y), (n,), generator=gen)]
    # a third of the coordinates take a random in-image value, so borders meet interior points too
    free = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    pick = torch.rand(n, 2, generator=gen) < 1 / 3
    px = torch.where(pick[:, 0], free[:, 0], px)
    py = torch.where(pick[:, 1], free[:, 1], py)
    return torch.stack([px, py], -1).reshape(BS, ANCHORS, POINTS, CAMS, 2)


# ----------------------------------------------------------------------------------------------------------------
# Equality with the op (kernel oracle), values and gradients
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", list(TORCH_IMPLS))
@pytest.mark.parametrize("shapes", [SHAPES, SHAPES3], ids=["2levels", "3levels"])
def test_random_points_match_the_op(impl, shapes):
    inputs = make_inputs(shapes)
    share = inside_share(inputs[1])
    assert 0.2 < share < 0.8  # a real mix of inside and outside triples
    assert oracle(*inputs).abs().min() > 0  # every anchor samples something
    assert_matches_op(TORCH_IMPLS[impl], inputs)


@pytest.mark.parametrize("impl", list(TORCH_IMPLS))
def test_float64_is_computed_in_float64(impl):
    inputs = make_inputs(SHAPES3, seed=1)
    assert_matches_op(TORCH_IMPLS[impl], inputs, tol=1e-11)


@pytest.mark.parametrize("impl", list(TORCH_IMPLS))
def test_points_far_outside_match_the_op(impl):
    feature_maps, points_2d, weights = make_inputs(SHAPES3, seed=2)
    gen = torch.Generator().manual_seed(3)
    far = torch.tensor([-1e6, -40.0, -3.0, -0.6, 1.6, 4.0, 55.0, 7e7], dtype=torch.float64)
    outside = torch.rand(points_2d.shape[:-1], generator=gen) < 0.6  # 60% of the triples far outside
    choice = far[torch.randint(len(far), points_2d.shape, generator=gen)]
    # one coordinate far outside, the other one anywhere (also inside)
    axis = torch.randint(2, points_2d.shape[:-1], generator=gen)
    far_xy = torch.where(torch.stack([axis == 0, axis == 1], -1), choice, points_2d)
    points_2d = torch.where(outside[..., None], far_xy, points_2d)
    assert_matches_op(TORCH_IMPLS[impl], (feature_maps, points_2d, weights))


@pytest.mark.parametrize("impl", list(TORCH_IMPLS))
@pytest.mark.parametrize("shapes", [SHAPES, SHAPES3], ids=["2levels", "3levels"])
def test_border_points_match_the_op(impl, shapes):
    feature_maps, _, weights = make_inputs(shapes, seed=4)
    points_2d = border_points(shapes, seed=5)
    # the border cases really reach outside: some samples are partly outside the image
    assert ((points_2d < 0) | (points_2d > 1)).any(-1).double().mean() > 0.2
    assert_matches_op(TORCH_IMPLS[impl], (feature_maps, points_2d, weights))


def test_border_band_follows_the_op_not_grid_sample():
    """Just inside the edge the op blends the border pixel with the padding; half a pixel outside it skips the sample
    (value and gradient 0), where grid_sample still returns a quarter of the border pixel."""
    h, w = 3, 4
    feature = torch.arange(1.0, 1.0 + 2 * h * w, dtype=torch.float64).reshape(1, 1, 2, h, w)
    points_2d = torch.tensor(
        [[0.25 / w, 0.5 / h], [(w - 0.25) / w, 0.5 / h], [-0.25 / w, 0.5 / h], [(w + 0.25) / w, 0.5 / h]],
        dtype=torch.float64,
    )
    points_2d = points_2d.reshape(1, 4, 1, 1, 2).requires_grad_()
    weights = torch.ones(1, 4, 1, 1, 1, 1, dtype=torch.float64)
    # pixel x = -0.25 and x = w - 0.75: three quarters of the border pixel; outside the image: nothing
    expected = torch.tensor(
        [[0.75 * 1, 0.75 * (1 + h * w)], [0.75 * w, 0.75 * (w + h * w)], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64
    )
    for impl in (*TORCH_IMPLS.values(), oracle):
        out = impl([feature], points_2d, weights)
        torch.testing.assert_close(out[0], expected, atol=1e-12, rtol=0)
        (grad,) = torch.autograd.grad(out.sum(), points_2d)
        assert grad[0, 0, 0, 0, 0] > 0 and grad[0, 1, 0, 0, 0] < 0 and grad[0, 2:].abs().max() == 0
    plain = deformable_aggregation_grid_sample([feature], points_2d, weights)
    torch.testing.assert_close(plain[0, 2], torch.tensor([0.25, 0.25 * (1 + h * w)], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------
# The exportable formulation (grid_sample with the op's border rule: what model.onnx holds)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shapes", [SHAPES, SHAPES3], ids=["2levels", "3levels"])
def test_exportable_matches_the_op(shapes):
    inputs = make_inputs(shapes)
    assert 0.2 < inside_share(inputs[1]) < 0.8
    assert_matches_op(exportable_impl, inputs)
    assert_matches_op(exportable_impl, make_inputs(shapes, seed=1), tol=1e-11)  # float64 throughout


def test_exportable_matches_the_op_at_the_borders():
    """Values at and around every border, and half a pixel to a pixel outside, as the op: the band where plain
    grid_sample still blends with the padding gives nothing. (The point gradient is not compared there: these
    points sit exactly on pixel centres, where bilinear sampling has a kink and grid_sample's own rounding of
    loc * size - 0.5 may take the other side's slope. Inference, the formulation's use, has no gradients.)"""
    for shapes, seed in ((SHAPES, 5), (SHAPES3, 6)):
        feature_maps, _, weights = make_inputs(shapes, seed=4)
        points_2d = border_points(shapes, seed=seed)
        torch.testing.assert_close(
            exportable_impl(feature_maps, points_2d, weights),
            oracle(feature_maps, points_2d, weights),
            atol=1e-12,
            rtol=1e-12,
        )
    band = make_inputs(SHAPES3, seed=2, low=-0.08, high=1.08)  # many points within a pixel of the borders
    torch.testing.assert_close(exportable_impl(*band), oracle(*band), atol=1e-12, rtol=1e-12)
    assert not torch.allclose(deformable_aggregation_grid_sample(*band), oracle(*band))


@pytest.mark.parametrize("impl", list(TORCH_IMPLS))
def test_no_point_in_any_image(impl):
    feature_maps, points_2d, weights = make_inputs(SHAPES3, seed=6)
    points_2d = torch.where(points_2d < 0.5, torch.full_like(points_2d, -2.0), torch.full_like(points_2d, 3.5))
    ref_out, ref_grads = run(oracle, (feature_maps, points_2d, weights))
    out, grads = run(TORCH_IMPLS[impl], (feature_maps, points_2d, weights))
    assert out.shape == (BS, ANCHORS, CHANNELS) and out.dtype == torch.float64
    assert out.abs().max() == 0 and ref_out.abs().max() == 0
    for grad, ref, leaf in zip(grads, ref_grads, [*feature_maps, points_2d, weights]):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype
        assert grad.abs().max() == 0 and ref.abs().max() == 0


@pytest.mark.parametrize("impl", list(TORCH_IMPLS))
def test_one_batch_element_sees_nothing(impl):
    feature_maps, points_2d, weights = make_inputs(SHAPES, seed=7)
    points_2d = points_2d.clone()
    points_2d[1] = -5.0  # batch element 1: every key point outside every camera
    out, grads = run(TORCH_IMPLS[impl], (feature_maps, points_2d, weights))
    assert out[1].abs().max() == 0 and out[0].abs().min() > 0
    assert all(g[1].abs().max() == 0 for g in grads)
    assert_matches_op(TORCH_IMPLS[impl], (feature_maps, points_2d, weights))


@pytest.mark.parametrize("impl", ["sparse", "gather"])
def test_only_requested_gradients(impl):
    feature_maps, points_2d, weights = make_inputs(SHAPES, seed=8)
    weights.requires_grad_()
    out = TORCH_IMPLS[impl](feature_maps, points_2d, weights)
    (grad,) = torch.autograd.grad(out.sum(), weights)
    ref = oracle(feature_maps, points_2d, weights)
    (ref_grad,) = torch.autograd.grad(ref.sum(), weights)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sparse", "gather"])
def test_gradcheck(impl):
    feature_maps, points_2d, weights = make_inputs(
        ((3, 4), (2, 3)), low=-0.2, high=1.2, seed=9, bs=1, anchors=2, points=3, cams=2, channels=4, groups=2
    )
    # keep the points off the pixel borders, where the bilinear sample has a kink
    for h, w in ((3, 4), (2, 3)):
        for size, axis in ((w, 0), (h, 1)):
            frac = torch.frac(points_2d[..., axis] * size - 0.5 + 10)
            assert ((frac > 1e-3) & (frac < 1 - 1e-3)).all()
    inputs = (*[f.requires_grad_() for f in feature_maps], points_2d.requires_grad_(), weights.requires_grad_())
    num_levels = len(feature_maps)

    def fn(*args):
        return TORCH_IMPLS[impl](list(args[:num_levels]), args[num_levels], args[num_levels + 1])

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", list(TORCH_IMPLS))
def test_float32(impl):
    inputs64 = make_inputs(SHAPES3, seed=10)
    inputs32 = ([f.float() for f in inputs64[0]], inputs64[1].float(), inputs64[2].float())
    out, grads = run(TORCH_IMPLS[impl], inputs32)
    ref_out, ref_grads = run(oracle, inputs64)
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(out, ref_out.float(), atol=1e-4, rtol=1e-4)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref.float(), atol=1e-4, rtol=1e-4)
    # and the same as the oracle run in float32
    assert_matches_op(TORCH_IMPLS[impl], inputs32, tol=1e-5)


@pytest.mark.parametrize("impl", list(TORCH_IMPLS))
def test_half_features_promote(impl):
    feature_maps, points_2d, weights = make_inputs(SHAPES, seed=11)
    half = [f.half() for f in feature_maps]
    # fp16 features with float32 points and weights: computed and returned in float32
    out, grads = run(TORCH_IMPLS[impl], (half, points_2d.float(), weights.float()))
    ref_out, ref_grads = run(oracle, ([f.double() for f in half], points_2d, weights))
    assert out.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float16] * len(half) + [torch.float32, torch.float32]
    torch.testing.assert_close(out, ref_out.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[-1], ref_grads[-1].float(), atol=1e-4, rtol=1e-4)  # weights
    torch.testing.assert_close(grads[-2], ref_grads[-2].float(), atol=1e-3, rtol=1e-4)  # points
    for grad, ref in zip(grads[:-2], ref_grads[:-2]):
        torch.testing.assert_close(grad.double(), ref, atol=2e-3, rtol=2e-3)
    # all half: returned in half, accumulated in float32 (closer to the float64 result than fp16 arithmetic)
    out16 = TORCH_IMPLS[impl](half, points_2d.half(), weights.half())
    assert out16.dtype == torch.float16
    ref16 = oracle([f.double() for f in half], points_2d.half().double(), weights.half().double())
    torch.testing.assert_close(out16.double(), ref16, atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# Backend selection and errors
# ----------------------------------------------------------------------------------------------------------------


def test_auto_selects_torch_on_cpu(monkeypatch):
    assert select_backend("cpu") == "torch"
    assert select_backend(torch.device("cpu")) == "torch"
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return _torch_aggregation(*args, **kwargs)

    monkeypatch.setattr(da, "_torch_aggregation", spy)
    inputs = make_inputs(SHAPES, seed=12)
    out = deformable_aggregation(*inputs)  # backend="auto"
    assert calls == [1]
    torch.testing.assert_close(out, oracle(*inputs), atol=1e-5, rtol=1e-5)
    deformable_aggregation(*inputs, backend="grid_sample")
    assert calls == [1]


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        deformable_aggregation(*make_inputs(), backend="triton")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f, p, w: ([], p, w), "non-empty list"),
        (lambda f, p, w: (f, p[..., 0], w), "points_2d must be"),
        (lambda f, p, w: (f, torch.cat([p, p[..., :1]], -1), w), "points_2d must be"),
        (lambda f, p, w: ([f[0][:, :, :, 0]] + f[1:], p, w), r"feature_maps\[0\] must be"),
        (lambda f, p, w: (f[:1] + [f[1][:, :, :4]], p, w), r"feature_maps\[1\] has"),
        (lambda f, p, w: ([x[:, :2] for x in f], p, w), "num_cams"),
        (lambda f, p, w: ([x[:1] for x in f], p, w), "num_cams"),
        (lambda f, p, w: (f, p, w[:, :3]), "weights must be"),
        (lambda f, p, w: (f, p, w[..., 0]), "weights must be"),
        (lambda f, p, w: (f[:1], p, w), "levels"),
        (lambda f, p, w: (f, p, torch.cat([w, w[..., :1]], -1)), "divisible"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "grid_sample", "auto"])
def test_bad_shapes_raise(mutate, message, backend):
    with pytest.raises(ValueError, match=message):
        deformable_aggregation(*mutate(*make_inputs()), backend=backend)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(any(_importable(m) for m in CUDA_EXT_MODULES), reason="the CUDA extension is installed")
def test_cuda_ext_missing_raises():
    with pytest.raises(RuntimeError, match="deformable_aggregation_ext"):
        deformable_aggregation(*make_inputs(), backend="cuda_ext")


@pytest.mark.skipif(_importable("mx_driving"), reason="mx_driving is installed")
def test_mx_driving_missing_raises():
    with pytest.raises(RuntimeError, match="mx_driving"):
        deformable_aggregation(*make_inputs(), backend="mx_driving")


# ----------------------------------------------------------------------------------------------------------------
# On a GPU (benchmarks/device_check.sh): the torch backend, and the reference's compiled op when it is built
# ----------------------------------------------------------------------------------------------------------------


def _on_cuda(inputs: Inputs) -> Inputs:
    return [f.cuda() for f in inputs[0]], inputs[1].cuda(), inputs[2].cuda()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_backends_match_the_op(backend):
    inputs = make_inputs(SHAPES3, seed=13, dtype=torch.float32)
    inputs = (inputs[0], border_points(SHAPES3, seed=14).float(), inputs[2])
    out, grads = run(lambda f, p, w: deformable_aggregation(f, p, w, backend=backend), _on_cuda(inputs))
    ref_out, ref_grads = run(oracle, inputs)
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not any(_importable(m) for m in CUDA_EXT_MODULES), reason="the reference's CUDA op is not built")
def test_compiled_reference_op_equals_the_oracle():
    """The oracle is what the kernel computes: checked against the kernel itself, borders included."""
    inputs = make_inputs(SHAPES3, seed=15, dtype=torch.float32)
    inputs = (inputs[0], border_points(SHAPES3, seed=16).float(), inputs[2])
    out, grads = run(lambda f, p, w: deformable_aggregation(f, p, w, backend="cuda_ext"), _on_cuda(inputs))
    ref_out, ref_grads = run(oracle, inputs)
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.cpu(), ref, atol=1e-5, rtol=1e-5)
