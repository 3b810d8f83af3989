"""DVC stage `fingerprint`: the sensor files training and evaluation read, by name and size.

Runs on every `dvc repro` (always_changed, seconds even on v1.0-trainval); the stages after it
rerun only when the written fingerprint changes (pipeline/fingerprint.py says what it sees)."""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.cli import run_stage, stage_parser
from pipeline.files import write_json_atomic
from pipeline.fingerprint import FingerprintError, dataset_fingerprint
from pipeline.params import load_params


def run(args: argparse.Namespace) -> None:
    p = load_params(args.params, "convert")
    start = time.perf_counter()
    result = dataset_fingerprint(p["data_root"])
    elapsed = time.perf_counter() - start
    write_json_atomic(args.out, result)
    files = sum(f["files"] for f in result.values())
    print(f"fingerprint: {files} files in {len(result)} folders in {elapsed:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("fingerprint", __doc__)
    parser.add_argument("--out", default="data/fingerprint.json")
    args = parser.parse_args(argv)
    return run_stage("fingerprint", run, args, errors=(FingerprintError,), section="convert")


if __name__ == "__main__":
    sys.exit(main())
