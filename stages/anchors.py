"""DVC stage `anchors`: k-means anchors from the train info pkl."""

from __future__ import annotations

import argparse
import io
import pickle
import sys
from pathlib import Path

import numpy as np

from pipeline.anchors import AnchorError, kmeans_anchors
from pipeline.cli import run_stage, stage_parser
from pipeline.files import write_bytes_atomic, write_json_atomic
from pipeline.params import load_params


def run(args: argparse.Namespace) -> None:
    p = load_params(args.params, "anchors")
    if not Path(args.infos).is_file():
        raise AnchorError(f"{args.infos}: train info pkl not found (run the convert stage)")
    with open(args.infos, "rb") as f:
        infos = pickle.load(f)["infos"]
    boxes = [i["gt_boxes"] for i in infos if "gt_boxes" in i]
    if not boxes:
        raise AnchorError(f"{args.infos}: no gt_boxes (a test split has no annotations)")
    result, metrics = kmeans_anchors(
        np.concatenate(boxes), int(p["num_anchor"]), float(p["detection_range"]), int(p["seed"]), int(p["n_init"])
    )
    buf = io.BytesIO()
    np.save(buf, result)
    write_bytes_atomic(args.out, buf.getvalue())
    write_json_atomic(args.metrics, metrics)
    print(f"anchors: {result.shape} -> {args.out}, inertia {metrics['inertia']:.1f} over {metrics['boxes_used']} boxes")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("anchors", __doc__)
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_train.pkl")
    parser.add_argument("--out", default="data/anchors/nuscenes_kmeans.npy")
    parser.add_argument("--metrics", default="metrics/anchors.json")
    args = parser.parse_args(argv)
    return run_stage("anchors", run, args, errors=(AnchorError,))


if __name__ == "__main__":
    sys.exit(main())
