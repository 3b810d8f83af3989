"""DVC stage `train`: Sparse4D training on NPU, GPU or CPU, launched with torchrun when more than
one process is asked for (train.devices per node, train.nnodes nodes)."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import run_stage, stage_parser
from pipeline.devices import DeviceError, resolve_device, run_workers
from pipeline.params import load_params


def run(args: argparse.Namespace) -> int:
    tp = load_params(args.params, "train")
    device = resolve_device(str(tp["device"]))  # the schema checked the numbers of devices and nodes
    devices, nnodes = int(tp["devices"]), int(tp["nnodes"])
    worker_args = [
        "--params", args.params, "--infos", args.infos, "--anchors", args.anchors, "--backbone", args.backbone,
        "--out", args.out, "--metrics", args.metrics, "--live", args.live, "--val-infos", args.val_infos,
    ]  # fmt: skip
    return run_workers(
        "pipeline.train", worker_args, device, devices, nnodes, int(tp["node_rank"]), str(tp["master_addr"]),
        int(tp["master_port"]),
    )  # fmt: skip


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
    args = parser.parse_args(argv)
    return run_stage("train", run, args, errors=(DeviceError,))


if __name__ == "__main__":
    sys.exit(main())
