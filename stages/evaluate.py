"""DVC stage `evaluate`: inference over the val infos, official nuScenes detection and tracking
metrics, charts and pictures; distributed with torchrun when evaluate.devices > 1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli import run_stage, stage_parser
from pipeline.devices import DeviceError, resolve_device, run_workers
from pipeline.params import ParamsError, load_params


def run(args: argparse.Namespace) -> int:
    ep = load_params(args.params, "evaluate")
    device = resolve_device(str(ep["device"]))
    devices = int(ep["devices"])
    # The checkpoint scored is exactly the one named: --checkpoint, else evaluate.checkpoint
    # (dvc.yaml passes the param, which is also the stage's dependency).
    checkpoint = str(ep["checkpoint"]) if args.checkpoint is None else args.checkpoint
    if not checkpoint:
        raise ParamsError("--checkpoint is empty: name the checkpoint to score")
    Path(args.plots).mkdir(parents=True, exist_ok=True)
    worker_args = [
        "--params", args.params, "--infos", args.infos, "--checkpoint", checkpoint,
        "--out", args.out, "--metrics", args.metrics, "--plots", args.plots,
    ]  # fmt: skip
    return run_workers("pipeline.evaluate", worker_args, device, devices)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate", __doc__)
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_val.pkl")
    parser.add_argument("--checkpoint", help="the checkpoint to score (default: the params file's evaluate.checkpoint)")
    parser.add_argument("--out", default="runs/evaluate")
    parser.add_argument("--metrics", default="metrics/evaluate.json")
    parser.add_argument("--plots", default="plots/evaluate")
    args = parser.parse_args(argv)
    return run_stage("evaluate", run, args, errors=(DeviceError,))


if __name__ == "__main__":
    sys.exit(main())
