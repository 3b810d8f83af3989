"""nuScenes tables -> Sparse4D info pkls, vectorised.

The output has the keys, frames and semantics of the reference converter
(HorizonRobotics/Sparse4D `tools/nuscenes_converter.py`): one dict per key frame with the LiDAR
path and sweeps, the six cameras with their sensor->LiDAR transforms, and, for annotated splits,
boxes in the key frame's LiDAR frame as (x, y, z, l, w, h, yaw), velocities in that frame, the
class names mapped to the 10 detection classes and per-box LiDAR/radar point counts. The infos
equal the reference's key for key and value for value (to float rounding; tested against its
converter), including its quirks: samples of scenes outside both splits go to the val split
(dropped for v1.0-test), and camera and sweep paths under the working directory are made
relative to it.

Where the reference asks the devkit for every box and every velocity one object at a time, this
reads the tables once and transforms all boxes of a sample with a few array operations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from pipeline.exact import matmul, quaternion_matrix, transform
from pipeline.settings import SPLITS, VERSIONS

CAMERA_TYPES = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
NAME_MAPPING = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}
TABLES = (
    "calibrated_sensor",
    "category",
    "ego_pose",
    "instance",
    "sample",
    "sample_annotation",
    "sample_data",
    "scene",
    "sensor",
)
# The devkit's box_velocity gives up beyond this gap (doubled for a centred difference).
MAX_VELOCITY_DT = 1.5


class ConvertError(ValueError):
    """The dataset root, version or a referenced file is missing; the message names it."""


def split_scenes(version: str) -> tuple[list[str], list[str]]:
    """Scene names of the (train, val) splits of a version; for v1.0-test, (test, [])."""
    from nuscenes.utils import splits

    if version not in SPLITS:
        raise ConvertError(f"convert.version: expected one of {VERSIONS}, got {version!r}")
    train, val = SPLITS[version]
    return getattr(splits, train), (getattr(splits, val) if val else [])


def load_tables(root: str | os.PathLike, version: str) -> dict[str, list[dict]]:
    split_scenes(version)
    table_root = Path(root) / version
    if not Path(root).is_dir():
        raise ConvertError(f"convert.data_root: nuScenes root {root} does not exist")
    if not table_root.is_dir():
        raise ConvertError(f"convert.version: {table_root} does not exist (is {version} downloaded into {root}?)")
    tables = {}
    for name in TABLES:
        path = table_root / f"{name}.json"
        if not path.is_file():
            raise ConvertError(f"{path}: table missing")
        with open(path) as f:
            tables[name] = json.load(f)
    return tables


def _rotation(wxyz: Any) -> Rotation:
    """A scipy Rotation of nuScenes [w, x, y, z] quaternions ((4,) or (n, 4); scipy wants x, y, z, w)."""
    return Rotation.from_quat(np.roll(np.asarray(wxyz, dtype=np.float64), -1, axis=-1))


def _relative_to(path: str, cwd: str) -> str:
    """The reference converter's camera and sweep paths: under the working directory, made relative."""
    return path.split(f"{cwd}/")[-1] if cwd in path else path


class _Lookup:
    """The tables indexed for what the converter asks, as the devkit's NuScenes object indexes them."""

    def __init__(self, tables: dict[str, list[dict]]):
        self.by_token = {name: {r["token"]: r for r in tables[name]} for name in TABLES}
        channel_of_cs = {
            cs["token"]: self.by_token["sensor"][cs["sensor_token"]]["channel"] for cs in tables["calibrated_sensor"]
        }
        # Key-frame sample_data of each sample and channel (what the devkit's sample["data"] holds).
        self.key_frames: dict[str, dict[str, str]] = {}
        for sd in tables["sample_data"]:
            if sd["is_key_frame"]:
                channel = channel_of_cs[sd["calibrated_sensor_token"]]
                self.key_frames.setdefault(sd["sample_token"], {})[channel] = sd["token"]
        self.anns_of_sample: dict[str, list[dict]] = {}
        for ann in tables["sample_annotation"]:
            self.anns_of_sample.setdefault(ann["sample_token"], []).append(ann)
        self.instance_index = {r["token"]: i for i, r in enumerate(tables["instance"])}
        category = self.by_token["category"]
        self.category_of_instance = {r["token"]: category[r["category_token"]]["name"] for r in tables["instance"]}
        self.sample_time = {s["token"]: s["timestamp"] for s in tables["sample"]}

    def sensor_records(self, sd: dict) -> tuple[dict, dict]:
        """The calibrated_sensor and ego_pose records of a sample_data."""
        return (
            self.by_token["calibrated_sensor"][sd["calibrated_sensor_token"]],
            self.by_token["ego_pose"][sd["ego_pose_token"]],
        )


