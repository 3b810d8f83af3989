"""Training-sample loading speed: the fast image path against the reference's chain.

Both load the same training samples with the same augmentation draws through the whole train
pipeline (6 JPEG decodes, geometry, depth maps, photometric distortion, normalisation); they
differ only in how an image is decoded and warped:

* chain (the reference): full-resolution decode, resize, crop, flip, rotate;
* fast (ours): PIL draft-mode decode at 1/2 .. 1/8 scale where the resize allows, one affine warp.

Run after `dvc repro convert` (1600 x 900 images of the synthetic twin):
    python benchmarks/image_pipeline_speed.py [--final-dim 256 704] [--resize-lim 0.40 0.47] [--samples 24]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.detector import CLASSES as DETECTION_CLASSES  # noqa: E402
from pipeline.dataset import DEFAULT_AUG, IMG_STD, Sparse4DDataset  # noqa: E402

CLASSES = list(DETECTION_CLASSES)


def run(ds: Sparse4DDataset, items: list[dict]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    out = []
    for item in items:
        np.random.seed(item["idx"])  # same photometric draws on both sides
        out.append(ds[item])
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_train.pkl")
    parser.add_argument("--final-dim", type=int, nargs=2, default=DEFAULT_AUG["final_dim"])
    parser.add_argument("--resize-lim", type=float, nargs=2, default=DEFAULT_AUG["resize_lim"])
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args()
    if not Path(args.infos).is_file():
        sys.exit(f"{args.infos}: not found; run `dvc repro convert` first")
    aug = {**DEFAULT_AUG, "final_dim": list(args.final_dim), "resize_lim": list(args.resize_lim)}
    fast = Sparse4DDataset(args.infos, CLASSES, aug, fast_images=True)
    chain = Sparse4DDataset(args.infos, CLASSES, aug, fast_images=False)
    np.random.seed(0)
    items = [{"idx": i % len(fast), "aug_config": fast.get_augmentation()} for i in range(args.samples)]
    run(fast, items[:2])  # warm-up (imports, caches)
    run(chain, items[:2])
    t_chain, out_chain = run(chain, items)
    t_fast, out_fast = run(fast, items)
    diff = np.mean(
        [
            np.abs((a["img"].numpy() - b["img"].numpy()) * IMG_STD[:, None, None]).mean()
            for a, b in zip(out_fast, out_chain)
        ]
    )
    same_geometry = all(
        np.array_equal(a["projection_mat"].numpy(), b["projection_mat"].numpy()) for a, b in zip(out_fast, out_chain)
    )
    print(
        f"samples: {args.samples} (6 images of {aug['W']}x{aug['H']} -> {args.final_dim[1]}x{args.final_dim[0]}, resize {args.resize_lim})"
    )
    print(
        f"chain (reference): {args.samples / t_chain:7.2f} samples/s  ({1000 * t_chain / args.samples:.1f} ms/sample)"
    )
    print(f"fast (ours):       {args.samples / t_fast:7.2f} samples/s  ({1000 * t_fast / args.samples:.1f} ms/sample)")
    print(
        f"speed-up: {t_chain / t_fast:.2f}x; identical projection matrices: {same_geometry}; mean |pixel difference|: {diff:.2f} / 255"
    )


if __name__ == "__main__":
    main()
