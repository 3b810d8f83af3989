"""DVC stage `synthesize`: write the synthetic nuScenes twin (the embedded default dataset).

The twin is written only when convert reads it: with convert.data_root naming another dataset
(real nuScenes, e.g. data/nuscenes-real), the output folder gets a one-file placeholder instead,
in well under a second."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli import run_stage, stage_parser
from pipeline.files import atomic_directory, write_json_atomic
from pipeline.params import ParamsError, read_params

if TYPE_CHECKING:
    from pipeline.twin.writer import TwinConfig

PLACEHOLDER = "NOT_SYNTHESIZED.txt"


def twin_config(p: dict, params_path: str) -> TwinConfig:
    from pipeline.twin.writer import TwinConfig, TwinConfigError

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
        raise ParamsError(f"{params_path}: {err}") from None
    return cfg


def write_placeholder(out: Path, data_root: str, params_path: str) -> None:
    """`out` as a folder holding only PLACEHOLDER, which says where the dataset is read instead;
    built beside `out` and renamed into place, as the twin is."""
    with atomic_directory(out) as tmp:
        (tmp / PLACEHOLDER).write_text(
            f"The synthetic nuScenes twin was not written here: convert.data_root in {params_path} is\n"
            f"{data_root}, so the pipeline reads that dataset instead. Set convert.data_root to\n"
            f"{out.as_posix()} to synthesize the twin here.\n"
        )


def run(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    data_root, out = str(params["convert"]["data_root"]), Path(args.out)
    if Path(data_root).resolve() != out.resolve():
        if out.resolve() in Path(data_root).resolve().parents:
            raise ParamsError(
                f"{args.params}: convert.data_root {data_root} lies inside {out.as_posix()}, the synthesize "
                "stage's output, which the stage replaces: put the dataset elsewhere (e.g. data/nuscenes-real)"
            )
        write_placeholder(out, data_root, args.params)
        write_json_atomic(args.metrics, {"synthesized": False, "data_root": data_root})
        print(f"synthesize: convert.data_root is {data_root}: the twin is not synthesized ({out / PLACEHOLDER})")
        return
    from pipeline.twin.writer import write_twin  # the devkit and the renderer: seconds to import

    cfg = twin_config(params["synthesize"], args.params)
    start = time.perf_counter()
    counts = write_twin(cfg, out, workers=args.workers)
    # The time goes to the log, not the metrics: the metrics file is hashed into dvc.lock.
    write_json_atomic(args.metrics, counts)
    print(f"synthesize: wrote {args.out} in {time.perf_counter() - start:.0f} s: {counts}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("synthesize", __doc__)
    parser.add_argument("--out", default="data/nuscenes", help="dataset root to write")
    parser.add_argument("--metrics", default="metrics/synthesize.json")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="scene-writing processes (default: one per core; same bytes whatever the count)",
    )
    args = parser.parse_args(argv)
    return run_stage("synthesize", run, args)


if __name__ == "__main__":
    sys.exit(main())
