"""One accelerator (CUDA GPU or Ascend NPU), the full seed model: fp16 training steps as the train stage
runs them, against fp32, and the seed's performance measure.

The model is params-full.yaml's (ResNet-50 with checkpointing, 900 anchors + denoising, 6 decoders) on a
synthetic batch of the seed's size per device (6 samples x 6 cameras x 256 x 704, 30 boxes each). A step is
forward, losses, backward (static loss scale 32 in fp16, as the reference), unscale, clipping at 25 and the
AdamW update — the train stage's step. Mixed precision is the reference's split: only the image features
(backbone, neck, depth net) in fp16, the head and the losses in fp32. Prints the mean step time of each
precision after warm-up, the ratio, the peak memory and whether every loss and gradient is finite.

Then the seed's measure (the Ascend port's test/train_performance_8p.sh on one device): `--seed-iters`
fp16 iterations timed from one iteration's end to the next, averaged over all but the first, and
FPS = batch / that time. The seed's table is 8 devices at 6 each (global batch 48); one device at
batch 6 is the same per-device work without the gradient all-reduce.

Side by side with the reference (`--reference`, on by default on a CUDA GPU): the reference's own
model (HorizonRobotics/Sparse4D c41df4bb, built by tests/reference.py from its checkout) with the same
initial weights, batch and step, through its compiled deformable-aggregation op
(benchmarks/device_check.sh builds it), and its own mixed precision (mmcv's wrap_fp16_model, as its
Fp16OptimizerHook does: auto_fp16 on the image features, static loss scale 32). The two models run one
after the other in this process, on the same device; the script prints ours / reference for the step
time and the peak memory, fp32 and fp16. Without the compiled op the comparison is skipped, saying so
(the oracle that stands in for it is not the reference's speed). On a CPU (`--reference on`, the smoke
test) the reference runs its grid_sample fallback, in fp32 only (mmcv's fp16 is CUDA's autocast).

The summary at the end (device, versions, aggregation backend, figures) is meant to be pasted into
an issue. Run from the repository root in the project's environment:

    python -m benchmarks.device_check [--device auto|npu|cuda|cpu] [--batch 6] [--iters 5] [--warmup 2]
        [--seed-iters 50] [--params params-full.yaml] [--reference auto|on|off]

(`--device cpu --params params.yaml --batch 1` is a quick smoke test of the script itself.)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from model import build_model
from model.ops.deformable_aggregation import select_backend
from pipeline.devices import amp_dtype, grad_scaler, resolve_device

ROOT = Path(__file__).resolve().parents[1]


def synthetic_batch(bs: int, height: int, width: int, num_gt: int, device: torch.device, seed: int = 0) -> dict:
    """Six pinhole cameras around the LiDAR, random images and boxes within 40 m, depth targets."""
    rng = np.random.default_rng(seed)
    focal = width / 2 / math.tan(math.radians(35))
    intrinsic = np.array([[focal, 0, width / 2, 0], [0, focal, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    mats = []
    for cam in range(6):
        yaw = cam * np.pi / 3
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = [[np.sin(yaw), -np.cos(yaw), 0], [0, 0, -1], [np.cos(yaw), np.sin(yaw), 0]]
        mats.append(intrinsic @ lidar2cam)
    boxes = [
        torch.tensor(
            np.c_[
                rng.uniform(-40, 40, (num_gt, 2)),
                rng.uniform(-1, 0.5, num_gt),
                np.exp(rng.normal(0, 0.3, (num_gt, 3))) * [1.9, 4.5, 1.7],
                rng.uniform(-np.pi, np.pi, num_gt),
                rng.normal(0, 3, (num_gt, 2)),
            ],
            dtype=torch.float32,
        )
        for _ in range(bs)
    ]
    batch = dict(
        img=torch.randn(bs, 6, 3, height, width),
        projection_mat=torch.tensor(np.stack(mats), dtype=torch.float32)[None].repeat(bs, 1, 1, 1),
        image_wh=torch.tensor([[width, height]], dtype=torch.float32).repeat(bs, 6, 1),
        timestamp=torch.zeros(bs, dtype=torch.float64),
        focal=torch.full((bs, 6), float(focal)),
        gt_labels_3d=[torch.tensor(rng.integers(0, 10, num_gt)) for _ in range(bs)],
        gt_bboxes_3d=boxes,
        gt_depth=[torch.rand(bs * 6, height // s, width // s) * 50 for s in (4, 8, 16)],
    )
    batch = {k: (v.to(device) if torch.is_tensor(v) else [x.to(device) for x in v]) for k, v in batch.items()}
    batch["img_metas"] = [dict(T_global=np.eye(4), T_global_inv=np.eye(4), instance_id=np.arange(num_gt))] * bs
    return batch


def training_setup(model_cfg: dict, anchor: np.ndarray, device: torch.device, precision: str) -> tuple:
    """The train stage's model (seeded), AdamW and loss scaler for one precision."""
    torch.manual_seed(0)
    model = build_model(dict(model_cfg), anchor).to(device)
    model.set_mixed_precision(amp_dtype(device, precision))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=1e-3)
    return model, optimizer, grad_scaler(device, precision, init_scale=32.0)


