"""Writes the synthetic twin in the nuScenes on-disk layout (tables, samples, sweeps, maps).

Everything derives from (params, seed): tokens are hashes, timestamps are computed, and each
scene is generated independently, so the output is byte-for-byte identical for a given seed
whatever the number of worker processes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from pyquaternion import Quaternion
from tqdm import tqdm

from pipeline.exact import matmul, matrix_quaternion, pose_matrix, quaternion_matrix, rigid_inverse, transform
from pipeline.files import atomic_directory
from pipeline.settings import ANNOTATED_VERSIONS as VERSIONS  # the twin writes boxes: not v1.0-test
from pipeline.settings import SPLITS
from pipeline.twin.render import CameraRenderer, cast_lidar, lidar_rays
from pipeline.twin.world import (
    ALL_CATEGORIES,
    ATTRIBUTES,
    CAMERAS,
    CLASS_SPECS,
    CLASSES,
    KEYFRAME_DT,
    LIDAR_TRANSLATION,
    LIDAR_YAW_DEG,
    SWEEP_DT,
    VISIBILITY_LEVELS,
    Scene,
    camera_intrinsic,
    camera_rotation,
    make_scene,
    yaw_quaternion,
)

TABLES = (
    "attribute",
    "calibrated_sensor",
    "category",
    "ego_pose",
    "instance",
    "log",
    "map",
    "sample",
    "sample_annotation",
    "sample_data",
    "scene",
    "sensor",
    "visibility",
)
LOCATIONS = ("singapore-onenorth", "boston-seaport", "singapore-queenstown", "singapore-hollandvillage")
# Camera trigger offsets from the LiDAR key frame (us): each fires as the LiDAR sweeps past it.
CAMERA_OFFSETS_US = (12_000, 20_000, 4_000, 37_000, 45_000, 29_000)
BASE_TIMESTAMP_US = 1_532_402_927_000_000
MIN_WIDTH, MIN_HEIGHT = 160, 90


class TwinConfigError(ValueError):
    """A synthesize parameter is out of range; the message names it."""


@dataclass(frozen=True)
class TwinConfig:
    version: str = "v1.0-mini"
    seed: int = 0
    num_scenes: int = 10
    samples_per_scene: int = 8
    objects_per_scene: int = 40
    image_width: int = 1600
    image_height: int = 900
    jpeg_quality: int = 90
    sweeps_per_sample: int = 9
    lidar_azimuth_steps: int = 720
    classes: tuple[str, ...] = CLASSES

    def validate(self) -> None:
        def bad(name: str, expected: str, got: object) -> TwinConfigError:
            return TwinConfigError(f"synthesize.{name}: expected {expected}, got {got!r}")

        if self.version not in VERSIONS:
            raise bad("version", f"one of {VERSIONS}", self.version)
        limit = len(scene_names(self.version, None))
        if not 1 <= self.num_scenes <= limit:
            raise bad("num_scenes", f"1..{limit} for {self.version}", self.num_scenes)
        if self.samples_per_scene < 2:
            raise bad("samples_per_scene", "at least 2", self.samples_per_scene)
        if self.objects_per_scene < 0:
            raise bad("objects_per_scene", "0 or more", self.objects_per_scene)
        if self.image_width < MIN_WIDTH or self.image_height < MIN_HEIGHT:
            raise bad(
                "image_width/image_height",
                f"at least {MIN_WIDTH} x {MIN_HEIGHT} pixels for the cameras",
                (self.image_width, self.image_height),
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise bad("jpeg_quality", "1..100", self.jpeg_quality)
        if not 0 <= self.sweeps_per_sample <= 9:
            raise bad("sweeps_per_sample", "0..9 (20 Hz LiDAR between 2 Hz key frames)", self.sweeps_per_sample)
        if self.lidar_azimuth_steps < 36:
            raise bad("lidar_azimuth_steps", "at least 36", self.lidar_azimuth_steps)
        unknown = [c for c in self.classes if c not in CLASS_SPECS]
        if unknown or not self.classes:
            raise bad("classes", f"a non-empty subset of {list(CLASSES)}", list(self.classes))


def scene_names(version: str, count: int | None) -> list[str]:
    """Scene names from the devkit's splits, interleaving train and val (about 4:1)."""
    from nuscenes.utils import splits

    train, val = (getattr(splits, name) for name in SPLITS[version])
    names, ti, vi = [], 0, 0
    while ti < len(train) or vi < len(val):
        if vi < len(val) and (ti >= len(train) or len(names) % 5 == 1):
            names.append(val[vi])
            vi += 1
        else:
            names.append(train[ti])
            ti += 1
    return names if count is None else names[:count]


