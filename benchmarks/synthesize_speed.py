"""How long `synthesize` takes at the params.yaml size (target: <= 90 s on 2 cores).

Run: python -m benchmarks.synthesize_speed [--params params.yaml]
Prints the wall time of writing the twin with one worker and with all cores, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pipeline.params import load_params
from pipeline.twin.writer import TwinConfig, write_twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params, "synthesize")
    cfg = TwinConfig(**{k: (tuple(v) if k == "classes" else v) for k, v in p.items()})
    times = {}
    for workers in sorted({1, os.cpu_count() or 1}):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            counts = write_twin(cfg, Path(tmp) / "nuscenes", workers=workers)
            times[workers] = time.perf_counter() - start
        print(f"workers={workers}: {times[workers]:.1f} s for {counts}")
    best = min(times.values())
    print(
        f"speed-up of all cores over one: {times[1] / best:.2f}x; best {best:.1f} s = {best / 90:.2f} of the 90 s budget"
    )


if __name__ == "__main__":
    main()
