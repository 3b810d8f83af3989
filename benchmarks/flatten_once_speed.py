"""Image features flattened once per frame against once per decoder layer: a full-configuration training step on CPU.

Every decoder layer's deformable aggregation reads the image features flattened channel-last. "after" (the model
as it is): the head wraps a frame's levels in one `model.ops.FlattenedFeatures`, flattened on first use, so a step
makes one copy and runs one backward from it into the levels. "before": every layer passes the levels themselves
(`features.feature_maps`) to `deformable_aggregation`, which flattens them inside the call, as the model did before;
autograd then keeps one copy per layer for the backward (6 decoders: 6 copies of bs x 6 cams x sum(H*W) x 256).

The model is params-full.yaml's `model` section (ResNet-50 with checkpointing, 256 x 704 input, 900 anchors +
denoising queries, 6 decoders), batch 1, fp32, torch backend, channels-last convolutions as the training stage runs
them; the batch is a real training sample of the synthetic twin through the seed's train pipeline. A step is forward,
losses and backward (no optimiser update: it does not touch the features). The first steps are warm-up.

Each variant runs in a fresh subprocess, which reports:
  * step time: mean over the timed steps (wall clock);
  * peak RSS: the process's resident-memory high-water mark (getrusage ru_maxrss), what the OS had to give it;
    with it the RSS just before the first step (model, batch, libraries), so "step peak" = peak - that is what
    the steps added at their worst. glibc keeps some freed memory, so it is an upper bound of the live tensors,
    measured the same way for both variants;
  * flattenings per step (forward calls of flatten_feature_maps), checking which variant ran.

The anchors are the k-means of the infos' boxes with params-full.yaml's `anchors` settings (computed once, in the
parent process), unless --anchors gives a file.

Run after `dvc repro convert`:
    python -m benchmarks.flatten_once_speed [--iters 3] [--warmup 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml

from benchmarks.train_step_speed import ROOT, full_config, full_params
from model import blocks, build_model
from model.ops import deformable_aggregation
from pipeline.dataset import collate, dataset_from_params

VARIANTS = ("before", "after")
MIB = 2**20


def flatten_per_layer() -> None:
    """The behaviour before flattening once per frame: each layer's aggregation gets the levels, flattens them."""

    def per_layer(features, points_2d, weights, backend):
        return deformable_aggregation(features.feature_maps, points_2d, weights, backend=backend)

    blocks.deformable_aggregation = per_layer


def count_flattenings() -> dict:
    """Counts the calls of flatten_feature_maps (one per flattened copy of the features)."""
    module = sys.modules["model.ops.deformable_aggregation"]
    seen = {"calls": 0}
    flatten = module.flatten_feature_maps

    def counted(*args, **kwargs):
        seen["calls"] += 1
        return flatten(*args, **kwargs)

    module.flatten_feature_maps = counted
    return seen


def measure(variant: str, infos: str, anchors: str, iters: int, warmup: int) -> dict:
    """Times `warmup + iters` training steps of the full model in this process; its memory figures."""
    if variant == "before":
        flatten_per_layer()
    flattenings = count_flattenings()
    mp, aug, _ = full_config()
    dataset = dataset_from_params(full_params(), infos, training=True)
    np.random.seed(0)
    batch = collate([dataset[1]])
    torch.manual_seed(0)
    model = build_model(dict(mp), np.load(anchors)).use_channels_last().train()
    rss_before = psutil.Process().memory_info().rss
    times = []
    for _ in range(warmup + iters):
        start = time.perf_counter()
        losses = model(batch)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {
        "times": times[warmup:],
        "peak_rss": peak,
        "rss_before": rss_before,
        "flattenings_per_step": flattenings["calls"] / (warmup + iters),
    }


def full_anchors(infos: str) -> np.ndarray:
    """(num_anchor, 11) k-means anchors of the infos' boxes, as the anchors stage makes them for the full profile."""
    from pipeline.anchors import kmeans_anchors

    cfg = yaml.safe_load((ROOT / "params-full.yaml").read_text())["anchors"]
    mp, _, num_anchor = full_config()
    dataset = dataset_from_params(full_params(), infos, training=True)
    boxes = np.concatenate([info["gt_boxes"] for info in dataset.data_infos])
    return kmeans_anchors(boxes, num_anchor, float(cfg["detection_range"]), int(cfg["seed"]))[0]


def run_variant(variant: str, args: argparse.Namespace, anchors: str) -> dict:
    """`measure` in a fresh interpreter, so that each variant's peak RSS is its own."""
    cmd = [sys.executable, "-m", "benchmarks.flatten_once_speed", "--variant", variant]
    cmd += ["--infos", args.infos, "--anchors", anchors, "--iters", str(args.iters)]
    cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant}: exit {done.returncode}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_train.pkl")
    parser.add_argument("--anchors", default="", help="(900, 11) anchors (.npy); default: k-means of the infos")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the subprocess of one variant
    args = parser.parse_args()
    if not Path(args.infos).is_file():
        sys.exit(f"{args.infos}: not found; run `dvc repro convert` first")
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(measure(args.variant, args.infos, args.anchors, args.iters, args.warmup)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        anchors = args.anchors
        if not anchors:
            anchors = str(Path(tmp) / "anchors.npy")
            np.save(anchors, full_anchors(args.infos))
        results = {variant: run_variant(variant, args, anchors) for variant in VARIANTS}
    for variant, r in results.items():
        r["mean"] = float(np.mean(r["times"]))
        r["step_peak"] = r["peak_rss"] - r["rss_before"]
        print(
            f"{variant:>6}: {r['mean']:6.2f} s per step ({', '.join(f'{t:.2f}' for t in r['times'])}), "
            f"peak RSS {r['peak_rss'] / MIB:6.0f} MiB (step peak {r['step_peak'] / MIB:5.0f} MiB above "
            f"{r['rss_before'] / MIB:.0f} MiB before the first step), "
            f"{r['flattenings_per_step']:g} flattenings per step",
            flush=True,
        )
    before, after = results["before"], results["after"]
    print(
        f"full config, batch 1, {args.threads} threads, torch {torch.__version__}: after / before: "
        f"step time {after['mean'] / before['mean']:.3f}x, peak RSS {after['peak_rss'] / before['peak_rss']:.3f}x, "
        f"step peak {after['step_peak'] / before['step_peak']:.3f}x "
        f"({(before['peak_rss'] - after['peak_rss']) / MIB:.0f} MiB less)"
    )


if __name__ == "__main__":
    main()
