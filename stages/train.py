"""DVC stage `train`: Sparse4D training on NPU, GPU or CPU, launched with torchrun when more than
one process is asked for (train.devices per node, train.nnodes nodes) or train.max_restarts > 0.

On several nodes, node 0 runs this stage through `dvc repro` (or `dvc exp run`); every other node
runs `python -m stages.train --node-rank K` in its own copy of the project (the same commit,
params and data), which joins the same rendezvous and writes no DVC output: rank 0, on node 0,
reads the checkpoint and writes the model and metrics."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import run_stage, stage_parser
from pipeline.devices import DeviceError, Launch, resolve_device, resolve_devices, run_workers
from pipeline.params import ParamsError, load_params


def run(args: argparse.Namespace) -> int:
    tp = load_params(args.params, "train")
    device = resolve_device(str(tp["device"]))
    nnodes = int(tp["nnodes"])
    if not 0 <= args.node_rank < nnodes:
        raise ParamsError(f"--node-rank: {args.node_rank} is not a node of train.nnodes = {nnodes} (0 .. {nnodes - 1})")
    launch = Launch(
        devices=resolve_devices(tp["devices"], device, "train.devices"),
        nnodes=nnodes,
        node_rank=args.node_rank,
        master_addr=str(tp["master_addr"]),
        master_port=int(tp["master_port"]),
        join_timeout=int(tp["join_timeout"]),
        max_restarts=int(tp["max_restarts"]),
    )
    worker_args = [
        "--params", args.params, "--infos", args.infos, "--anchors", args.anchors, "--backbone", args.backbone,
        "--out", args.out, "--metrics", args.metrics, "--live", args.live, "--val-infos", args.val_infos,
    ]  # fmt: skip
    return run_workers("pipeline.train", worker_args, device, launch)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("train", __doc__)
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_train.pkl")
    parser.add_argument(
        "--val-infos", default="data/infos/nuscenes_infos_val.pkl", help="read when train.eval_interval > 0"
    )
    parser.add_argument("--anchors", default="data/anchors/nuscenes_kmeans.npy")
    parser.add_argument("--backbone", default="ckpt/backbone.json")
    parser.add_argument("--out", default="runs/train")
    parser.add_argument("--metrics", default="metrics/train.json")
    parser.add_argument("--live", default="runs/train/live")
    parser.add_argument(
        "--node-rank",
        type=int,
        default=0,
        help="this node's rank when train.nnodes > 1: 0 under dvc repro on the first node, K on the others",
    )
    args = parser.parse_args(argv)
    return run_stage("train", run, args, errors=(DeviceError,))


if __name__ == "__main__":
    sys.exit(main())
