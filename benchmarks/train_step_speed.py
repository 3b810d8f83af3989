"""Full-configuration training step on this CPU: our deformable aggregation against the plain
grid_sample formulation (the reference's CPU fallback), same model, same batch, same process.

The model is the seed's sparse4dv3_temporal_r50_1x8_bs6_256x704 (ResNet-50 with checkpointing,
256 x 704 input, 900 anchors + denoising queries, 6 decoders), batch 1, fp32; the batch is a
real training sample of the synthetic twin through the seed's train pipeline. A step is forward,
losses, backward and the AdamW update. The first iterations of each run are warm-up.

Run after `dvc repro convert anchors`:
    python -m benchmarks.train_step_speed [--iters 3] [--warmup 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from model import build_model
from model.blocks import DeformableFeatureAggregation
from pipeline.dataset import collate, dataset_from_params

ROOT = Path(__file__).resolve().parents[1]


def full_params() -> dict:
    return yaml.safe_load((ROOT / "params-full.yaml").read_text())


def full_config() -> tuple[dict, dict, int]:
    params = full_params()
    return params["model"], params["data"]["aug"], int(params["anchors"]["num_anchor"])


def time_steps(backend: str, batch: dict, mp: dict, anchor: np.ndarray, iters: int, warmup: int) -> list[float]:
    torch.manual_seed(0)
    model = build_model(dict(mp), anchor).use_channels_last()
    for module in model.modules():
        if isinstance(module, DeformableFeatureAggregation):
            module.backend = backend
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=1e-3)
    times = []
    for _ in range(warmup + iters):
        start = time.perf_counter()
        losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 25.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_train.pkl")
    parser.add_argument("--anchors", default="", help="(900, 11) anchors; default: k-means of the infos")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["torch", "grid_sample"])
    parser.add_argument(
        "--with-cp",
        choices=["config", "true", "false"],
        default="config",
        help="gradient checkpointing in the backbone (the full config: true; a memory/speed trade, same maths)",
    )
    args = parser.parse_args()
    if not Path(args.infos).is_file():
        sys.exit(f"{args.infos}: not found; run `dvc repro convert` first")
    torch.set_num_threads(args.threads)
    mp, aug, num_anchor = full_config()
    if args.with_cp != "config":
        mp["with_cp"] = args.with_cp == "true"
    ds = dataset_from_params(full_params(), args.infos, training=True)
    np.random.seed(0)
    batch = collate([ds[1]])
    if args.anchors:
        anchor = np.load(args.anchors)
    else:
        from pipeline.anchors import kmeans_anchors

        boxes = np.concatenate([info["gt_boxes"] for info in ds.data_infos])
        anchor = kmeans_anchors(boxes, num_anchor, 55.0, seed=0)[0]
    results = {}
    for backend in args.backends:
        times = time_steps(backend, batch, mp, anchor, args.iters, args.warmup)
        results[backend] = float(np.mean(times))
        print(
            f"{backend:>10}: {results[backend]:6.2f} s per step  ({', '.join(f'{t:.2f}' for t in times)})", flush=True
        )
    if {"torch", "grid_sample"} <= set(results):
        print(
            f"full config (with_cp {mp['with_cp']}), batch 1, {args.threads} threads: ours {results['torch']:.2f} s, plain grid_sample "
            f"{results['grid_sample']:.2f} s per step: {results['torch'] / results['grid_sample']:.2f}x the time"
        )


if __name__ == "__main__":
    main()