def reference_setup(model_cfg: dict, anchor: np.ndarray, device: torch.device, precision: str) -> tuple:
    """The reference's detector with our seeded initial weights (copied by name), AdamW and the same loss
    scaler; fp16 as the reference's Fp16OptimizerHook sets it up (mmcv's wrap_fp16_model). Its deformable
    aggregation: the compiled op on CUDA, the grid_sample fallback elsewhere."""
    from tests.reference import build_reference, copy_state, reference_params

    ours = training_setup(model_cfg, anchor, torch.device("cpu"), "fp32")[0]
    reference = build_reference(reference_params(dict(model_cfg)), anchor, use_deformable_func=device.type == "cuda")
    copy_state(ours, reference)
    reference.to(device).train()
    if precision != "fp32":
        from mmcv.runner import wrap_fp16_model

        wrap_fp16_model(reference)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=6e-4, weight_decay=1e-3)
    return ReferenceLosses(reference, device), optimizer, grad_scaler(device, precision, init_scale=32.0)


class ReferenceLosses(torch.nn.Module):
    """The reference detector called as its training loop calls it (`model(img=..., **data)`), returning
    the loss terms (mmdet's parse_losses sums the entries named loss*)."""

    def __init__(self, reference: torch.nn.Module, device: torch.device):
        super().__init__()
        self.reference, self.device = reference, device

    def forward(self, batch: dict) -> dict:
        from tests.reference import running_reference

        data = dict(batch)
        img = data.pop("img")
        with running_reference(self.device):
            losses = self.reference(img=img, **data)
        return {k: v for k, v in losses.items() if "loss" in k}


def compiled_reference_op() -> bool:
    """Whether the reference's compiled CUDA op imports (device_check.sh builds it)."""
    from tests.reference import _compiled_op

    return _compiled_op() is not None