class _LidarFrame(NamedTuple):
    """A key frame's LiDAR -> ego and ego -> global rotations (3, 3) and translations (3,)."""

    l2e_r: np.ndarray
    l2e_t: np.ndarray
    e2g_r: np.ndarray
    e2g_t: np.ndarray


def _lidar_frame(lidar_cs: dict, lidar_pose: dict) -> _LidarFrame:
    return _LidarFrame(
        quaternion_matrix(lidar_cs["rotation"]),
        np.asarray(lidar_cs["translation"], dtype=np.float64),
        quaternion_matrix(lidar_pose["rotation"]),
        np.asarray(lidar_pose["translation"], dtype=np.float64),
    )


def _sensor_to_lidar(cs: dict, pose: dict, frame: _LidarFrame) -> tuple[np.ndarray, np.ndarray]:
    """Rotation (3, 3) and translation (3,) such that points_lidar = points_sensor @ R.T + T.

    The products are pipeline.exact's, not the BLAS's: the infos' bytes do not depend on the CPU."""
    l2e_r, l2e_t, e2g_r, e2g_t = frame
    s2e_r = quaternion_matrix(cs["rotation"])
    e2g_r_s = quaternion_matrix(pose["rotation"])
    # sensor -> ego(t_s) -> global -> ego(t_key) -> lidar
    r = matmul(matmul(matmul(l2e_r.T, e2g_r.T), e2g_r_s), s2e_r)
    global_t = transform(np.asarray(cs["translation"], dtype=np.float64), e2g_r_s, pose["translation"])
    t = transform(transform(global_t - e2g_t, e2g_r.T) - l2e_t, l2e_r.T)
    return r, t


def _sensor_info(lookup: _Lookup, sd: dict, sensor_type: str, frame: _LidarFrame, root: str, cwd: str) -> dict:
    """A camera's or sweep's info entry: its file, calibration, pose and transform to the key frame's LiDAR."""
    cs, pose = lookup.sensor_records(sd)
    r, t = _sensor_to_lidar(cs, pose, frame)
    return {
        "data_path": _relative_to(os.path.join(root, sd["filename"]), cwd),
        "type": sensor_type,
        "sample_data_token": sd["token"],
        "sensor2ego_translation": cs["translation"],
        "sensor2ego_rotation": cs["rotation"],
        "ego2global_translation": pose["translation"],
        "ego2global_rotation": pose["rotation"],
        "timestamp": sd["timestamp"],
        "sensor2lidar_rotation": r,
        "sensor2lidar_translation": t,
    }


