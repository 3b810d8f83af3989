"""Our model against the reference code (HorizonRobotics/Sparse4D c41df4bb): one state dict, the same inputs,
frame after frame of a scene with a moving ego.

* eval, float64: frames 1-3 with cached temporal instances — every decoder's boxes, logits and quality, the
  tracking ids, the decoded boxes / scores / labels / cls_scores / ids, and the instance bank's cached state
  after each frame; float32: every decoder's outputs of frame 1 (why not more: the test's docstring);
* train, float64: frames 1-2 with temporal denoising — every loss term and the gradient of every parameter,
  and the torch and numpy RNG states after each step (the noise must be drawn with the same calls in the same
  order for a seeded step to be the reference's); each profile with its model.loss.detach_centerness_target (the
  full seed profile: the Ascend port's detach, the reference then runs the port's mmdet.patch), and both values
  on one demo frame;
* the demo profile (params.yaml) and the full seed profile (params-full.yaml: ResNet-50, 900 anchors,
  6 decoders); the full profile on a 64 x 176 input instead of 256 x 704 to keep CI short (the
  architecture is what is compared).

The reference runs its op path (`use_deformable_func=True`, as its config), its compiled op computed by the
kernel oracle (tests/kernel_oracle.py); see tests/reference.py for the other workarounds it needs on a CPU.
Weights: our initialisation with every constant-initialised tensor perturbed (tests/reference.py), so no branch
is dead, then loaded strictly into the reference.

Tolerance: |ours - ref| <= 1e-4 * (min(1, max|ref|) + |ref|) element-wise: 1e-4 absolute plus 1e-4 relative,
with the absolute part scaled down for tensors whose largest value is below 1 (most gradients), so a small
gradient cannot pass by being small. Integers (labels, tracking ids, masks) must be equal.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from model import build_model
from tests.reference import (
    build_reference,
    copy_state,
    make_scene,
    model_params,
    perturb_weights,
    realistic_anchor,
    reference_params,
    require_reference,
    running_reference,
    to,
)

TOLERANCE = 1e-4
# float32 only (see test_eval_in_fp32_matches_the_reference_but_for_border_crossings): measured 1.95e-4 on a
# velocity of 0.17 after ResNet-50 and 6 decoders, where the same comparison in float64 agrees to 6e-8.
FP32_TOLERANCE = 1e-3
NUM_ANCHOR = {"demo": 300, "full": 900}  # params.yaml / params-full.yaml, anchors.num_anchor
# Input images (height, width) and batch size per profile: the demo's own input, two samples (batch handling is
# compared there); the full model (seed input 256 x 704) on 64 x 176 and one sample, to keep CI short.
EVAL_INPUT = {"demo": (128, 352, 2), "full": (64, 176, 1)}
TRAIN_INPUT = {"demo": (128, 352, 2), "full": (64, 176, 1)}
BANK_STATE = ("cached_feature", "cached_anchor", "confidence", "temp_confidence", "instance_id", "mask", "prev_id")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


class Report:
    """Collects every difference of a run, so that one failure lists all of them (tensor, frame, size)."""

    def __init__(self, tolerance: float = TOLERANCE) -> None:
        self.tolerance = tolerance
        self.lines: list[str] = []
        self.checked = 0
        self.worst = (0.0, "")  # the largest |diff| / bound seen, and where

    def close(self, name: str, ours: Any, ref: Any, angle: bool = False) -> None:
        self.checked += 1
        if ours is None or ref is None:
            if (ours is None) != (ref is None):
                self.lines.append(f"{name}: ours {type(ours).__name__}, reference {type(ref).__name__}")
            return
        # numpy's RNG state is uint32, which torch < 2.3 (the Ascend port's 2.1) cannot convert
        ours, ref = (
            np.asarray(x, np.int64) if isinstance(x, np.ndarray) and x.dtype.kind == "u" else x for x in (ours, ref)
        )
        ours, ref = torch.as_tensor(ours).detach().cpu(), torch.as_tensor(ref).detach().cpu()
        if ours.shape != ref.shape:
            self.lines.append(f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
            return
        if not ours.is_floating_point() or not ref.is_floating_point():
            wrong = ours.long() != ref.long()
            if wrong.any():
                first = tuple(int(i) for i in torch.nonzero(wrong)[0])
                self.lines.append(
                    f"{name}: {int(wrong.sum())} of {wrong.numel()} differ; first at {first}: "
                    f"ours {ours[first].item()}, reference {ref[first].item()}"
                )
            return
        ours, ref = ours.double(), ref.double()
        diff = (ours - ref).abs()
        if angle:  # yaw in (-pi, pi]: compare on the circle
            diff = torch.remainder(ours - ref + math.pi, 2 * math.pi).sub(math.pi).abs()
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        bound = self.tolerance * (min(1.0, scale) + ref.abs())
        if diff.numel() and float((diff / bound).max()) > self.worst[0]:
            self.worst = (float((diff / bound).max()), name)
        wrong = ~(diff <= bound)
        if wrong.any():
            first = tuple(int(i) for i in torch.nonzero(wrong)[0])
            self.lines.append(
                f"{name}: {int(wrong.sum())} of {wrong.numel()} off, max |diff| {float(diff.max()):.3g} "
                f"(max |ref| {scale:.3g}); first at {first}: ours {ours[first].item():.6g}, "
                f"reference {ref[first].item():.6g}"
            )

    def same_keys(self, name: str, ours: dict, ref: dict) -> list:
        if set(ours) != set(ref):
            self.lines.append(
                f"{name}: ours-only {sorted(set(ours) - set(ref))}, reference-only {sorted(set(ref) - set(ours))}"
            )
        return sorted(set(ours) & set(ref))

    def check(self) -> None:
        assert self.checked > 0
        print(f"{self.checked} comparisons; largest |diff| / bound {self.worst[0]:.3g} at {self.worst[1]}")
        assert not self.lines, f"{len(self.lines)} differences from the reference:\n" + "\n".join(self.lines)


def build_pair(profile: str, device: str, dtype: torch.dtype = torch.float32, detach_centerness_target=None):
    """Ours (perturbed initialisation) and the reference with the same state dict, on `device`; with
    detach_centerness_target (default: the profile's) set in both (the reference with the port's mmdet.patch)."""
    require_reference()
    params = reference_params(model_params(profile))
    if detach_centerness_target is not None:
        params["loss"] = {**params.get("loss", {}), "detach_centerness_target": detach_centerness_target}
    anchor = realistic_anchor(NUM_ANCHOR[profile], seed=1)
    torch.manual_seed(0)
    np.random.seed(0)
    ours = build_model(params, anchor)
    changed = perturb_weights(ours, seed=2)
    assert any(n.endswith("weights_fc.weight") for n in changed)
    assert any(n.endswith("instance_bank.instance_feature") for n in changed)
    constant = [
        n
        for n, t in ours.state_dict().items()
        if t.is_floating_point() and t.numel() > 1 and bool((t == t.flatten()[0]).all()) and "fix_scale" not in n
    ]  # fix_scale: the key points' fixed offsets, part of the architecture
    assert not constant, f"constant after the perturbation: {constant}"
    reference = build_reference(params, anchor)
    copy_state(ours, reference)
    for model in (ours, reference):
        model.to(device=device, dtype=dtype)
        if dtype == torch.float64 and model.depth_branch is not None:
            # The reference's DenseDepthNet casts its input to float32 (blocks.py, DenseDepthNet.forward), so its
            # convolutions stay float32 in both models; everything else is float64.
            model.depth_branch.float()
    return ours, reference


def capture_head(model: torch.nn.Module) -> list:
    outputs: list = []
    model.head.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    return outputs


def run_ours(model, frame: dict):
    return model(frame)


def run_reference(model, frame: dict, device: torch.device, float64: bool = False):
    data = dict(frame)
    img = data.pop("img")
    with running_reference(device, float64_op=float64):
        return model(img=img, **data)


def compare_head(report: Report, tag: str, ours: dict, ref: dict, training: bool) -> None:
    for key in ("prediction", "classification", "quality"):
        if len(ours[key]) != len(ref[key]):
            report.lines.append(f"{tag} {key}: {len(ours[key])} decoders vs reference {len(ref[key])}")
            continue
        for i, (a, b) in enumerate(zip(ours[key], ref[key])):
            report.close(f"{tag} decoder {i} {key}", a, b)
    if not training:
        report.close(f"{tag} instance_id (tracking ids)", ours["instance_id"], ref["instance_id"])
        return
    for key in report.same_keys(f"{tag} head outputs", ours, ref):
        if key.startswith(("dn_", "temp_dn_")):
            values = ours[key] if isinstance(ours[key], list) else [ours[key]]
            for i, (a, b) in enumerate(zip(values, ref[key] if isinstance(ref[key], list) else [ref[key]])):
                report.close(f"{tag} {key}[{i}]", a, b)


def compare_bank(report: Report, tag: str, ours, ref) -> None:
    for key in BANK_STATE:
        report.close(f"{tag} instance_bank.{key}", getattr(ours, key), getattr(ref, key))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("profile", ["demo", "full"])
def test_eval_frames_with_temporal_instances_match_the_reference(profile, device, monkeypatch):
    """Frames 1-3 in float64: every decoder's outputs, tracking ids, decoded results, instance bank state."""
    device = torch.device(device)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ours, reference = build_pair(profile, device, torch.float64)
    ours.eval()
    reference.eval()
    ours_heads, ref_heads = capture_head(ours), capture_head(reference)
    height, width, bs = EVAL_INPUT[profile]
    report = Report()
    for k, frame in enumerate(make_scene(3, bs, height, width, seed=3), start=1):
        with torch.no_grad():
            ours_results = run_ours(ours, to(frame, device, torch.float64))
            ref_results = run_reference(reference, to(frame, device, torch.float64), device, float64=True)
        tag = f"frame {k}:"
        compare_head(report, tag, ours_heads[-1], ref_heads[-1], training=False)
        for b, (mine, theirs) in enumerate(zip(ours_results, (r["img_bbox"] for r in ref_results))):
            for key in report.same_keys(f"{tag} sample {b} decoded keys", mine, theirs):
                if key == "boxes_3d":
                    report.close(f"{tag} sample {b} decoded boxes_3d[:, :6]", mine[key][:, :6], theirs[key][:, :6])
                    report.close(f"{tag} sample {b} decoded yaw", mine[key][:, 6], theirs[key][:, 6], angle=True)
                    report.close(f"{tag} sample {b} decoded velocity", mine[key][:, 7:], theirs[key][:, 7:])
                else:
                    report.close(f"{tag} sample {b} decoded {key}", mine[key], theirs[key])
        compare_bank(report, tag, ours.head.instance_bank, reference.head.instance_bank)
    assert bool(reference.head.instance_bank.mask.all()), "the scene's frames must use the cached instances"
    report.check()


