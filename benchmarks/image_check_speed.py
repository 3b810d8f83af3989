"""Image reading: the dataset's checked reader against plain `cv2.imread`, speed and equality.

Old: `cv2.imread(path, flags)`, which decodes a cut JPEG with its lower part grey. New
(`pipeline.sensors.read_image`): the file's bytes read once (`np.fromfile`), a JPEG's end-of-image
marker checked, the same bytes decoded with `cv2.imdecode(buf, flags)`. Both read the same camera
JPEGs in one process, interleaved over several rounds (the order alternating), after a warm-up
pass that also checks that their pixels are identical; per decode scale (1: the exact chain, 2: the
fast path at the default resize 0.40-0.47) the median ms/image of each and the ratio new/old are
printed.

Reads data/nuscenes/samples/CAM_FRONT/*.jpg (1600 x 900, after `dvc repro synthesize`) when there,
otherwise writes a small twin (640 x 360) to a temporary folder:
    python -m benchmarks.image_check_speed [--images 40] [--rounds 7] [--scales 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.sensors import REDUCED_READ, read_image
from pipeline.twin.writer import TwinConfig, write_twin

REAL_SIZE = Path("data/nuscenes/samples/CAM_FRONT")
SMALL = TwinConfig(num_scenes=3, samples_per_scene=3, objects_per_scene=30, image_width=640, image_height=360)


def old_way(paths: list[str], flags: int) -> list[np.ndarray]:
    return [cv2.imread(p, flags) for p in paths]


def new_way(paths: list[str], flags: int) -> list[np.ndarray]:
    return [read_image(p, flags) for p in paths]


def seconds(fn, paths: list[str], flags: int) -> float:
    start = time.perf_counter()
    fn(paths, flags)
    return time.perf_counter() - start


def compare(paths: list[str], scale: int, rounds: int) -> None:
    flags = REDUCED_READ[scale]
    identical = all(np.array_equal(a, b) for a, b in zip(old_way(paths, flags), new_way(paths, flags)))
    old, new = [], []
    for r in range(rounds):
        if r % 2:
            new.append(seconds(new_way, paths, flags))
            old.append(seconds(old_way, paths, flags))
        else:
            old.append(seconds(old_way, paths, flags))
            new.append(seconds(new_way, paths, flags))
    old_ms = 1000 * float(np.median(old)) / len(paths)
    new_ms = 1000 * float(np.median(new)) / len(paths)
    print(
        f"scale 1/{scale}: old (cv2.imread) {old_ms:.2f} ms/image, new (fromfile + marker check + imdecode) "
        f"{new_ms:.2f} ms/image, ratio new/old {new_ms / old_ms:.3f}; identical pixels: {identical}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--scales", type=int, nargs="+", choices=sorted(REDUCED_READ), default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if REAL_SIZE.is_dir() and any(REAL_SIZE.glob("*.jpg")):
            folder = REAL_SIZE
        else:
            write_twin(SMALL, Path(tmp) / "nuscenes", workers=1)
            folder = Path(tmp) / "nuscenes" / "samples" / "CAM_FRONT"
        paths = [str(p) for p in sorted(folder.glob("*.jpg"))[: args.images]]
        height, width = cv2.imread(paths[0]).shape[:2]
        print(f"{len(paths)} JPEGs of {folder} ({width} x {height}), {args.rounds} rounds each way")
        for scale in args.scales:
            compare(paths, scale, args.rounds)


if __name__ == "__main__":
    main()
