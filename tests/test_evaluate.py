"""Result conversion and the official evaluation: ground truth fed back scores ~1; clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from model.detector import CLASSES as DETECTION_CLASSES
from pipeline.convert import convert
from pipeline.evaluate import EvaluateError, nuscenes_eval, sequence_chunks, submission, write_results
from tests.conftest import SMALL  # noqa: F401

CLASSES = list(DETECTION_CLASSES)


@pytest.fixture(scope="module")
def val_infos(small_twin):
    cwd = os.getcwd()
    os.chdir(small_twin.parent.parent)
    try:
        return convert("data/nuscenes", "v1.0-mini")["val"]["infos"]
    finally:
        os.chdir(cwd)


def gt_as_results(infos: list[dict]) -> dict[int, dict]:
    """The ground truth of each info in the model's output layout (LiDAR frame, l, w, h)."""
    results = {}
    for i, info in enumerate(infos):
        keep = np.array([n in CLASSES for n in info["gt_names"]], dtype=bool) & (info["num_lidar_pts"] > 0)
        boxes = np.concatenate([info["gt_boxes"][keep], np.nan_to_num(info["gt_velocity"][keep])], axis=1)
        labels = np.array([CLASSES.index(n) for n in info["gt_names"][keep]])
        results[i] = {"boxes_3d": boxes, "labels_3d": labels, "scores_3d": np.linspace(0.9, 0.5, len(boxes))}
    return results


def evaluable_classes(root, version: str = "v1.0-mini", eval_set: str = "mini_val") -> set[str]:
    """Classes with ground truth left after the devkit's own filters (range, LiDAR points)."""
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes(version=version, dataroot=str(root), verbose=False)
    gt = add_center_dist(nusc, load_gt(nusc, eval_set, DetectionBox, verbose=False))
    gt = filter_eval_boxes(nusc, gt, config_factory("detection_cvpr_2019").class_range, verbose=False)
    return {b.detection_name for b in gt.all}


def test_ground_truth_as_predictions_scores_one(small_twin, val_infos, tmp_path):
    sub = submission(gt_as_results(val_infos), val_infos, CLASSES)
    assert set(sub["results"]) == {i["token"] for i in val_infos}
    path = tmp_path / "results.json"
    write_results(str(path), sub)
    summary = nuscenes_eval(str(path), str(small_twin), "v1.0-mini", str(tmp_path / "eval"), str(tmp_path / "plots"))
    # The devkit scores a class without evaluable ground truth (all occluded or out of range in the
    # val scene) as AP 0; every class that has some must be found perfectly.
    present = evaluable_classes(small_twin)
    assert len(present) >= 7, present
    for name in CLASSES:
        assert summary["mean_dist_aps"][name] == pytest.approx(1.0 if name in present else 0.0, abs=1e-6), name
        if name in present:
            # (the devkit leaves velocity/attribute/orientation errors of cones and barriers as nan)
            errors = {k: v for k, v in summary["label_tp_errors"][name].items() if not np.isnan(v)}
            assert errors["trans_err"] < 1e-4 and errors["scale_err"] < 1e-4, (name, errors)
            assert all(v < 1e-4 for v in errors.values()), (name, errors)
    assert summary["mean_ap"] == pytest.approx(len(present) / len(CLASSES), abs=1e-6)
    assert (tmp_path / "plots" / "pr_summary.png").is_file()
    # and the json passed the devkit's own loading checks (it would have raised)
    assert json.loads(path.read_text())["meta"]["use_camera"] is True


def test_results_for_other_samples_are_a_clear_error(small_twin, val_infos, tmp_path):
    sub = submission(gt_as_results(val_infos), val_infos, CLASSES)
    sub["results"].pop(val_infos[0]["token"])
    path = tmp_path / "results.json"
    write_results(str(path), sub)
    with pytest.raises(EvaluateError, match="mini_val"):
        nuscenes_eval(str(path), str(small_twin), "v1.0-mini", str(tmp_path / "eval"))


def test_version_without_val_split(small_twin, tmp_path):
    with pytest.raises(EvaluateError, match="v1.0-test"):
        nuscenes_eval(str(tmp_path / "r.json"), str(small_twin), "v1.0-test", str(tmp_path))


def test_sequence_chunks_keep_sequences_whole():
    flags = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    chunks = sequence_chunks(flags, 2)
    assert sorted(chunks[0] + chunks[1]) == list(range(10))
    for chunk in chunks:
        assert chunk == sorted(chunk)
        assert all(set(np.flatnonzero(flags == flags[i])) <= set(chunk) for i in chunk)