def _token(cfg: TwinConfig, *parts: object) -> str:
    key = "/".join(str(p) for p in (cfg.seed, cfg.version) + parts)
    return hashlib.md5(key.encode()).hexdigest()


def _log_record(cfg: TwinConfig, scene: Scene) -> dict:
    location = LOCATIONS[scene.index % len(LOCATIONS)]
    prefix = "n015" if location.startswith("singapore") else "n008"
    stamp = (BASE_TIMESTAMP_US // 1_000_000) + 3600 * scene.index
    return {
        "token": _token(cfg, "log", scene.index),
        "logfile": f"{prefix}-synthetic-{cfg.seed}-{stamp}",
        "vehicle": prefix,
        "date_captured": "2018-07-24",
        "location": location,
    }


def _calibration(cfg: TwinConfig, index: int) -> dict[str, dict]:
    """calibrated_sensor records of one scene, by channel: the six cameras, then LIDAR_TOP."""
    calib: dict[str, dict] = {}
    for cam in CAMERAS:
        calib[cam.channel] = {
            "token": _token(cfg, "calibrated_sensor", index, cam.channel),
            "sensor_token": _token(cfg, "sensor", cam.channel),
            "translation": list(cam.translation),
            "rotation": matrix_quaternion(camera_rotation(cam.yaw_deg)),
            "camera_intrinsic": camera_intrinsic(cam, cfg.image_width, cfg.image_height).tolist(),
        }
    calib["LIDAR_TOP"] = {
        "token": _token(cfg, "calibrated_sensor", index, "LIDAR_TOP"),
        "sensor_token": _token(cfg, "sensor", "LIDAR_TOP"),
        "translation": list(LIDAR_TRANSLATION),
        "rotation": yaw_quaternion(float(np.radians(LIDAR_YAW_DEG))),
        "camera_intrinsic": [],
    }
    return calib


def _lidar_points_in_boxes(points: np.ndarray, boxes_sensor: np.ndarray) -> np.ndarray:
    """(n,) number of (m, 3) sensor-frame points inside each of (n, 7) sensor-frame boxes
    (x, y, z, w, l, h, yaw), by the devkit's points_in_box: cast_lidar keeps every box hit at
    least 1 mm inside the box, so no count hangs on the boundary convention."""
    from nuscenes.utils.data_classes import Box
    from nuscenes.utils.geometry_utils import points_in_box

    xyz = points.astype(np.float64).T  # (3, m)
    return np.array(
        [
            int(points_in_box(Box(b[:3], b[3:6], Quaternion(axis=[0, 0, 1], radians=b[6])), xyz).sum())
            for b in boxes_sensor
        ],
        dtype=np.int64,
    )


def _boxes_to_frame(boxes: np.ndarray, global_to_frame: np.ndarray) -> np.ndarray:
    """(n, 7) global boxes in another frame whose rotation is about z (as ego and LiDAR are)."""
    out = boxes.copy()
    out[:, :3] = transform(boxes[:, :3], global_to_frame[:3, :3], global_to_frame[:3, 3])
    out[:, 6] = boxes[:, 6] + np.arctan2(global_to_frame[1, 0], global_to_frame[0, 0])
    return out


@functools.lru_cache(maxsize=1)
def _renderers(width: int, height: int) -> dict[str, CameraRenderer]:
    """One renderer per camera; all scenes share the calibration, so a worker builds them once."""
    out = {}
    for cam in CAMERAS:
        cam_to_ego = np.eye(4)
        cam_to_ego[:3, :3] = quaternion_matrix(matrix_quaternion(camera_rotation(cam.yaw_deg)))
        cam_to_ego[:3, 3] = cam.translation
        out[cam.channel] = CameraRenderer(camera_intrinsic(cam, width, height), cam_to_ego, width, height)
    return out


def _visibility_levels(visible: np.ndarray, area: np.ndarray) -> np.ndarray:
    """(n,) nuScenes visibility tokens 1..4 (0-40, 40-60, 60-80, 80-100 %) from the visible and
    total rendered pixels of each object over the six cameras."""
    frac = np.where(area > 0, visible / np.maximum(area, 1), 0.0)
    return np.digitize(frac, [0.4, 0.6, 0.8]) + 1


class _SceneWriter:
    """Writes one scene's sensor files and collects its table records, key frame by key frame.

    Records are appended in the order the sensors fire (LiDAR sweeps, the key-frame sweep, then
    the cameras), so the tables come out the same on every run."""

    def __init__(self, cfg: TwinConfig, index: int, root: str):
        self.cfg, self.index, self.root = cfg, index, root
        self.name = scene_names(cfg.version, cfg.num_scenes)[index]
        self.scene = make_scene(
            index, self.name, cfg.samples_per_scene, cfg.objects_per_scene, tuple(cfg.classes), cfg.seed
        )
        self.tables: dict[str, list[dict]] = {t: [] for t in TABLES}
        log = _log_record(cfg, self.scene)
        self.log_name = log["logfile"]
        self.tables["log"].append(log)
        self.calib = _calibration(cfg, index)
        self.tables["calibrated_sensor"].extend(self.calib.values())
        self.renderers = _renderers(cfg.image_width, cfg.image_height)
        self.dirs, self.ring = lidar_rays(cfg.lidar_azimuth_steps)
        self.object_names = [o.name for o in self.scene.objects]
        self.base_us = BASE_TIMESTAMP_US + index * 3_600_000_000
        self.sample_tokens = [_token(cfg, "sample", index, k) for k in range(cfg.samples_per_scene)]
        self.channel_chain: dict[str, list[dict]] = {c.channel: [] for c in CAMERAS}
        self.channel_chain["LIDAR_TOP"] = []
        self.ann_tokens: list[list[str]] = []

    def seconds(self, t_us: int) -> float:
        """Scene time (s from its start) of a timestamp."""
        return (t_us - self.base_us) / 1e6

    def sample_data(
        self, channel: str, t_us: int, key: bool, sample_k: int, filename: str, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Adds a sample_data and its ego pose; returns the ego->global and sensor->global transforms."""
        translation, rotation = self.scene.ego_pose(self.seconds(t_us))
        sd_token = _token(self.cfg, "sample_data", self.index, channel, t_us)
        self.tables["ego_pose"].append(
            {"token": sd_token, "timestamp": t_us, "rotation": rotation, "translation": translation}
        )
        self.channel_chain[channel].append(
            {
                "token": sd_token,
                "sample_token": self.sample_tokens[sample_k],
                "ego_pose_token": sd_token,
                "calibrated_sensor_token": self.calib[channel]["token"],
                "timestamp": t_us,
                "fileformat": "jpg" if channel.startswith("CAM") else "pcd",
                "is_key_frame": key,
                "height": height,
                "width": width,
                "filename": filename,
                "prev": "",
                "next": "",
            }
        )
        ego_to_global = pose_matrix(rotation, translation)
        sensor_to_ego = pose_matrix(self.calib[channel]["rotation"], self.calib[channel]["translation"])
        return ego_to_global, matmul(ego_to_global, sensor_to_ego)

    def lidar_sweep(self, t_us: int, key: bool, sample_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Casts and writes one LiDAR sweep; returns its (m, 5) points and sensor->global transform."""
        folder = "samples" if key else "sweeps"
        filename = f"{folder}/LIDAR_TOP/{self.log_name}__LIDAR_TOP__{t_us}.pcd.bin"
        _, sensor_to_global = self.sample_data("LIDAR_TOP", t_us, key, sample_k, filename, 0, 0)
        boxes = self.scene.object_boxes(self.seconds(t_us))
        points = cast_lidar(sensor_to_global, self.dirs, self.ring, boxes, self.object_names)
        with open(os.path.join(self.root, filename), "wb") as f:
            f.write(points.tobytes())
        return points, sensor_to_global

    def camera_images(self, k: int, key_us: int) -> tuple[np.ndarray, np.ndarray]:
        """Renders and writes the six images of key frame k; returns each object's visible and
        total pixels summed over the cameras."""
        cfg = self.cfg
        visible = np.zeros(len(self.scene.objects), dtype=np.int64)
        area = np.zeros(len(self.scene.objects), dtype=np.int64)
        for cam, offset in zip(CAMERAS, CAMERA_OFFSETS_US):
            t_us = key_us + offset
            filename = f"samples/{cam.channel}/{self.log_name}__{cam.channel}__{t_us}.jpg"
            ego_to_global, cam_to_global = self.sample_data(
                cam.channel, t_us, True, k, filename, cfg.image_width, cfg.image_height
            )
            boxes_now = self.scene.object_boxes(self.seconds(t_us))
            image, vis, ar = self.renderers[cam.channel].render(
                ego_to_global, cam_to_global, boxes_now, self.object_names
            )
            visible += vis
            area += ar
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=cfg.jpeg_quality)
            with open(os.path.join(self.root, filename), "wb") as f:
                f.write(buf.getvalue())
        return visible, area

    def key_frame(self, k: int) -> None:
        """Key frame k: the LiDAR sweeps since the previous one, the key sweep, the six images,
        the sample and its annotations."""
        cfg = self.cfg
        key_us = self.base_us + int(round(k * KEYFRAME_DT * 1e6))
        if k > 0:
            for j in range(cfg.sweeps_per_sample, 0, -1):
                sweep_us = key_us - int(round(j * SWEEP_DT * 1e6))
                # A sweep belongs to the key frame nearest in time.
                self.lidar_sweep(sweep_us, False, k if j * SWEEP_DT < KEYFRAME_DT / 2 else k - 1)
        points, lidar_to_global = self.lidar_sweep(key_us, True, k)
        boxes = self.scene.object_boxes(k * KEYFRAME_DT)
        num_pts = _lidar_points_in_boxes(points[:, :3], _boxes_to_frame(boxes, rigid_inverse(lidar_to_global)))
        visible, area = self.camera_images(k, key_us)
        self.tables["sample"].append(
            {
                "token": self.sample_tokens[k],
                "timestamp": key_us,
                "prev": self.sample_tokens[k - 1] if k > 0 else "",
                "next": self.sample_tokens[k + 1] if k + 1 < cfg.samples_per_scene else "",
                "scene_token": _token(cfg, "scene", self.index),
            }
        )
        self.annotations(k, boxes, num_pts, _visibility_levels(visible, area))

    def annotations(self, k: int, boxes: np.ndarray, num_pts: np.ndarray, level: np.ndarray) -> None:
        """sample_annotation records of key frame k: (n, 7) global boxes, LiDAR counts, visibility."""
        cfg, index = self.cfg, self.index
        self.ann_tokens.append([])
        for i, obj in enumerate(self.scene.objects):
            ann_token = _token(cfg, "sample_annotation", index, k, i)
            self.ann_tokens[-1].append(ann_token)
            self.tables["sample_annotation"].append(
                {
                    "token": ann_token,
                    "sample_token": self.sample_tokens[k],
                    "instance_token": _token(cfg, "instance", index, i),
                    "visibility_token": str(int(level[i])),
                    "attribute_tokens": [_token(cfg, "attribute", a) for a in _attributes(obj.name, obj.moving)],
                    "translation": [float(v) for v in boxes[i, :3]],
                    "size": [float(v) for v in boxes[i, 3:6]],
                    "rotation": yaw_quaternion(float(boxes[i, 6])),
                    "prev": _token(cfg, "sample_annotation", index, k - 1, i) if k > 0 else "",
                    "next": _token(cfg, "sample_annotation", index, k + 1, i) if k + 1 < cfg.samples_per_scene else "",
                    "num_lidar_pts": int(num_pts[i]),
                    "num_radar_pts": 0,
                }
            )

    def finish(self) -> dict[str, list[dict]]:
        """Links each channel's sample_data, adds the instances and the scene; returns the tables."""
        cfg, index, scene = self.cfg, self.index, self.scene
        for records in self.channel_chain.values():
            for a, b in zip(records[:-1], records[1:]):
                a["next"], b["prev"] = b["token"], a["token"]
            self.tables["sample_data"].extend(records)
        for i, obj in enumerate(scene.objects):
            self.tables["instance"].append(
                {
                    "token": _token(cfg, "instance", index, i),
                    "category_token": _token(cfg, "category", obj.category),
                    "nbr_annotations": cfg.samples_per_scene,
                    "first_annotation_token": self.ann_tokens[0][i],
                    "last_annotation_token": self.ann_tokens[-1][i],
                }
            )
        self.tables["scene"].append(
            {
                "token": _token(cfg, "scene", index),
                "log_token": self.tables["log"][0]["token"],
                "nbr_samples": cfg.samples_per_scene,
                "first_sample_token": self.sample_tokens[0],
                "last_sample_token": self.sample_tokens[-1],
                "name": self.name,
                "description": f"synthetic, {'turning' if scene.path.curvature else 'straight'} road, "
                f"ego at {scene.ego_speed:.1f} m/s, {len(scene.objects)} objects",
            }
        )
        return self.tables


def generate_scene(cfg: TwinConfig, index: int, root: str) -> dict[str, list[dict]]:
    """Generate one scene's files under root and return its table records."""
    writer = _SceneWriter(cfg, index, root)
    for k in range(cfg.samples_per_scene):
        writer.key_frame(k)
    return writer.finish()


def _attributes(name: str, moving: bool) -> list[str]:
    if name == "bus":
        return ["vehicle.moving" if moving else "vehicle.stopped"]  # buses wait at stops
    if name in ("car", "truck", "construction_vehicle", "trailer"):
        return ["vehicle.moving" if moving else "vehicle.parked"]
    if name in ("motorcycle", "bicycle"):
        return ["cycle.with_rider" if moving else "cycle.without_rider"]
    if name == "pedestrian":
        return ["pedestrian.moving" if moving else "pedestrian.standing"]
    return []


def _static_tables(cfg: TwinConfig, logs: list[dict]) -> dict[str, list[dict]]:
    channels = [c.channel for c in CAMERAS] + ["LIDAR_TOP"]
    maps = []
    for location in LOCATIONS:
        log_tokens = [log["token"] for log in logs if log["location"] == location]
        if log_tokens:
            maps.append(
                {
                    "token": _token(cfg, "map", location),
                    "log_tokens": log_tokens,
                    "category": "semantic_prior",
                    "filename": f"maps/{_token(cfg, 'map', location)}.png",
                }
            )
    return {
        "attribute": [
            {"token": _token(cfg, "attribute", a), "name": a, "description": a.replace(".", ": ")} for a in ATTRIBUTES
        ],
        "category": [
            {"token": _token(cfg, "category", c), "name": c, "description": f"synthetic {c}", "index": i}
            for i, c in enumerate(ALL_CATEGORIES)
        ],
        "visibility": [
            {
                "token": tok,
                "level": level,
                "description": f"visibility of whole object is between {level[1:].replace('-', ' and ')} %",
            }
            for tok, level in VISIBILITY_LEVELS
        ],
        "sensor": [
            {"token": _token(cfg, "sensor", c), "channel": c, "modality": "camera" if c.startswith("CAM") else "lidar"}
            for c in channels
        ],
        "map": maps,
    }


def _scene_job(args: tuple[TwinConfig, int, str]) -> dict[str, list[dict]]:
    return generate_scene(*args)


def _generate_scenes(cfg: TwinConfig, root: Path, workers: int | None) -> dict[str, list[dict]]:
    """Every scene's files under root, in worker processes; their table records merged in scene order."""
    jobs = [(cfg, i, str(root)) for i in range(cfg.num_scenes)]
    workers = max(1, min(workers or os.cpu_count() or 1, cfg.num_scenes))
    per_scene: list[dict[str, list[dict]]] = []
    bar = tqdm(total=cfg.num_scenes, desc="synthesize scenes", unit="scene")
    if workers == 1:
        for job in jobs:
            per_scene.append(_scene_job(job))
            bar.update()
    else:
        with get_context("spawn").Pool(workers) as pool:
            for tables in pool.imap(_scene_job, jobs):
                per_scene.append(tables)
                bar.update()
    bar.close()
    return {t: [r for s in per_scene for r in s[t]] for t in TABLES}


def _write_tables(cfg: TwinConfig, root: Path, tables: dict[str, list[dict]]) -> None:
    """The version's JSON tables and the map rasters they name."""
    for name in TABLES:
        with open(root / cfg.version / f"{name}.json", "w") as f:
            json.dump(tables[name], f, indent=1)
    for record in tables["map"]:
        # A small semantic prior raster (drivable area everywhere), as the map table expects.
        Image.fromarray(np.full((64, 64), 255, dtype=np.uint8)).save(root / record["filename"])


def write_twin(cfg: TwinConfig, out: str | os.PathLike, workers: int | None = None) -> dict[str, int]:
    """Generate the twin into `out` atomically (built beside it, renamed at the end).

    Returns counts for a summary. Raises TwinConfigError on bad parameters before writing.
    """
    cfg.validate()
    with atomic_directory(out) as tmp:
        folders = [f"samples/{c.channel}" for c in CAMERAS] + ["samples/LIDAR_TOP", "sweeps/LIDAR_TOP", "maps"]
        for folder in folders + [cfg.version]:
            (tmp / folder).mkdir(parents=True, exist_ok=True)
        tables = _generate_scenes(cfg, tmp, workers)
        tables.update(_static_tables(cfg, tables["log"]))
        _write_tables(cfg, tmp, tables)
    return {
        "scenes": len(tables["scene"]),
        "samples": len(tables["sample"]),
        "annotations": len(tables["sample_annotation"]),
        "images": sum(1 for r in tables["sample_data"] if r["fileformat"] == "jpg"),
        "lidar_sweeps": sum(1 for r in tables["sample_data"] if r["fileformat"] == "pcd"),
    }