def train_step(model, optimizer, scaler, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, losses, backward, unscale, clipping at 25, the AdamW update: the loss and gradient norm."""
    loss = sum(model(batch).values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 25.0)
    scaler.step(optimizer)
    scaler.update(32.0)
    return loss, norm


def run(
    precision: str,
    batch: dict,
    model_cfg: dict,
    anchor: np.ndarray,
    iters: int,
    warmup: int,
    device,
    reference: bool = False,
) -> dict:
    setup = reference_setup if reference else training_setup
    model, optimizer, scaler = setup(model_cfg, anchor, device, precision)
    times, finite = [], True
    accel = accelerator(device)
    if accel is not None:
        accel.reset_peak_memory_stats(device)
    for _ in range(warmup + iters):
        start = time.perf_counter()
        loss, norm = train_step(model, optimizer, scaler, batch)
        if accel is not None:
            accel.synchronize(device)
        times.append(time.perf_counter() - start)
        finite &= bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
    peak = accel.max_memory_allocated(device) / 2**30 if accel is not None else float("nan")
    return dict(step_s=float(np.mean(times[warmup:])), finite=finite, loss=float(loss), peak_gib=peak)


def accelerator(device: torch.device):
    """torch.cuda or torch.npu (torch_npu's synchronize and memory statistics), None on the CPU."""
    return {"cuda": torch.cuda, "npu": getattr(torch, "npu", None)}.get(device.type)


def seed_measure(
    batch: dict, model_cfg: dict, anchor: np.ndarray, iters: int, device: torch.device, precision: str
) -> dict:
    """The seed's step time: mixed-precision iterations timed end to end (every iteration but the first)."""
    model, optimizer, scaler = training_setup(model_cfg, anchor, device, precision)
    accel = accelerator(device)
    ends = [time.perf_counter()]
    for _ in range(iters):
        loss, _ = train_step(model, optimizer, scaler, batch)
        float(loss)  # the seed logs the loss every iteration: a host sync, as in its loop
        if accel is not None:
            accel.synchronize(device)
        ends.append(time.perf_counter())
    gaps = np.diff(ends)[1:]  # every iteration but the first
    return dict(iter_s=float(np.mean(gaps)), iters=len(gaps))


def versions(device: torch.device) -> str:
    """torch, the accelerator's name and its software, and the aggregation backend "auto" picks."""
    parts = [f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    elif device.type == "npu":
        import torch_npu

        parts.append(f"{torch.npu.get_device_name(device)}, torch_npu {torch_npu.__version__}")
        try:
            import mx_driving

            parts.append(f"mx_driving {getattr(mx_driving, '__version__', 'installed')}")
        except ImportError:
            parts.append("mx_driving not installed")
    parts.append(f"aggregation backend {select_backend(device)}")
    return ", ".join(parts)


def side_by_side(args, device: torch.device, batch: dict, model_cfg: dict, anchor: np.ndarray, ours: dict) -> list:
    """The reference's step on the same device and batch (see the module docstring): its figures and
    ours / reference, as summary lines (or the reason it was skipped)."""
    if args.reference == "off" or (args.reference == "auto" and device.type != "cuda"):
        return []
    from tests.reference import require_reference

    try:
        require_reference()
    except Exception as err:  # pytest's Skipped when the checkout is missing
        return [f"  the reference: not timed ({err})"]
    if device.type == "cuda" and not compiled_reference_op():
        return ["  the reference: not timed (its compiled op deformable_aggregation_ext does not import: "
                "bash benchmarks/device_check.sh builds it)"]  # fmt: skip
    # mmcv's fp16 (the reference's) is CUDA autocast: on other devices the reference runs fp32 only
    precisions = [p for p in ours if p == "fp32" or device.type == "cuda"]
    op = "compiled op" if device.type == "cuda" else "grid_sample fallback"
    lines = []
    for precision in precisions:
        ref = run(precision, batch, model_cfg, anchor, args.iters, args.warmup, device, reference=True)
        mine = ours[precision]
        line = (
            f"  the reference {precision} ({op}): {ref['step_s']:.3f} s/step, peak {ref['peak_gib']:.1f} GiB, "
            f"finite {ref['finite']}; ours / reference: step {mine['step_s'] / ref['step_s']:.2f}x"
        )
        if device.type != "cpu":
            line += f", peak memory {mine['peak_gib'] / ref['peak_gib']:.2f}x"
        print(line.strip())
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (an NPU, else a CUDA GPU), npu, cuda or cpu")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed-iters", type=int, default=50, help="iterations of the seed's measure (0: skip)")
    parser.add_argument("--params", default=str(ROOT / "params-full.yaml"), help="the profile whose model is run")
    parser.add_argument(
        "--reference",
        choices=("auto", "on", "off"),
        default="auto",
        help="time the reference's step too (auto: on a CUDA GPU, with its compiled op)",
    )
    args = parser.parse_args(argv)
    kind = resolve_device(args.device)
    if kind == "cpu" and args.device == "auto":
        raise SystemExit("device_check: no NPU or CUDA device is visible (--device cpu runs it on the CPU)")
    device = torch.device(kind, 0) if kind != "cpu" else torch.device("cpu")
    params = yaml.safe_load(Path(args.params).read_text())
    height, width = params["data"]["aug"]["final_dim"]
    rng = np.random.default_rng(1)
    num_anchor = int(params["anchors"]["num_anchor"])
    anchor = np.zeros((num_anchor, 11), np.float32)
    anchor[:, :2] = rng.uniform(-50, 50, (num_anchor, 2))
    anchor[:, 3:6] = np.log([1.9, 4.5, 1.7])
    anchor[:, 7] = 1.0
    batch = synthetic_batch(args.batch, height, width, 30, device)
    # fp16 as the seed on an accelerator; the CPU's autocast takes bf16 only (torch 2.1)
    low = "fp16" if device.type != "cpu" else "bf16"
    results = {p: run(p, batch, params["model"], anchor, args.iters, args.warmup, device) for p in ("fp32", low)}
    for precision, r in results.items():
        print(
            f"{precision}: {r['step_s']:.3f} s/step at batch {args.batch} ({args.batch / r['step_s']:.2f} samples/s), "
            f"peak {r['peak_gib']:.1f} GiB, loss {r['loss']:.3f}, finite {r['finite']}"
        )
    ratio = results[low]["step_s"] / results["fp32"]["step_s"]
    print(f"{low} step = {ratio:.2f}x the fp32 step on {device}")
    summary = [f"device_check summary: {versions(device)}", f"  profile {Path(args.params).name}, batch {args.batch}"]
    for precision, r in results.items():
        summary.append(f"  {precision}: {r['step_s']:.3f} s/step, peak {r['peak_gib']:.1f} GiB, finite {r['finite']}")
    summary += side_by_side(args, device, batch, params["model"], anchor, results)
    if args.seed_iters > 1:
        seed = seed_measure(batch, params["model"], anchor, args.seed_iters, device, low)
        summary.append(
            f"  the seed's measure ({low}, {seed['iters']} iterations end to end): {seed['iter_s']:.3f} s/iteration, "
            f"FPS {args.batch / seed['iter_s']:.2f} on this device (the seed's table, 8 devices x 6: "
            "Atlas 800T A2 NPUs 1.110 s, 43.2 FPS; GPUs 0.777 s, 61.8 FPS)"
        )
    print("\n".join(summary))
    if not all(r["finite"] for r in results.values()):
        raise SystemExit("device_check: a non-finite loss or gradient")


if __name__ == "__main__":
    main()
