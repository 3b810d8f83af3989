"""One accelerator, the full seed model: fp16 training steps as the train stage runs them, against fp32.

The model is params-full.yaml's (ResNet-50 with checkpointing, 900 anchors + denoising, 6 decoders) on a
synthetic batch of the seed's size per device (6 samples x 6 cameras x 256 x 704, 30 boxes each). A step is
forward, losses, backward (static loss scale 32 in fp16, as the reference), unscale, clipping at 25 and the
AdamW update — the train stage's step. Mixed precision is the reference's split: only the image features
(backbone, neck, depth net) in fp16, the head and the losses in fp32. Prints the mean step time of each
precision after warm-up, the ratio, the peak memory and whether every loss and gradient is finite.

Run: python -m benchmarks.device_check [--device cuda] [--batch 6] [--iters 5] [--warmup 2]
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
from pipeline.devices import amp_dtype, grad_scaler

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


def run(precision: str, batch: dict, model_cfg: dict, anchor: np.ndarray, iters: int, warmup: int, device) -> dict:
    torch.manual_seed(0)
    model = build_model(dict(model_cfg), anchor).to(device)
    model.set_mixed_precision(amp_dtype(device, precision))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=1e-3)
    scaler = grad_scaler(device, precision, init_scale=32.0)
    times, finite = [], True
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup + iters):
        start = time.perf_counter()
        losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 25.0)
        scaler.step(optimizer)
        scaler.update(32.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        finite &= bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dict(step_s=float(np.mean(times[warmup:])), finite=finite, loss=float(loss), peak_gib=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    params = yaml.safe_load((ROOT / "params-full.yaml").read_text())
    height, width = params["data"]["aug"]["final_dim"]
    rng = np.random.default_rng(1)
    num_anchor = int(params["anchors"]["num_anchor"])
    anchor = np.zeros((num_anchor, 11), np.float32)
    anchor[:, :2] = rng.uniform(-50, 50, (num_anchor, 2))
    anchor[:, 3:6] = np.log([1.9, 4.5, 1.7])
    anchor[:, 7] = 1.0
    batch = synthetic_batch(args.batch, height, width, 30, device)
    results = {p: run(p, batch, params["model"], anchor, args.iters, args.warmup, device) for p in ("fp32", "fp16")}
    for precision, r in results.items():
        print(
            f"{precision}: {r['step_s']:.3f} s/step at batch {args.batch} ({args.batch / r['step_s']:.2f} samples/s), "
            f"peak {r['peak_gib']:.1f} GiB, loss {r['loss']:.3f}, finite {r['finite']}"
        )
    ratio = results["fp16"]["step_s"] / results["fp32"]["step_s"]
    print(
        f"fp16 step = {ratio:.2f}x the fp32 step on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}"
    )
    if not all(r["finite"] for r in results.values()):
        raise SystemExit("device_check: a non-finite loss or gradient")


if __name__ == "__main__":
    main()
