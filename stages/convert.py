"""DVC stage `convert`: nuScenes root -> Sparse4D info pkls and a per-split summary."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from pipeline.cli import run_stage, stage_parser
from pipeline.convert import ConvertError, convert, summarize
from pipeline.files import write_bytes_atomic, write_json_atomic
from pipeline.params import load_params


def run(args: argparse.Namespace) -> None:
    p = load_params(args.params, "convert")
    result = convert(p["data_root"], p["version"], max_sweeps=int(p["max_sweeps"]))
    out = Path(args.out)
    for split, data in result.items():
        write_bytes_atomic(out / f"nuscenes_infos_{split}.pkl", pickle.dumps(data, protocol=4))
    summary = summarize(result, p["data_root"], p["version"])
    write_json_atomic(args.metrics, summary)
    for split, s in summary.items():
        print(f"convert: {split}: {s['samples']} samples, {s['scenes']} scenes, {s['boxes']} boxes")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("convert", __doc__)
    parser.add_argument("--out", default="data/infos", help="folder for nuscenes_infos_<split>.pkl")
    parser.add_argument("--metrics", default="metrics/convert.json")
    args = parser.parse_args(argv)
    return run_stage("convert", run, args, errors=(ConvertError,))


if __name__ == "__main__":
    sys.exit(main())
