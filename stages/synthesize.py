"""DVC stage `synthesize`: write the synthetic nuScenes twin (the embedded default dataset)."""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.cli import run_stage, stage_parser
from pipeline.files import write_json_atomic
from pipeline.params import ParamsError, load_params
from pipeline.twin.writer import TwinConfig, TwinConfigError, write_twin


def run(args: argparse.Namespace) -> None:
    p = load_params(args.params, "synthesize")
    cfg = TwinConfig(
        version=p["version"],
        seed=int(p["seed"]),
        num_scenes=int(p["num_scenes"]),
        samples_per_scene=int(p["samples_per_scene"]),
        objects_per_scene=int(p["objects_per_scene"]),
        image_width=int(p["image_width"]),
        image_height=int(p["image_height"]),
        jpeg_quality=int(p["jpeg_quality"]),
        sweeps_per_sample=int(p["sweeps_per_sample"]),
        lidar_azimuth_steps=int(p["lidar_azimuth_steps"]),
        classes=tuple(p["classes"]),
    )
    try:
        cfg.validate()
    except TwinConfigError as err:
        raise ParamsError(f"{args.params}: {err}") from None
    start = time.perf_counter()
    counts = write_twin(cfg, args.out)
    # The time goes to the log, not the metrics: the metrics file is hashed into dvc.lock.
    write_json_atomic(args.metrics, counts)
    print(f"synthesize: wrote {args.out} in {time.perf_counter() - start:.0f} s: {counts}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("synthesize", __doc__)
    parser.add_argument("--out", default="data/nuscenes", help="dataset root to write")
    parser.add_argument("--metrics", default="metrics/synthesize.json")
    args = parser.parse_args(argv)
    return run_stage("synthesize", run, args)


if __name__ == "__main__":
    sys.exit(main())
