"""`dvc status` and a no-op `dvc repro` on a simulated v1.0-trainval tree: the DAG that depends on
the version's tables and data/fingerprint.json, against the earlier one that depended on the
whole dataset root.

The tree has trainval's shape with empty files: 34,149 key frames for each of the 12 sensors
under samples/ and about 790,000 sweeps (1.2 M files in all), and the 13 tables as sparse files
of about their real sizes (1.4 GB). The project is copied (tracked and new files) into a
temporary folder with convert.data_root pointing at the tree; every other stage input and output
is a tiny stand-in, recorded with `dvc commit`, so the timings are DVC's own work on the dataset
dependency, not the stages'. The baseline (the same project with `${convert.data_root}` as a
dependency of convert and evaluate, no fingerprint stage) first hashes every file once (`dvc
commit`), then `dvc status` is timed as for ours; `--baseline-timeout` caps each of its commands.

Run: python -m benchmarks.dag_status_speed [--scale 1.0] [--baseline-timeout 3600] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.conftest import copy_tracked_files
from tests.test_dag import stand_ins  # the tests' stand-in outputs, one definition

ROOT = Path(__file__).resolve().parents[1]
KEY_FRAMES = 34_149
SAMPLE_SENSORS = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "LIDAR_TOP",
    "RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT",
)  # fmt: skip
SWEEPS = {"LIDAR_TOP": 297_737, **{cam: 82_000 for cam in SAMPLE_SENSORS[:6]}}
TABLE_MB = {
    "sample_annotation": 600, "sample_data": 500, "ego_pose": 300, "instance": 20, "sample": 10,
    "calibrated_sensor": 1, "scene": 1, "log": 1, "map": 1, "sensor": 1, "category": 1, "attribute": 1,
    "visibility": 1,
}  # fmt: skip


def simulate_tree(root: Path, scale: float) -> int:
    """Empty sensor files and sparse tables in the nuScenes layout; returns the number of files."""
    count = 0
    folders = {f"samples/{s}": int(KEY_FRAMES * scale) for s in SAMPLE_SENSORS}
    folders.update({f"sweeps/{s}": int(n * scale) for s, n in SWEEPS.items()})
    for folder, n in folders.items():
        path = root / folder
        path.mkdir(parents=True)
        ext = ".pcd.bin" if "LIDAR" in folder else ".pcd" if "RADAR" in folder else ".jpg"
        for i in range(n):
            open(path / f"n008-2018-08-01-15-16-36-0400__{folder.split('/')[1]}__{i:016d}{ext}", "wb").close()
        count += n
    tables = root / "v1.0-trainval"
    tables.mkdir()
    for name, mb in TABLE_MB.items():
        with open(tables / f"{name}.json", "wb") as f:
            f.truncate(int(mb * scale * 2**20) or 1)
        count += 1
    return count


def make_project(dest: Path, data_root: Path, baseline: bool) -> Path:
    copy_tracked_files(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["convert"].update(data_root=str(data_root), version="v1.0-trainval")
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    if baseline:  # the earlier DAG: the whole root as a dependency, no fingerprint
        dag = yaml.safe_load((dest / "dvc.yaml").read_text())
        dag["stages"].pop("fingerprint")
        for spec in dag["stages"].values():
            deps = [d for d in spec.get("deps", []) if d != "data/fingerprint.json"]
            spec["deps"] = [
                "${convert.data_root}" if d == "${convert.data_root}/${convert.version}" else d for d in deps
            ]
        (dest / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "project"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    stand_ins(dest)
    if not baseline:  # the real fingerprint of the tree, so that a no-op repro finds it unchanged
        fingerprint = ["-m", "stages.fingerprint", "--params", "params.yaml", "--out", "data/fingerprint.json"]
        run(dest, [sys.executable, *fingerprint])
    return dest


def run(cwd: Path, cmd: list[str], timeout: float | None = None) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return float("inf"), f"timed out after {timeout:.0f} s"
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return elapsed, result.stdout


def dvc(cwd: Path, *args: str, timeout: float | None = None) -> tuple[float, str]:
    return run(cwd, [sys.executable, "-m", "dvc", *args], timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of trainval's file counts and sizes")
    parser.add_argument("--baseline-timeout", type=float, default=3600.0, help="seconds per baseline command")
    parser.add_argument("--keep", help="build everything in this folder and keep it")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="dag-status-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        files = simulate_tree(work / "nuscenes", args.scale)
        print(f"simulated tree: {files} files in {time.perf_counter() - start:.0f} s")

        ours = make_project(work / "ours", work / "nuscenes", baseline=False)
        t_commit, _ = dvc(ours, "commit", "--force")
        t_status, out = dvc(ours, "status")
        t_status2, _ = dvc(ours, "status")
        t_repro, repro_out = dvc(ours, "repro")
        ran = [line for line in repro_out.splitlines() if line.startswith("Running stage")]
        print(f"ours: dvc commit {t_commit:.1f} s (first hash of the tables); dvc status {t_status:.1f} s, "
              f"again {t_status2:.1f} s; no-op dvc repro {t_repro:.1f} s, ran: {ran}")  # fmt: skip
        print(out.strip())

        base = make_project(work / "baseline", work / "nuscenes", baseline=True)
        b_commit, _ = dvc(base, "commit", "--force", timeout=args.baseline_timeout)
        b_status, _ = dvc(base, "status", timeout=args.baseline_timeout)
        print(f"baseline (dataset root as a dependency): dvc commit {b_commit:.1f} s (first hash of every file); "
              f"dvc status {b_status:.1f} s")  # fmt: skip
        if b_status != float("inf"):
            print(f"dvc status: {b_status / t_status2:.0f}x faster; no-op dvc repro vs baseline status: "
                  f"{b_status / t_repro:.1f}x")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
