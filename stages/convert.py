"""DVC stage `convert`: nuScenes root -> Sparse4D info pkls and a per-split summary."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from pipeline.convert import ConvertError, convert, summarize
from pipeline.params import ParamsError, load_params, write_bytes_atomic, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/infos", help="folder for nuscenes_infos_<split>.pkl")
    parser.add_argument("--metrics", default="metrics/convert.json")
    args = parser.parse_args(argv)
    try:
        p = load_params(args.params, "convert")
        result = convert(p["data_root"], p["version"], max_sweeps=int(p["max_sweeps"]))
    except (ConvertError, ParamsError) as err:
        print(f"convert: {err}", file=sys.stderr)
        return 2
    except KeyError as err:
        print(f"convert: {args.params}: missing parameter convert.{err.args[0]}", file=sys.stderr)
        return 2
    out = Path(args.out)
    for split, data in result.items():
        write_bytes_atomic(out / f"nuscenes_infos_{split}.pkl", pickle.dumps(data, protocol=4))
    summary = summarize(result, p["data_root"], p["version"])
    write_json_atomic(args.metrics, summary)
    for split, s in summary.items():
        print(f"convert: {split}: {s['samples']} samples, {s['scenes']} scenes, {s['boxes']} boxes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
