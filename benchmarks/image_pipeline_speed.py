"""Sample loading: the fast image path against the exact one (the reference's chain), speed and difference.

Both load the same samples with the same augmentation draws through the whole pipeline (train: 6 JPEG
decodes, geometry, depth maps, photometric distortion, normalisation; test: decode, resize, crop,
normalisation); they differ only in how an image is decoded and resampled:

* exact (`data.fast_images: false`, the reference's chain): full-resolution decode, PIL bicubic resize
  to whole pixels, crop, flip, rotate (tests/test_parity_data.py: equal to the reference's images);
* fast (`data.fast_images: true`): decode at 1/2 .. 1/8 scale where the resize allows, one bilinear
  resampling into the crop with the same pixel mapping; crop borders, flip and rotation as the reference.

Printed per split: samples/s of each path and the speed-up, whether the projection matrices are
identical, and the image difference in grey levels (0..255): largest, mean, and the mean of the
worst sample.

Run after `dvc repro convert` (1600 x 900 images of the synthetic twin):
    python -m benchmarks.image_pipeline_speed [--final-dim 256 704] [--resize-lim 0.40 0.47] [--samples 24]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline.dataset import Sparse4DDataset
from pipeline.sensors import IMG_STD
from pipeline.settings import CLASSES as DETECTION_CLASSES

CLASSES = list(DETECTION_CLASSES)
# the full profile's data settings (the reference's augmentation and photometric distortion)
FULL_DATA = yaml.safe_load((Path(__file__).resolve().parents[1] / "params-full.yaml").read_text())["data"]


def run(ds: Sparse4DDataset, items: list[dict]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    out = []
    for item in items:
        np.random.seed(item["idx"])  # same photometric draws on both sides
        out.append(ds[item])
    return time.perf_counter() - start, out


def compare(infos: str, aug: dict, samples: int, test_mode: bool) -> None:
    settings = dict(
        data_aug_conf=aug,
        sequences_split_num=int(FULL_DATA["sequences_split_num"]),
        use_valid_flag=bool(FULL_DATA["use_valid_flag"]),
        photometric=bool(FULL_DATA["photometric"]),
        test_mode=test_mode,
    )
    fast = Sparse4DDataset(infos, CLASSES, fast_images=True, **settings)
    exact = Sparse4DDataset(infos, CLASSES, fast_images=False, **settings)
    np.random.seed(0)
    items = [{"idx": i % len(fast), "aug_config": fast.get_augmentation()} for i in range(samples)]
    run(fast, items[:2])  # warm-up (imports, caches)
    run(exact, items[:2])
    t_exact, out_exact = run(exact, items)
    t_fast, out_fast = run(fast, items)
    grey = [np.abs((a["img"].numpy() - b["img"].numpy()) * IMG_STD[:, None, None]) for a, b in zip(out_fast, out_exact)]
    same_geometry = all(
        np.array_equal(a["projection_mat"].numpy(), b["projection_mat"].numpy()) for a, b in zip(out_fast, out_exact)
    )
    split = "test" if test_mode else "train"
    print(f"{split}: exact {samples / t_exact:7.2f} samples/s ({1000 * t_exact / samples:.1f} ms/sample)")
    print(f"{split}: fast  {samples / t_fast:7.2f} samples/s ({1000 * t_fast / samples:.1f} ms/sample)")
    print(
        f"{split}: speed-up {t_exact / t_fast:.2f}x; identical projection matrices: {same_geometry}; "
        f"grey levels: max {max(g.max() for g in grey):.0f}, mean {np.mean([g.mean() for g in grey]):.2f}, "
        f"worst sample mean {max(g.mean() for g in grey):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_train.pkl")
    parser.add_argument("--final-dim", type=int, nargs=2, default=FULL_DATA["aug"]["final_dim"])
    parser.add_argument("--resize-lim", type=float, nargs=2, default=FULL_DATA["aug"]["resize_lim"])
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args()
    if not Path(args.infos).is_file():
        sys.exit(f"{args.infos}: not found; run `dvc repro convert` first")
    aug = {**FULL_DATA["aug"], "final_dim": list(args.final_dim), "resize_lim": list(args.resize_lim)}
    print(
        f"samples: {args.samples} (6 images of {aug['W']}x{aug['H']} -> {args.final_dim[1]}x{args.final_dim[0]}, "
        f"resize {args.resize_lim})"
    )
    for test_mode in (False, True):
        compare(args.infos, aug, args.samples, test_mode)


if __name__ == "__main__":
    main()
