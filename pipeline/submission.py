"""Boxes to the nuScenes submission format: detection and tracking results as the devkit reads them.

Boxes leave the model in the LiDAR frame with Sparse4D's size columns (the devkit's l, w, h);
they go to the nuScenes global frame with (w, l, h) sizes, the reference's default attribute per
class, and the class range filter of the detection config, as the reference's evaluation does.
The tracking submission is the reference's too: the instance bank's ids as tracking ids, the
boxes whose class score reaches the tracking threshold, the seven nuScenes tracking classes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pyquaternion import Quaternion

from pipeline.files import write_bytes_atomic

DEFAULT_ATTRIBUTE = {
    "car": "vehicle.parked",
    "pedestrian": "pedestrian.moving",
    "trailer": "vehicle.parked",
    "truck": "vehicle.parked",
    "bus": "vehicle.moving",
    "motorcycle": "cycle.without_rider",
    "construction_vehicle": "vehicle.parked",
    "bicycle": "cycle.without_rider",
    "barrier": "",
    "traffic_cone": "",
}


DETECTION_CONFIG = "detection_cvpr_2019"


TRACKING_CONFIG = "tracking_nips_2019"  # the reference's track3d_eval_version


class EvaluateError(RuntimeError):
    """Missing checkpoint, a split that does not match, a results file for other samples."""


def attribute_for(name: str, velocity: np.ndarray) -> str:
    """The reference's attribute rule: moving vs parked/standing from the predicted speed."""
    if np.hypot(velocity[0], velocity[1]) > 0.2:
        if name in ("car", "construction_vehicle", "bus", "truck", "trailer"):
            return "vehicle.moving"
        if name in ("bicycle", "motorcycle"):
            return "cycle.with_rider"
        return DEFAULT_ATTRIBUTE[name]
    if name == "pedestrian":
        return "pedestrian.standing"
    if name == "bus":
        return "vehicle.stopped"
    return DEFAULT_ATTRIBUTE[name]


def boxes_to_global(
    info: dict, boxes: np.ndarray, labels: np.ndarray, classes: list[str], class_range: dict[str, float]
) -> list[tuple[int, str, Any]]:
    """(n, >=9) LiDAR-frame boxes x, y, z, [l, w, h], yaw, vx, vy -> (row, class name, devkit Box in
    the global frame) for the boxes inside the evaluated range of their class (in the ego frame)."""
    from nuscenes.utils.data_classes import Box

    l2e_r, l2e_t = Quaternion(info["lidar2ego_rotation"]), np.asarray(info["lidar2ego_translation"])
    e2g_r, e2g_t = Quaternion(info["ego2global_rotation"]), np.asarray(info["ego2global_translation"])
    out = []
    for row, (box, label) in enumerate(zip(boxes, labels)):
        name = classes[int(label)]
        velocity = (box[7], box[8], 0.0) if len(box) > 8 else (np.nan, np.nan, np.nan)
        nb = Box(box[:3], box[[4, 3, 5]], Quaternion(axis=[0, 0, 1], radians=float(box[6])), velocity=velocity)
        nb.rotate(l2e_r)
        nb.translate(l2e_t)
        if np.linalg.norm(nb.center[:2]) > class_range[name]:
            continue
        nb.rotate(e2g_r)
        nb.translate(e2g_t)
        out.append((row, name, nb))
    return out


def lidar_boxes_to_global(
    info: dict,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    class_range: dict[str, float],
) -> list[dict]:
    """(n, >=9) LiDAR-frame boxes x, y, z, [l, w, h], yaw, vx, vy -> nuScenes detection dicts."""
    return [
        {
            "sample_token": info["token"],
            "translation": nb.center.tolist(),
            "size": nb.wlh.tolist(),
            "rotation": nb.orientation.elements.tolist(),
            "velocity": nb.velocity[:2].tolist(),
            "detection_name": name,
            "detection_score": float(scores[row]),
            "attribute_name": attribute_for(name, nb.velocity),
        }
        for row, name, nb in boxes_to_global(info, boxes, labels, classes, class_range)
    ]


def tracked_rows(result: dict, threshold: float) -> np.ndarray:
    """Rows of one frame's result that enter the tracking submission, as the reference's tracking
    output: class score before quality weighting (`cls_scores`; the final score when the model has
    none) >= threshold. A box without an id (-1: the instance bank gave it none) is no track."""
    if "instance_ids" not in result:
        raise EvaluateError("the model's results carry no instance_ids: tracking needs the instance bank's ids")
    gate = result["cls_scores"] if "cls_scores" in result else result["scores_3d"]
    return np.flatnonzero((np.asarray(gate) >= threshold) & (np.asarray(result["instance_ids"]) >= 0))


def lidar_tracks_to_global(
    info: dict,
    result: dict,
    classes: list[str],
    class_range: dict[str, float],
    threshold: float,
    tracking_names: list[str],
) -> list[dict]:
    """One frame's tracked boxes -> nuScenes tracking dicts (global frame) of the tracking classes."""
    rows = tracked_rows(result, threshold)
    boxes, labels = result["boxes_3d"][rows], result["labels_3d"][rows]
    scores, ids = result["scores_3d"][rows], result["instance_ids"][rows]
    return [
        {
            "sample_token": info["token"],
            "translation": nb.center.tolist(),
            "size": nb.wlh.tolist(),
            "rotation": nb.orientation.elements.tolist(),
            "velocity": nb.velocity[:2].tolist(),
            "tracking_name": name,
            "tracking_score": float(scores[row]),
            "tracking_id": str(int(ids[row])),
        }
        for row, name, nb in boxes_to_global(info, boxes, labels, classes, class_range)
        # the reference drops barrier, traffic_cone and construction_vehicle: exactly the
        # detection classes that nuScenes tracking does not score
        if name in tracking_names
    ]


SUBMISSION_META = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}


def submission(
    results: dict[int, dict], infos: list[dict], classes: list[str], eval_version: str = DETECTION_CONFIG
) -> dict:
    """The nuScenes detection submission: every sample of `infos`, boxes in the global frame."""
    from nuscenes.eval.detection.config import config_factory

    class_range = config_factory(eval_version).class_range
    out = {}
    for idx, info in enumerate(infos):
        r = results.get(idx)
        out[info["token"]] = (
            []
            if r is None
            else lidar_boxes_to_global(info, r["boxes_3d"], r["labels_3d"], r["scores_3d"], classes, class_range)
        )
    return {"meta": dict(SUBMISSION_META), "results": out}


def tracking_submission(results: dict[int, dict], infos: list[dict], classes: list[str], threshold: float) -> dict:
    """The nuScenes tracking submission, as the reference writes it: the instance bank's ids as
    tracking_id, boxes whose class score is >= threshold, the detection config's class ranges, the
    classes nuScenes tracking scores; every sample of `infos`."""
    from nuscenes.eval.common.config import config_factory

    class_range = config_factory(DETECTION_CONFIG).class_range
    tracking_names = list(config_factory(TRACKING_CONFIG).tracking_names)
    out = {}
    for idx, info in enumerate(infos):
        r = results.get(idx)
        out[info["token"]] = (
            [] if r is None else lidar_tracks_to_global(info, r, classes, class_range, threshold, tracking_names)
        )
    return {"meta": dict(SUBMISSION_META), "results": out}


def write_results(path: str, sub: dict) -> None:
    write_bytes_atomic(path, json.dumps(sub).encode())