@contextlib.contextmanager
def recording_key_points(*classes) -> Iterator[list[list[torch.Tensor]]]:
    """Records the normalised image coordinates (bs, cams, n, pts, 2) that each class's `project_points` returns."""
    records: list[list[torch.Tensor]] = [[] for _ in classes]
    saved = [cls.__dict__["project_points"] for cls in classes]

    def recorder(function, record):
        def project_points(*args, **kwargs):
            points = function(*args, **kwargs)
            record.append(points.detach().clone())
            return points

        return staticmethod(project_points)

    for cls, function, record in zip(classes, saved, records):
        cls.project_points = recorder(function.__func__, record)
    try:
        yield records
    finally:
        for cls, function in zip(classes, saved):
            cls.project_points = function


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("profile", ["demo", "full"])
def test_eval_in_fp32_matches_the_reference_but_for_border_crossings(profile, device, monkeypatch):
    """The first frame in float32: every decoder's boxes, logits and quality, for every query but those whose
    key point crosses an image border between the two models.

    In float32 the two implementations round differently (key points ~1e-6 apart), and two of the reference's
    operations are discontinuous: the op drops a key point whose normalised coordinate is not strictly inside
    (0, 1), and the instance bank and decoder rank by confidence. Measured on the full profile (this scene): at
    decoder 5 query 565's key point 1 projects to y = 1.0000020 in ours and 0.9999991 in the reference, so one
    samples it and the other does not (that query's outputs then differ by up to 7e-3, its confidence by 9e-4,
    and it moves past 8 others among the cached instances); three more pairs of the 600 cached instances swap
    places, their confidences 3e-7 to 6e-7 apart. Away from those, float32 rounding through ResNet-50 and 6
    decoders reaches 1.95e-4 (a velocity of 0.17: twice the predicted displacement over the 0.5 s default
    interval), past the 1e-4 bound. The same comparisons in float64 (the test above), crossings and ranks
    included, agree to 6e-8 relative, so the float32 gaps are rounding: here the bound is 1e-3, a crossing query is
    left out from the decoder where it crosses (at most 1 % of the queries), and the ranked state is checked in
    float64 only.
    """
    from model.blocks import DeformableFeatureAggregation as OurAggregation

    device = torch.device(device)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ours, reference = build_pair(profile, device)
    ours.eval()
    reference.eval()
    ours_heads, ref_heads = capture_head(ours), capture_head(reference)
    height, width, bs = EVAL_INPUT[profile]
    frame = make_scene(1, bs, height, width, seed=3)[0]
    ref_class = type(next(m for m in reference.modules() if type(m).__name__ == "DeformableFeatureAggregation"))
    with torch.no_grad(), recording_key_points(OurAggregation, ref_class) as (our_points, ref_points):
        run_ours(ours, to(frame, device))
        run_reference(reference, to(frame, device), device)
    crossed = torch.zeros(bs, ours.head.instance_bank.num_anchor, dtype=torch.bool)
    report = Report(FP32_TOLERANCE)
    assert len(our_points) == len(ref_points) == len(ours_heads[-1]["prediction"])
    for i, (mine, theirs) in enumerate(zip(our_points, ref_points)):
        inside = [((p > 0) & (p < 1)).all(dim=-1).cpu() for p in (mine, theirs)]  # (bs, cams, n, pts)
        crossed |= (inside[0] != inside[1]).any(dim=-1).any(dim=1)
        keep = ~crossed
        for key in ("prediction", "classification", "quality"):
            a, b = ours_heads[-1][key][i], ref_heads[-1][key][i]
            if a is not None and b is not None:
                a, b = a[keep.to(a.device)], b[keep.to(b.device)]
            report.close(f"decoder {i} {key}", a, b)
    assert int(crossed.sum()) <= 0.01 * crossed.numel(), f"{int(crossed.sum())} queries cross an image border"
    report.check()


