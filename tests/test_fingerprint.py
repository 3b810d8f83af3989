"""The dataset fingerprint sees a sensor file added, removed or resized, not a copy or a touch."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.fingerprint import SENSORS, FingerprintError, dataset_fingerprint
from tests.conftest import ROOT, launch_stage


def tiny_root(root: Path, files: int = 3) -> Path:
    for sensor in SENSORS:
        folder = root / "samples" / sensor
        folder.mkdir(parents=True)
        for i in range(files):
            (folder / f"{sensor}_{i}.jpg").write_bytes(b"x" * (i + 1))
    (root / "sweeps" / "CAM_FRONT").mkdir(parents=True)
    return root


def test_changes_with_the_files_the_stages_read(tmp_path):
    root = tiny_root(tmp_path / "nuscenes")
    first = dataset_fingerprint(root)
    assert set(first) == {f"samples/{s}" for s in SENSORS}
    assert first["samples/CAM_FRONT"]["files"] == 3 and first["samples/CAM_FRONT"]["bytes"] == 6

    victim = root / "samples" / "CAM_BACK" / "CAM_BACK_1.jpg"
    os.utime(victim, (1, 1))  # touched: same name and size
    (root / "sweeps" / "CAM_FRONT" / "new.jpg").write_bytes(b"not read by any stage")
    assert dataset_fingerprint(root) == first
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # new modification times everywhere
    assert dataset_fingerprint(copy) == first

    victim.write_bytes(b"longer now")
    resized = dataset_fingerprint(root)
    assert resized["samples/CAM_BACK"] != first["samples/CAM_BACK"]
    assert {k: v for k, v in resized.items() if k != "samples/CAM_BACK"} == {
        k: v for k, v in first.items() if k != "samples/CAM_BACK"
    }
    (root / "samples" / "LIDAR_TOP" / "extra.pcd.bin").write_bytes(b"")
    assert dataset_fingerprint(root)["samples/LIDAR_TOP"]["files"] == 4
    (root / "samples" / "LIDAR_TOP" / "extra.pcd.bin").unlink()
    (root / "samples" / "LIDAR_TOP" / "LIDAR_TOP_0.jpg").unlink()
    assert dataset_fingerprint(root)["samples/LIDAR_TOP"]["files"] == 2


def test_missing_root_or_folder_is_named(tmp_path):
    with pytest.raises(FingerprintError, match="convert.data_root"):
        dataset_fingerprint(tmp_path / "nowhere")
    root = tiny_root(tmp_path / "nuscenes")
    shutil.rmtree(root / "samples" / "CAM_FRONT_LEFT")
    with pytest.raises(FingerprintError, match="samples/CAM_FRONT_LEFT"):
        dataset_fingerprint(root)


def test_stage_on_the_twin(small_twin, tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["convert"]["data_root"] = str(small_twin)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", "params.yaml", "--out", "fp.json"]
    result = launch_stage("fingerprint", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "fp.json").read_text())
    frames = 3 * 3  # the small twin: 3 scenes of 3 key frames
    assert {v["files"] for v in written.values()} == {frames}

    params["convert"]["data_root"] = str(tmp_path / "nowhere")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = launch_stage("fingerprint", *args, cwd=tmp_path)
    assert result.returncode == 2 and "nowhere" in result.stderr and "Traceback" not in result.stderr
