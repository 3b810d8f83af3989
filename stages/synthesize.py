"""DVC stage `synthesize`: write the synthetic nuScenes twin (the embedded default dataset)."""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.params import ParamsError, load_params, write_json_atomic
from pipeline.twin.writer import TwinConfig, TwinConfigError, write_twin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/nuscenes", help="dataset root to write")
    parser.add_argument("--metrics", default="metrics/synthesize.json")
    args = parser.parse_args(argv)
    try:
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
        start = time.perf_counter()
        counts = write_twin(cfg, args.out)
    except ParamsError as err:
        print(f"synthesize: {err}", file=sys.stderr)  # names the file already
        return 2
    except TwinConfigError as err:
        print(f"synthesize: {args.params}: {err}", file=sys.stderr)
        return 2
    except KeyError as err:
        print(f"synthesize: {args.params}: missing parameter synthesize.{err.args[0]}", file=sys.stderr)
        return 2
    # The time goes to the log, not the metrics: the metrics file is hashed into dvc.lock.
    write_json_atomic(args.metrics, counts)
    print(f"synthesize: wrote {args.out} in {time.perf_counter() - start:.0f} s: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