def training_step(model, frame: dict, seed: int, device: torch.device, reference: bool) -> tuple[dict, dict, Any]:
    """One seeded step: the loss terms, every parameter's gradient, and the RNG states after it."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    if reference:
        losses = run_reference(model, frame, device, float64=True)
    else:
        losses = run_ours(model, frame)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy())
    if device.type == "cuda":
        rng += (torch.cuda.get_rng_state(),)
    return {k: v.detach() for k, v in losses.items()}, grads, rng


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("profile", ["demo", "full"])
def test_training_frames_with_temporal_denoising_match_the_reference(profile, device):
    device = torch.device(device)
    ours, reference = build_pair(profile, device, torch.float64)
    ours.train()
    reference.train()
    ours_heads, ref_heads = capture_head(ours), capture_head(reference)
    height, width, bs = TRAIN_INPUT[profile]
    frames = make_scene(2, bs, height, width, targets=True, seed=4)
    report = Report()
    for k, frame in enumerate(frames, start=1):
        seed = 10 + k
        mine = training_step(ours, to(frame, device, torch.float64), seed, device, reference=False)
        theirs = training_step(reference, to(frame, device, torch.float64), seed, device, reference=True)
        tag = f"train frame {k}:"
        compare_head(report, tag, ours_heads[-1], ref_heads[-1], training=True)
        for key in report.same_keys(f"{tag} loss terms", mine[0], theirs[0]):
            report.close(f"{tag} {key}", mine[0][key], theirs[0][key])
        trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
        assert set(theirs[1]) == trainable, f"no gradient for {sorted(trainable - set(theirs[1]))[:5]}"
        for name in report.same_keys(f"{tag} parameters with a gradient", mine[1], theirs[1]):
            report.close(f"{tag} grad {name}", mine[1][name], theirs[1][name])
        for i, (a, b) in enumerate(zip(mine[2], theirs[2])):
            report.close(f"{tag} RNG state {['torch', 'numpy', 'cuda'][i]} after the step", a, b)
        assert any(key.startswith("loss_cls_dn_") for key in theirs[0]), "denoising must be active"
    assert "temp_dn_valid_mask" in ref_heads[-1], "temporal denoising must be active on frame 2"
    report.check()


def retaining_head_grads(model: torch.nn.Module) -> list:
    """Like capture_head, and the head's boxes and quality logits keep their gradients."""
    outputs: list = []

    def hook(module, inputs, output):
        for key in ("prediction", "quality"):
            for tensor in output[key]:
                if tensor is not None and tensor.requires_grad:
                    tensor.retain_grad()
        outputs.append(output)

    model.head.register_forward_hook(hook)
    return outputs


