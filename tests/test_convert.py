"""The info-pkl converter: devkit-consistent frames, the reference format, clean failures."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from nuscenes.nuscenes import NuScenes
from pyquaternion import Quaternion

from benchmarks.convert_speed import assert_same, devkit_walk
from pipeline.convert import CAMERA_TYPES, ConvertError, convert, summarize
from tests.conftest import ROOT, launch_stage

EXPECTED = Path(__file__).parent / "data" / "expected_info_train0.json"


@pytest.fixture(scope="module")
def converted(small_twin, tmp_path_factory):
    """(infos by split, NuScenes), converted with a relative root as the stage runs."""
    cwd = os.getcwd()
    os.chdir(small_twin.parent.parent)
    try:
        result = convert("data/nuscenes", "v1.0-mini")
        nusc = NuScenes(version="v1.0-mini", dataroot="data/nuscenes", verbose=False)
        base = devkit_walk("data/nuscenes", "v1.0-mini")
    finally:
        os.chdir(cwd)
    return result, nusc, base


def _tilted(rotation: list[float], timestamp: int) -> list[float]:
    """A level [w, x, y, z] ego rotation with pitch and roll of up to ~3 degrees, varying in time."""
    phase = (timestamp % 10_000_000) / 1e6
    pitch = np.radians(2.5) * np.sin(1.3 * phase + 0.4)
    roll = np.radians(3.0) * np.cos(0.9 * phase)
    q = Quaternion(rotation) * Quaternion(axis=[0, 1, 0], angle=pitch) * Quaternion(axis=[1, 0, 0], angle=roll)
    return [float(v) for v in q.elements]


def write_variant(source: Path, dest: Path) -> None:
    """A twin's tables with what real nuScenes has and the twin lacks: ego poses that pitch and roll (a few
    degrees, varying in time), boxes seen by radar only (every 4th annotation: no LiDAR point, radar
    points; some others both) and a scene outside both splits (its first, renamed). The sensor files are
    the source's (links): a converter reads their paths only."""
    dest.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "v1.0-mini":
            (dest / entry.name).symlink_to(entry.resolve())
    tables = dest / "v1.0-mini"
    shutil.copytree(source / "v1.0-mini", tables)
    poses = json.loads((tables / "ego_pose.json").read_text())
    for pose in poses:
        pose["rotation"] = _tilted(pose["rotation"], pose["timestamp"])
        pose["translation"][2] = 0.05 * np.sin(pose["timestamp"] / 3e5)
    (tables / "ego_pose.json").write_text(json.dumps(poses))
    anns = json.loads((tables / "sample_annotation.json").read_text())
    for i, ann in enumerate(anns):
        if i % 4 == 0:
            ann["num_lidar_pts"], ann["num_radar_pts"] = 0, 1 + i % 5
        elif i % 4 == 1:
            ann["num_radar_pts"] = i % 3
    (tables / "sample_annotation.json").write_text(json.dumps(anns))
    scenes = json.loads((tables / "scene.json").read_text())
    scenes[0]["name"] = "scene-9999"  # in neither mini split
    (tables / "scene.json").write_text(json.dumps(scenes))


def frozen_view(info: dict) -> dict:
    """The parts of an info that the frozen expectation pins down."""
    return {
        "token": info["token"],
        "lidar_path": info["lidar_path"],
        "timestamp": info["timestamp"],
        "num_sweeps": len(info["sweeps"]),
        "cams": {
            c: {
                "data_path": info["cams"][c]["data_path"],
                "sensor2lidar_rotation": np.round(info["cams"][c]["sensor2lidar_rotation"], 6).tolist(),
                "sensor2lidar_translation": np.round(info["cams"][c]["sensor2lidar_translation"], 6).tolist(),
                "cam_intrinsic": np.round(info["cams"][c]["cam_intrinsic"], 6).tolist(),
            }
            for c in CAMERA_TYPES
        },
        "gt_boxes": np.round(info["gt_boxes"], 5).tolist(),
        "gt_names": list(info["gt_names"]),
        "gt_velocity": np.round(np.nan_to_num(info["gt_velocity"], nan=-999.0), 5).tolist(),
        "num_lidar_pts": info["num_lidar_pts"].tolist(),
        "valid_flag": info["valid_flag"].tolist(),
        "instance_inds": info["instance_inds"].tolist(),
    }


def test_reference_keys_and_splits(converted):
    result, nusc, _ = converted
    assert set(result) == {"train", "val"}
    assert result["train"]["metadata"] == {"version": "v1.0-mini"}
    info = result["train"]["infos"][1]
    for key in (
        "lidar_path token sweeps cams lidar2ego_translation lidar2ego_rotation ego2global_translation "
        "ego2global_rotation timestamp gt_boxes gt_names gt_velocity num_lidar_pts num_radar_pts valid_flag instance_inds"
    ).split():
        assert key in info, key
    assert list(info["cams"]) == list(CAMERA_TYPES)
    for cam in info["cams"].values():
        for key in "data_path type sample_data_token sensor2ego_translation sensor2ego_rotation ego2global_translation ego2global_rotation timestamp sensor2lidar_rotation sensor2lidar_translation cam_intrinsic".split():
            assert key in cam, key
    assert info["gt_boxes"].shape[1] == 7 and info["gt_velocity"].shape[1] == 2
    # The first frame of a scene has no sweeps (the reference's new-sequence marker); later ones do.
    assert len(result["train"]["infos"][0]["sweeps"]) == 0 and 0 < len(info["sweeps"]) <= 10
    val_scenes = {
        nusc.get("scene", nusc.get("sample", i["token"])["scene_token"])["name"] for i in result["val"]["infos"]
    }
    assert val_scenes == {"scene-0103"}


