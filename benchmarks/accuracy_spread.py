"""How much the demo's val mAP and NDS vary between training runs on the same data.

Trains and scores the params file's model once per training seed (`train.seed`), and once more
with ATen's CPU kernels limited to AVX2 (`ATEN_CPU_CAPABILITY=avx2`, the kernels another CPU
would run), each with the stage scripts as DVC runs them, on the data stages' outputs in data/.
Prints each run and the mean, minimum and maximum, and writes them to <out>/spread.json.

    python -m benchmarks.accuracy_spread --seeds 1 2 --capability avx2 --capability-seed 0 \\
        --include "seed 0 (dvc repro)=metrics/evaluate.json"

A finished run (its evaluate metrics exist) is not run again: an interrupted benchmark resumes.
Run it with nothing else on the cores: each run is a whole training (about 12 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.files import write_json_atomic


def run_one(name: str, params: dict, seed: int, env_change: dict[str, str], out: Path) -> dict:
    """Train and evaluate one run under out/<name>; its metrics (from disk if it finished before)."""
    folder = out / name.replace(" ", "_")
    metrics = folder / "evaluate.json"
    if not metrics.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        changed = {**params, "train": {**params["train"], "seed": seed}}
        (folder / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        env = {**os.environ, **env_change}
        p = str(folder / "params.yaml")
        commands = (
            ["train", "--params", p, "--out", str(folder / "train"), "--metrics", str(folder / "train.json"),
             "--live", str(folder / "live")],
            ["evaluate", "--params", p, "--checkpoint", str(folder / "train" / "model.pth"), "--out",
             str(folder / "evaluate"), "--metrics", str(metrics), "--plots", str(folder / "plots")],
        )  # fmt: skip
        start = time.perf_counter()
        for stage, *args in commands:
            print(f"accuracy_spread: {name}: {stage}", flush=True)
            subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], env=env, check=True)
        print(f"accuracy_spread: {name}: {time.perf_counter() - start:.0f} s", flush=True)
    result = json.loads(metrics.read_text())
    return {"run": name, "seed": seed, **env_change, "mAP": result["mAP"], "NDS": result["NDS"]}


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("mAP", "NDS"):
        values = [r[key] for r in rows]
        out[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each run")
    parser.add_argument("--capability", default="avx2", help="ATEN_CPU_CAPABILITY of one more run ('' for none)")
    parser.add_argument("--capability-seed", type=int, default=0, help="train.seed of that run")
    parser.add_argument(
        "--include", action="append", default=[], metavar="NAME=METRICS",
        help="an evaluate metrics file of a run made elsewhere (e.g. the dvc repro), counted in the spread",
    )  # fmt: skip
    parser.add_argument("--out", default="runs/accuracy_spread")
    args = parser.parse_args(argv)

    params = yaml.safe_load(Path(args.params).read_text())
    out = Path(args.out)
    rows = []
    for item in args.include:
        name, _, path = item.partition("=")
        result = json.loads(Path(path).read_text())
        rows.append({"run": name, "mAP": result["mAP"], "NDS": result["NDS"]})
    for seed in args.seeds:
        rows.append(run_one(f"seed {seed}", params, seed, {}, out))
    if args.capability:
        env = {"ATEN_CPU_CAPABILITY": args.capability}
        name = f"seed {args.capability_seed} {args.capability}"
        rows.append(run_one(name, params, args.capability_seed, env, out))
    stats = summary(rows)
    for r in rows:
        print(f"{r['run']:32s} mAP {r['mAP']:.4f}  NDS {r['NDS']:.4f}")
    for key, s in stats.items():
        print(f"{key}: mean {s['mean']:.4f}, min {s['min']:.4f}, max {s['max']:.4f} over {len(rows)} runs")
    write_json_atomic(out / "spread.json", {"runs": rows, **stats})
    return 0


if __name__ == "__main__":
    sys.exit(main())