def test_the_ports_centerness_detach_matches_the_patched_reference_and_changes_the_box_gradient():
    """model.loss.detach_centerness_target, both values, on a training frame in float64 (demo profile): every loss
    and gradient against the reference (True: with the Ascend port's mmdet.patch); then ours between the two values.

    The centerness target exp(-|box_target - box|) is built from the predicted box, and only its gradient changes:
    the losses are equal, and so is the gradient w.r.t. the centerness logit (d BCE / d logit = sigmoid(logit) -
    target: the target's value, not its gradient); the gradient w.r.t. the predicted boxes (the target's input)
    differs, and with it the regression branch's parameters."""
    device = torch.device("cpu")
    height, width, bs = TRAIN_INPUT["demo"]
    frame = make_scene(1, bs, height, width, targets=True, seed=4)[0]
    runs = {}
    for detach in (False, True):
        ours, reference = build_pair("demo", "cpu", torch.float64, detach_centerness_target=detach)
        assert ours.head.loss_reg.detach_centerness_target is detach
        ours.train()
        reference.train()
        ours_heads, ref_heads = retaining_head_grads(ours), capture_head(reference)
        mine = training_step(ours, to(frame, device, torch.float64), 11, device, reference=False)
        theirs = training_step(reference, to(frame, device, torch.float64), 11, device, reference=True)
        report = Report()
        compare_head(report, f"detach {detach}:", ours_heads[-1], ref_heads[-1], training=True)
        assert any(key.startswith("loss_cns_") for key in theirs[0])
        for key in report.same_keys(f"detach {detach}: loss terms", mine[0], theirs[0]):
            report.close(f"detach {detach}: {key}", mine[0][key], theirs[0][key])
        for name in report.same_keys(f"detach {detach}: parameters with a gradient", mine[1], theirs[1]):
            report.close(f"detach {detach}: grad {name}", mine[1][name], theirs[1][name])
        report.check()
        head = ours_heads[-1]
        quality = [q.grad for q in head["quality"] if q is not None]
        boxes = [p.grad for p, q in zip(head["prediction"], head["quality"]) if q is not None]
        runs[detach] = mine[0], mine[1], quality, boxes
    (loss_kept, grads_kept, quality_kept, boxes_kept), (loss_cut, grads_cut, quality_cut, boxes_cut) = (
        runs[False],
        runs[True],
    )
    assert quality_kept and all(g is not None for g in quality_kept + boxes_kept + quality_cut + boxes_cut)
    for key in loss_kept:
        torch.testing.assert_close(loss_cut[key], loss_kept[key], rtol=0, atol=0)
    for kept, cut in zip(quality_kept, quality_cut):
        torch.testing.assert_close(cut, kept, rtol=1e-12, atol=1e-15)
    box_change = max(float((cut - kept).abs().max()) for kept, cut in zip(boxes_kept, boxes_cut))
    assert box_change > 1e-6, "the centerness detach must change the gradient w.r.t. the predicted boxes"
    changed = {n for n in grads_kept if not torch.allclose(grads_cut[n], grads_kept[n], rtol=1e-9, atol=1e-12)}
    # The refinement modules' branches (model/detection3d.py): boxes (`layers`) and quality (`quality_layers`).
    box_branch = {n for n in grads_kept if re.fullmatch(r"head\.layers\.\d+\.layers\..*", n)}
    quality_branch = {n for n in grads_kept if ".quality_layers." in n}
    assert box_branch and quality_branch
    assert box_branch & changed, "the centerness detach must change the box branch's gradients"
    assert not quality_branch & changed, f"the quality branch's gradients changed: {sorted(quality_branch & changed)}"