def _sample_info(
    lookup: _Lookup, sample: dict, root: str, version: str, cwd: str, max_sweeps: int, annotated: bool
) -> dict[str, Any]:
    """One key frame's info: LiDAR path and pose, the six cameras, up to `max_sweeps` earlier
    sweeps and, for an annotated version, its boxes in the LiDAR frame."""
    data = lookup.key_frames.get(sample["token"], {})
    if "LIDAR_TOP" not in data or any(c not in data for c in CAMERA_TYPES):
        raise ConvertError(
            f"{Path(root) / version}/sample_data.json: sample {sample['token']} lacks LIDAR_TOP or a camera key frame"
        )
    sd_by_token = lookup.by_token["sample_data"]
    lidar_sd = sd_by_token[data["LIDAR_TOP"]]
    lidar_cs, lidar_pose = lookup.sensor_records(lidar_sd)
    frame = _lidar_frame(lidar_cs, lidar_pose)
    info: dict[str, Any] = {
        "lidar_path": os.path.join(root, lidar_sd["filename"]),
        "token": sample["token"],
        "sweeps": [],
        "cams": {},
        "lidar2ego_translation": lidar_cs["translation"],
        "lidar2ego_rotation": lidar_cs["rotation"],
        "ego2global_translation": lidar_pose["translation"],
        "ego2global_rotation": lidar_pose["rotation"],
        "timestamp": sample["timestamp"],
    }
    for cam in CAMERA_TYPES:
        sd = sd_by_token[data[cam]]
        info["cams"][cam] = _sensor_info(lookup, sd, cam, frame, root, cwd)
        info["cams"][cam]["cam_intrinsic"] = np.array(lookup.sensor_records(sd)[0]["camera_intrinsic"])
    sd = lidar_sd
    while len(info["sweeps"]) < max_sweeps and sd["prev"]:
        sd = sd_by_token[sd["prev"]]
        info["sweeps"].append(_sensor_info(lookup, sd, "lidar", frame, root, cwd))
    if annotated:
        anns = lookup.anns_of_sample.get(sample["token"], [])
        info.update(
            _annotations(anns, lookup.by_token["sample_annotation"], lookup.sample_time, frame, lidar_cs, lidar_pose)
        )
        categories = [lookup.category_of_instance[a["instance_token"]] for a in anns]
        info["gt_names"] = np.array([NAME_MAPPING.get(c, c) for c in categories])
        info["instance_inds"] = np.array([lookup.instance_index[a["instance_token"]] for a in anns])
    return info


def _missing_files(info: dict) -> list[str]:
    """The info's LiDAR file and camera images that are not on disk."""
    paths = [info["lidar_path"]] + [info["cams"][cam]["data_path"] for cam in CAMERA_TYPES]
    return [p for p in paths if not os.path.isfile(p)]


def convert(
    root: str | os.PathLike, version: str, max_sweeps: int = 10, check_files: bool = True
) -> dict[str, dict[str, Any]]:
    """Build the info dicts: {"train": {"infos", "metadata"}, "val": ...} or {"test": ...}.

    Paths in the infos are `root` joined with the table's filename, as given (keep `root`
    relative to run from the repository root on any machine).
    """
    tables = load_tables(root, version)
    root, cwd = str(root), os.getcwd()
    lookup = _Lookup(tables)
    train_names, _ = split_scenes(version)
    scene_by_name = {s["name"]: s["token"] for s in tables["scene"]}
    train_scenes = {scene_by_name[n] for n in train_names if n in scene_by_name}
    test = version == "v1.0-test"

    missing: list[str] = []
    out: dict[str, list[dict]] = {"train": [], "val": []}
    for sample in tqdm(tables["sample"], desc=f"convert {version}", unit="sample"):
        if test and sample["scene_token"] not in train_scenes:
            continue  # the reference files it under "val", which it does not write for v1.0-test
        info = _sample_info(lookup, sample, root, version, cwd, max_sweeps, annotated=not test)
        if check_files:
            missing.extend(_missing_files(info))
        # As the reference: every sample outside the train scenes is a val sample.
        out["train" if sample["scene_token"] in train_scenes else "val"].append(info)
        if len(missing) >= 20:
            break
    if missing:
        shown = "\n  ".join(missing[:20])
        raise ConvertError(f"files referenced by {Path(root) / version}/sample_data.json are missing, e.g.:\n  {shown}")
    metadata = {"version": version}
    if test:
        return {"test": {"infos": out["train"], "metadata": metadata}}
    return {split: {"infos": infos, "metadata": metadata} for split, infos in out.items()}