def test_boxes_back_in_global_match_annotations(converted):
    result, nusc, _ = converted
    checked = 0
    for info in result["train"]["infos"] + result["val"]["infos"]:
        l2e = Quaternion(info["lidar2ego_rotation"])
        e2g = Quaternion(info["ego2global_rotation"])
        anns = [nusc.get("sample_annotation", t) for t in nusc.get("sample", info["token"])["anns"]]
        for box, vel, ann in zip(info["gt_boxes"], info["gt_velocity"], anns):
            centre = e2g.rotate(l2e.rotate(box[:3]) + info["lidar2ego_translation"]) + info["ego2global_translation"]
            assert np.allclose(centre, ann["translation"], atol=1e-6)
            assert np.allclose([box[4], box[3], box[5]], ann["size"])  # stored as l, w, h
            yaw = (e2g * l2e * Quaternion(axis=[0, 0, 1], angle=box[6])).yaw_pitch_roll[0]
            assert abs((yaw - Quaternion(ann["rotation"]).yaw_pitch_roll[0] + np.pi) % (2 * np.pi) - np.pi) < 1e-6
            v_global = e2g.rotate(l2e.rotate([*vel, 0.0]))
            assert np.allclose(v_global[:2], nusc.box_velocity(ann["token"])[:2], atol=1e-6, equal_nan=True)
            checked += 1
    assert checked > 100


def test_matches_the_devkit_walk(converted):
    result, _, base = converted
    assert_same(result, base)


def test_frozen_info(converted):
    result, _, _ = converted
    # Frozen from the converter's output for the twin of tests/conftest.py (seed 0); a change
    # here is a change of the info format or of the twin, to be made on purpose.
    assert frozen_view(result["train"]["infos"][1]) == json.loads(EXPECTED.read_text())


def test_tilted_poses_radar_only_boxes_and_scenes_outside_the_splits(small_twin, tmp_path):
    """As the devkit walk (the reference's algorithm) on what real nuScenes has: yaw as pyquaternion's,
    radar-only boxes valid but without LiDAR points, samples outside both splits in val."""
    write_variant(small_twin, tmp_path / "data" / "nuscenes")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ours = convert("data/nuscenes", "v1.0-mini")
        base = devkit_walk("data/nuscenes", "v1.0-mini")
        nusc = NuScenes(version="v1.0-mini", dataroot="data/nuscenes", verbose=False)
    finally:
        os.chdir(cwd)
    assert_same(ours, base)
    assert [len(ours[s]["infos"]) for s in ("train", "val")] == [3, 6]  # the renamed train scene went to val
    pitched = 0
    for info in ours["train"]["infos"] + ours["val"]["infos"]:
        e2g = Quaternion(info["ego2global_rotation"])
        pitched += abs(e2g.yaw_pitch_roll[1]) > np.radians(0.5)
        anns = [nusc.get("sample_annotation", t) for t in nusc.get("sample", info["token"])["anns"]]
        for box, ann in zip(info["gt_boxes"], anns):
            lidar_q = Quaternion(info["lidar2ego_rotation"]).inverse * e2g.inverse * Quaternion(ann["rotation"])
            assert abs(box[6] - lidar_q.yaw_pitch_roll[0]) < 1e-9
        radar_only = (info["num_lidar_pts"] == 0) & (info["num_radar_pts"] > 0)
        assert radar_only.any() and info["valid_flag"][radar_only].all()
    assert pitched > 3


def test_summary(converted, small_twin):
    summary = summarize(converted[0], small_twin, "v1.0-mini")
    assert summary["train"]["samples"] == 6 and summary["train"]["scenes"] == 2
    assert summary["val"]["scenes"] == 1
    assert sum(summary["train"]["boxes_per_class"].values()) == summary["train"]["boxes"] > 0


def run_stage(tmp_path: Path, change: dict) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["convert"].update(change)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return launch_stage("convert", "--params", "params.yaml", "--out", "infos", "--metrics", "m.json", cwd=tmp_path)


def test_stage_writes_pkls_and_metrics(small_twin, tmp_path):
    shutil.copytree(small_twin, tmp_path / "data" / "nuscenes")
    result = run_stage(tmp_path, {})
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "infos" / "nuscenes_infos_val.pkl", "rb") as f:
        data = pickle.load(f)
    assert len(data["infos"]) == 3 and data["infos"][0]["lidar_path"].startswith("data/nuscenes/samples/LIDAR_TOP/")
    assert json.loads((tmp_path / "m.json").read_text())["train"]["samples"] == 6


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data_root": "nowhere"}, "nowhere"),
        ({"version": "v9.9"}, "convert.version"),
        ({"version": "v1.0-trainval"}, "v1.0-trainval"),
    ],
)
def test_bad_root_or_version_fails_cleanly(small_twin, tmp_path, change, message):
    shutil.copytree(small_twin, tmp_path / "data" / "nuscenes")
    result = run_stage(tmp_path, change)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "infos").exists()


def test_missing_referenced_file_is_named(small_twin, tmp_path):
    root = tmp_path / "data" / "nuscenes"
    shutil.copytree(small_twin, root)
    victim = sorted((root / "samples" / "CAM_BACK").iterdir())[0]
    victim.unlink()
    result = run_stage(tmp_path, {})
    assert result.returncode != 0 and victim.name in result.stderr
    assert not (tmp_path / "infos").exists()
    with pytest.raises(ConvertError, match=victim.name):
        convert(root, "v1.0-mini")
