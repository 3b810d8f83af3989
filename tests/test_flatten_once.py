"""The image features are flattened once per frame: every decoder layer's deformable aggregation reads the frame's
one channel-last copy (`model.ops.FlattenedFeatures`, as the reference's `extract_feat` with `feature_maps_format`),
and autograd runs one backward from it into the feature maps. Every backend gives the results of flattening inside
each call, which stays reachable by passing the levels themselves.
"""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch

from model import blocks, build_model
from model.ops import FlattenedFeatures, deformable_aggregation
from tests import mx_driving_double
from tests.test_deformable_aggregation import SHAPES3, make_inputs
from tests.test_model import TINY, make_batch, tiny_anchor

da = importlib.import_module("model.ops.deformable_aggregation")

OP_INPUTS = dict(channels=64, groups=8)  # what mx_driving's op takes (C / num_groups = 8)
BACKENDS = {
    "sparse": lambda f, p, w: da._torch_aggregation(f, p, w, use_sparse=True),
    "gather": lambda f, p, w: da._torch_aggregation(f, p, w, use_sparse=False),
    "auto": lambda f, p, w: deformable_aggregation(f, p, w),
    "grid_sample": lambda f, p, w: deformable_aggregation(f, p, w, backend="grid_sample"),
    "mx_driving": lambda f, p, w: deformable_aggregation(f, p, w, backend="mx_driving"),
    "torch on cuda": lambda f, p, w: deformable_aggregation(f, p, w, backend="torch"),
    "cuda_ext": lambda f, p, w: deformable_aggregation(f, p, w, backend="cuda_ext"),
}
ON_CUDA = ("torch on cuda", "cuda_ext")


@pytest.fixture
def counts(monkeypatch) -> dict:
    """How many times the features are flattened (forward) and their gradient turned back into levels."""
    seen = {"flatten": 0, "backward": 0}
    flatten, unflatten = da.flatten_feature_maps, da._transpose_rows_to_levels

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(da, "flatten_feature_maps", counted("flatten", flatten))
    monkeypatch.setattr(da, "_transpose_rows_to_levels", counted("backward", unflatten))
    return seen


def per_layer(features, points_2d, weights, backend):
    """The aggregation as before this change: the levels flattened inside every call."""
    return deformable_aggregation(features.feature_maps, points_2d, weights, backend=backend)


def two_layers(impl: str, feature_maps, points_2d, weights, flatten_once: bool):
    """Two decoder layers' aggregations of one frame (different points and weights), summed; and the gradients
    w.r.t. the levels, both layers' points and weights."""
    feature_maps = [f.detach().clone().requires_grad_() for f in feature_maps]
    points = [points_2d.detach().clone().requires_grad_(), (0.9 * points_2d + 0.05).detach().requires_grad_()]
    layer_weights = [weights.detach().clone().requires_grad_(), weights.flip(1).detach().requires_grad_()]
    frame = FlattenedFeatures(feature_maps)
    out = sum(BACKENDS[impl](frame if flatten_once else feature_maps, p, w) for p, w in zip(points, layer_weights))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, [*feature_maps, *points, *layer_weights], grad_out.to(out.device))
    return out.detach(), grads


def backend_inputs(impl: str, monkeypatch):
    """Inputs the backend serves (float32 for the compiled ops, on the GPU for the CUDA cases)."""
    if impl == "mx_driving":
        mx_driving_double.install(monkeypatch)
        return make_inputs(SHAPES3, seed=2, dtype=torch.float32, **OP_INPUTS)
    if impl in ON_CUDA:
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if impl == "cuda_ext" and da._load_cuda_ext() is None:
            pytest.skip("the reference's CUDA op is not built")
        maps, points_2d, weights = make_inputs(SHAPES3, seed=2, dtype=torch.float32, **OP_INPUTS)
        return [f.cuda() for f in maps], points_2d.cuda(), weights.cuda()
    return make_inputs(SHAPES3, seed=2)


@pytest.mark.parametrize(
    "impl", [pytest.param(impl, marks=pytest.mark.cuda) if impl in ON_CUDA else impl for impl in BACKENDS]
)
def test_layers_read_one_flattening_with_the_results_of_flattening_per_call(impl, counts, monkeypatch):
    inputs = backend_inputs(impl, monkeypatch)
    once = two_layers(impl, *inputs, flatten_once=True)
    flattened = dict(counts)
    per_call = two_layers(impl, *inputs, flatten_once=False)
    # grid_sample reads the levels; every other backend flattens once per frame instead of once per call
    layers = 0 if impl == "grid_sample" else 1
    assert flattened == {"flatten": layers, "backward": layers}
    assert counts == {"flatten": 3 * layers, "backward": 3 * layers}
    # the same arithmetic: equal on the CPU; on a GPU, atomic adds change the order of the sums from run to run
    tol = 1e-5 if impl in ON_CUDA else 0.0
    torch.testing.assert_close(once[0], per_call[0], atol=tol, rtol=tol)
    for grad, ref in zip(once[1], per_call[1]):
        assert grad.dtype == ref.dtype
        torch.testing.assert_close(grad, ref, atol=tol, rtol=tol)


def test_a_flattening_made_without_grad_is_not_reused_with_grad(counts):
    maps, points_2d, weights = make_inputs(SHAPES3, seed=3)
    maps = [f.requires_grad_() for f in maps]
    frame = FlattenedFeatures(maps)
    with torch.no_grad():
        deformable_aggregation(frame, points_2d, weights)
    out = deformable_aggregation(frame, points_2d, weights)
    grads = torch.autograd.grad(out.sum(), maps)
    assert counts["flatten"] == 2 and all(g.abs().max() > 0 for g in grads)


def train_step(model: torch.nn.Module, batch: dict) -> tuple[dict, dict]:
    torch.manual_seed(11)
    np.random.seed(11)
    losses = model(batch)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters()}


def test_a_training_step_flattens_the_image_features_once(counts, monkeypatch):
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_model(TINY, tiny_anchor()).train()
    before = copy.deepcopy(model)
    batch = make_batch()
    losses, grads = train_step(model, copy.deepcopy(batch))
    assert counts == {"flatten": 1, "backward": 1}  # 3 decoder layers
    monkeypatch.setattr(blocks, "deformable_aggregation", per_layer)
    ref_losses, ref_grads = train_step(before, batch)
    assert counts == {"flatten": 4, "backward": 4}
    for key, value in ref_losses.items():
        torch.testing.assert_close(losses[key], value, atol=0, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    for name, grad in ref_grads.items():
        if grad is None:
            assert grads[name] is None, name
            continue
        # the layers' gradients now add up before the one backward into the levels: float32 rounding only
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_inference_flattens_the_image_features_once(counts):
    torch.manual_seed(0)
    model = build_model(TINY, tiny_anchor()).eval()
    model(make_batch())
    assert counts == {"flatten": 1, "backward": 0}