def _annotations(
    anns: list[dict],
    ann_by_token: dict[str, dict],
    sample_time: dict[str, int],
    frame: _LidarFrame,
    lidar_cs: dict,
    lidar_pose: dict,
) -> dict[str, np.ndarray]:
    """gt_boxes (n, 7) x, y, z, l, w, h, yaw and gt_velocity (n, 2) in the LiDAR frame, counts, flags."""
    if not anns:  # the reference's arrays of an empty sample (float64 where built from empty lists)
        return {
            "gt_boxes": np.zeros((0, 7)),
            "gt_velocity": np.zeros((0, 2)),
            "num_lidar_pts": np.array([]),
            "num_radar_pts": np.array([]),
            "valid_flag": np.zeros(0, dtype=bool),
        }
    centre = np.array([a["translation"] for a in anns], dtype=np.float64)
    wlh = np.array([a["size"] for a in anns], dtype=np.float64)
    rot = np.array([a["rotation"] for a in anns], dtype=np.float64)
    l2e_r, l2e_t, e2g_r, e2g_t = frame
    # global -> ego -> lidar, as the devkit's get_sample_data moves boxes.
    centre_lidar = transform(transform(centre - e2g_t, e2g_r.T) - l2e_t, l2e_r.T)
    global_to_lidar = _rotation(lidar_cs["rotation"]).inv() * _rotation(lidar_pose["rotation"]).inv()
    # pyquaternion's yaw_pitch_roll[0] (the reference's yaw) is the last intrinsic x-y-z Euler angle,
    # not the z-y-x yaw: they differ on tilted poses (tests/test_convert.py's variant).
    yaw = (global_to_lidar * _rotation(rot)).as_euler("XYZ")[:, 2]
    # global -> lidar rotation only (a velocity is a direction), as the reference does.
    velocity_lidar = transform(transform(_global_velocities(anns, ann_by_token, sample_time), e2g_r.T), l2e_r.T)
    num_lidar = np.array([a["num_lidar_pts"] for a in anns])
    num_radar = np.array([a["num_radar_pts"] for a in anns])
    return {
        "gt_boxes": np.concatenate([centre_lidar, wlh[:, [1, 0, 2]], yaw[:, None]], axis=1),
        "gt_velocity": velocity_lidar[:, :2],
        "num_lidar_pts": num_lidar,
        "num_radar_pts": num_radar,
        "valid_flag": (num_lidar + num_radar) > 0,
    }


def _global_velocities(anns: list[dict], ann_by_token: dict[str, dict], sample_time: dict[str, int]) -> np.ndarray:
    """(n, 3) global velocities as the devkit's box_velocity: a centred difference over the
    prev/next annotations (one-sided at a track's ends), NaN for a single annotation or a gap
    over MAX_VELOCITY_DT; z set to 0."""
    velocity = np.full((len(anns), 3), np.nan)
    for i, a in enumerate(anns):
        prev = ann_by_token[a["prev"]] if a["prev"] else a
        nxt = ann_by_token[a["next"]] if a["next"] else a
        if prev is nxt:
            continue
        dt = 1e-6 * sample_time[nxt["sample_token"]] - 1e-6 * sample_time[prev["sample_token"]]
        limit = MAX_VELOCITY_DT * (2 if a["prev"] and a["next"] else 1)
        if dt <= limit:
            velocity[i] = (np.asarray(nxt["translation"]) - np.asarray(prev["translation"])) / dt
    velocity[:, 2] = 0.0
    return velocity


def summarize(result: dict[str, dict[str, Any]], root: str | os.PathLike, version: str) -> dict[str, dict[str, Any]]:
    """Per split: samples, scenes, boxes and boxes per detection class (a DVC metrics dict).

    The infos do not name their scene (as the reference's), so scenes are counted through the
    version's sample table."""
    import pandas as pd

    with open(Path(root) / version / "sample.json") as f:
        scene_of = {s["token"]: s["scene_token"] for s in json.load(f)}
    summary = {}
    for split, data in result.items():
        infos = data["infos"]
        names = pd.Series([n for info in infos for n in info.get("gt_names", [])], dtype=object)
        counts = names.value_counts()
        per_class = {c: int(counts.get(c, 0)) for c in sorted(set(NAME_MAPPING.values()))}
        summary[split] = {
            "samples": len(infos),
            "scenes": len({scene_of[info["token"]] for info in infos}),
            "boxes": int(len(names)),
            "boxes_per_class": per_class,
        }
    return summary