def test_the_reference_op_stand_in_is_the_kernel_oracle():
    """The reference's op path runs the oracle on the active (point, camera) pairs only, with the gradients by
    pieces (tests/reference.py): the same values and gradients as the oracle on the whole problem."""
    from tests.kernel_oracle import deformable_aggregation_oracle
    from tests.reference import OracleAggregation

    gen = torch.Generator().manual_seed(5)
    bs, anchors, pts, cams, groups, channels = 2, 7, 5, 3, 2, 8
    shapes = torch.tensor([[[6, 10], [3, 5]]] * cams)
    sizes = (shapes[..., 0] * shapes[..., 1]).flatten()
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]).reshape(cams, 2)
    inputs = [
        torch.randn(bs, int(sizes.sum()), channels, generator=gen, dtype=torch.float64),
        torch.rand(bs, anchors, pts, cams, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2,
        torch.rand(bs, anchors, pts, cams, 2, groups, generator=gen, dtype=torch.float64),
    ]
    inputs[1][0, 0, 0, 0] = torch.tensor([0.0, 0.5])  # on the border: dropped by the kernel
    grad_output = torch.randn(bs, anchors, channels, generator=gen, dtype=torch.float64)
    results = []
    for function in (deformable_aggregation_oracle, OracleAggregation.apply):
        leaves = [x.clone().requires_grad_() for x in inputs]
        output = function(leaves[0], shapes, starts, leaves[1], leaves[2])
        output.backward(grad_output)
        results.append([output] + [x.grad for x in leaves])
    for ours, oracle in zip(*results):
        torch.testing.assert_close(ours, oracle, rtol=1e-12, atol=1e-12)
    assert results[1][0].abs().sum() > 0 and results[1][2].abs().sum() > 0
