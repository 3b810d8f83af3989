"""DVC stage `fingerprint`: the sensor files training and evaluation read, by name and size.

Runs on every `dvc repro` (always_changed, seconds even on v1.0-trainval); the stages after it
rerun only when the written fingerprint changes (pipeline/fingerprint.py says what it sees)."""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.fingerprint import FingerprintError, dataset_fingerprint
from pipeline.params import ParamsError, load_params, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/fingerprint.json")
    args = parser.parse_args(argv)
    try:
        p = load_params(args.params, "convert")
        start = time.perf_counter()
        fingerprint = dataset_fingerprint(p["data_root"])
    except (FingerprintError, ParamsError) as err:
        print(f"fingerprint: {err}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, fingerprint)
    files = sum(f["files"] for f in fingerprint.values())
    print(f"fingerprint: {files} files in {len(fingerprint)} folders in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
