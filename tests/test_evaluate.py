"""Result conversion and the official evaluation (detection and tracking): ground truth fed back
scores ~1, swapped ids are id switches; the evaluate stage end to end; pictures; clear errors."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import yaml
from pyquaternion import Quaternion

from pipeline import pictures
from pipeline.convert import convert
from pipeline.evaluate import evaluate, sequence_chunks
from pipeline.metrics import devkit_tracking_compat, flat_tracking_metrics, nuscenes_eval, tracking_eval
from pipeline.pictures import draw_pictures, scene_tracks
from pipeline.settings import CLASSES as DETECTION_CLASSES
from pipeline.submission import EvaluateError, submission, tracking_submission, write_results
from tests.conftest import ROOT, SMALL, stage_params  # noqa: F401

CLASSES = list(DETECTION_CLASSES)
TRACKING_CLASSES = ["bicycle", "bus", "car", "motorcycle", "pedestrian", "trailer", "truck"]


@pytest.fixture(scope="module")
def val_infos(small_twin):
    cwd = os.getcwd()
    os.chdir(small_twin.parent.parent)
    try:
        return convert("data/nuscenes", "v1.0-mini")["val"]["infos"]
    finally:
        os.chdir(cwd)


def gt_as_results(infos: list[dict]) -> dict[int, dict]:
    """The ground truth of each info in the model's output layout (LiDAR frame, l, w, h), with
    the converter's instance indices as the instance bank's ids (one score per track)."""
    results = {}
    for i, info in enumerate(infos):
        keep = np.array([n in CLASSES for n in info["gt_names"]], dtype=bool) & (info["num_lidar_pts"] > 0)
        boxes = np.concatenate([info["gt_boxes"][keep], np.nan_to_num(info["gt_velocity"][keep])], axis=1)
        labels = np.array([CLASSES.index(n) for n in info["gt_names"][keep]])
        ids = np.asarray(info["instance_inds"])[keep]
        scores = 0.3 + 0.6 * ((ids * 37) % 101) / 101
        results[i] = {
            "boxes_3d": boxes,
            "labels_3d": labels,
            "scores_3d": scores,
            "cls_scores": scores,
            "instance_ids": ids,
        }
    return results


def evaluable_classes(root, version: str = "v1.0-mini", eval_set: str = "mini_val", tracking: bool = False) -> set[str]:
    """Classes with ground truth left after the devkit's own filters (range, LiDAR points)."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.eval.tracking.data_classes import TrackingBox
    from nuscenes.nuscenes import NuScenes

    cfg = config_factory("tracking_nips_2019" if tracking else "detection_cvpr_2019")
    nusc = NuScenes(version=version, dataroot=str(root), verbose=False)
    gt = add_center_dist(nusc, load_gt(nusc, eval_set, TrackingBox if tracking else DetectionBox, verbose=False))
    gt = filter_eval_boxes(nusc, gt, cfg.class_range, verbose=False)
    return {b.tracking_name if tracking else b.detection_name for b in gt.all}


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


# ---- tracking -------------------------------------------------------------------------------


def in_time_order(infos: list[dict]) -> list[dict]:
    return sorted(infos, key=lambda info: info["timestamp"])


def run_tracking(small_twin, tmp_path, infos: list[dict], results: dict[int, dict]) -> dict:
    path = tmp_path / "tracking.json"
    write_results(str(path), tracking_submission(results, infos, CLASSES, 0.2))
    return flat_tracking_metrics(tracking_eval(str(path), str(small_twin), "v1.0-mini", str(tmp_path / "teval")))


def test_ground_truth_tracks_score_amota_one(small_twin, val_infos, tmp_path):
    infos = in_time_order(val_infos)
    # the twin's instances are tracks: the val scene's objects keep their ids over its frames
    seen = [set(np.asarray(i["instance_inds"]).tolist()) for i in infos]
    assert len(infos) == SMALL.samples_per_scene and len(set.intersection(*seen)) >= 5
    metrics = run_tracking(small_twin, tmp_path, infos, gt_as_results(infos))
    assert metrics["AMOTA"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["MOTA"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["RECALL"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["AMOTP"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["IDS"] == 0 and metrics["FRAG"] == 0
    # every tracking class with evaluable ground truth, and only those (no nan in the file)
    present = evaluable_classes(small_twin, tracking=True)
    assert len(present) >= 3, present
    assert metrics["per_class_AMOTA"] == {name: 1.0 for name in present}
    json.dumps(metrics, allow_nan=False)


def test_swapped_ids_are_id_switches(small_twin, val_infos, tmp_path):
    infos = in_time_order(val_infos)
    results = gt_as_results(infos)
    # two cars present in every frame, far apart: swap their ids in the last frame
    last = results[len(infos) - 1]
    tracks = set.intersection(
        *[set(r["instance_ids"][r["labels_3d"] == CLASSES.index("car")]) for r in results.values()]
    )
    rows = [int(np.flatnonzero(last["instance_ids"] == t)[0]) for t in sorted(tracks)]
    a, b = next(
        (a, b) for a in rows for b in rows if np.linalg.norm(last["boxes_3d"][a, :2] - last["boxes_3d"][b, :2]) > 6
    )
    last["instance_ids"][[a, b]] = last["instance_ids"][[b, a]]
    metrics = run_tracking(small_twin, tmp_path, infos, results)
    assert metrics["IDS"] == 2
    assert metrics["per_class_AMOTA"].pop("car") < 1.0
    assert metrics["per_class_AMOTA"] and all(v == 1.0 for v in metrics["per_class_AMOTA"].values())


def test_tracking_submission_keeps_what_the_reference_keeps(val_infos):
    info = val_infos[0]
    names = ["car", "car", "barrier", "construction_vehicle", "car", "pedestrian", "traffic_cone", "truck"]
    n = len(names)
    boxes = np.zeros((n, 10))
    boxes[:, 0], boxes[:, 1] = 5.0 + 3 * np.arange(n), 2.0  # in range, LiDAR frame
    boxes[:, 3:6] = [4.0, 2.0, 1.5]
    boxes[:, 7] = 3.0  # 3 m/s along the LiDAR x axis
    result = {
        "boxes_3d": boxes,
        "labels_3d": np.array([CLASSES.index(c) for c in names]),
        # the class score before quality weighting decides, not the final score
        "cls_scores": np.array([0.5, 0.1, 0.9, 0.9, 0.9, 0.2, 0.9, 0.3]),
        "scores_3d": np.array([0.05, 0.9, 0.9, 0.9, 0.9, 0.15, 0.9, 0.25]),
        "instance_ids": np.array([7, 8, 9, 10, -1, 12, 13, 14]),
    }
    sub = tracking_submission({0: result}, val_infos, CLASSES, 0.2)
    assert set(sub["results"]) == {i["token"] for i in val_infos}
    kept = sub["results"][info["token"]]
    # car 0.5: kept; car 0.1: below; barrier, construction vehicle, cone: not nuScenes tracking
    # classes; car id -1: no track; pedestrian 0.2: kept (>=); truck 0.3: kept
    assert [(t["tracking_id"], t["tracking_name"]) for t in kept] == [
        ("7", "car"),
        ("12", "pedestrian"),
        ("14", "truck"),
    ]
    assert [t["tracking_score"] for t in kept] == [0.05, 0.15, 0.25]
    for t in kept:
        assert set(t) == {"sample_token", "translation", "size", "rotation", "velocity"} | {
            "tracking_id", "tracking_name", "tracking_score"
        }  # fmt: skip
        assert np.hypot(*t["velocity"]) == pytest.approx(3.0, abs=1e-3)  # rotated into the global frame, not lost
        assert t["size"] == pytest.approx([2.0, 4.0, 1.5])  # w, l, h
    # the final score decides when the model gives no class score
    del result["cls_scores"]
    kept = tracking_submission({0: result}, val_infos, CLASSES, 0.2)["results"][info["token"]]
    assert [t["tracking_id"] for t in kept] == ["8", "14"]  # car 0.9, truck 0.25
    del result["instance_ids"]
    with pytest.raises(EvaluateError, match="instance_ids"):
        tracking_submission({0: result}, val_infos, CLASSES, 0.2)


def test_tracking_results_for_other_samples_are_a_clear_error(small_twin, val_infos, tmp_path):
    sub = tracking_submission(gt_as_results(val_infos), val_infos, CLASSES, 0.2)
    sub["results"].pop(val_infos[0]["token"])
    path = tmp_path / "tracking.json"
    write_results(str(path), sub)
    with pytest.raises(EvaluateError, match="mini_val"):
        tracking_eval(str(path), str(small_twin), "v1.0-mini", str(tmp_path / "teval"))
    with pytest.raises(EvaluateError, match="v1.0-test"):
        tracking_eval(str(path), str(small_twin), "v1.0-test", str(tmp_path / "teval"))


def test_a_submission_without_tracks_scores_the_worst(small_twin, val_infos, tmp_path):
    """The devkit raises on a submission without a single box; the one compatibility patch
    lets it score one as it scores a track it never finds, and leaves the devkit as it was."""
    from nuscenes.eval.common import loaders
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.tracking.evaluate import TrackingEval

    empty = {i: {k: v[:0] for k, v in r.items()} for i, r in gt_as_results(val_infos).items()}
    path = tmp_path / "tracking.json"
    write_results(str(path), tracking_submission(empty, val_infos, CLASSES, 0.2))
    original = loaders._get_box_class_field
    with pytest.raises(Exception, match="Invalid box type"):
        TrackingEval(config_factory("tracking_nips_2019"), str(path), "mini_val", str(tmp_path / "raw"), "v1.0-mini", str(small_twin), verbose=False)  # fmt: skip
    metrics = run_tracking(small_twin, tmp_path, val_infos, empty)
    assert metrics["AMOTA"] == 0.0 and metrics["RECALL"] == 0.0 and metrics["AMOTP"] == 2.0
    assert metrics["IDS"] == 0
    assert loaders._get_box_class_field is original
    with devkit_tracking_compat():
        assert loaders._get_box_class_field is not original
    assert loaders._get_box_class_field is original


# ---- the stage end to end -------------------------------------------------------------------


def test_evaluate_stage_writes_numeric_tracking_metrics_and_pictures(
    small_twin, stage_workspace, tmp_path, monkeypatch
):
    monkeypatch.chdir(small_twin.parent.parent)
    monkeypatch.setattr("pipeline.evaluate.WARMUP_FRAMES", 1)  # the small twin has 3 val frames
    out, plots = tmp_path / "out", tmp_path / "plots"
    metrics = evaluate(
        stage_params(small_twin),
        str(stage_workspace / "val.pkl"),
        str(stage_workspace / "model.pth"),
        str(out),
        str(tmp_path / "evaluate.json"),
        str(plots),
    )
    written = json.loads((tmp_path / "evaluate.json").read_text())
    assert written == metrics
    for key in ("mAP", "NDS", "AMOTA", "AMOTP", "RECALL", "IDS", "FRAG"):
        assert isinstance(written[key], (int, float)) and np.isfinite(written[key]), key
    assert written["frames"] == SMALL.samples_per_scene
    assert written["fps"] > 0  # the model alone, over the frames after the warm-up
    assert not [k for k, v in written.items() if isinstance(v, str)]  # numbers, not sentences
    sub = json.loads((out / "results_nusc_tracking.json").read_text())
    assert len(sub["results"]) == SMALL.samples_per_scene
    for name in ("frame_0.png", "frame_1.png", "frame_2.png", "tracks.png", "per_class_ap.png", "pr_summary.png"):
        assert (plots / name).stat().st_size > 10_000, name
    assert (plots / "per_class_tp_errors.png").stat().st_size > 5_000
    # the devkit's own files, as its main() writes them, and its per-class table
    for folder in ("nuscenes_eval", "nuscenes_tracking_eval"):
        summary = json.loads((out / folder / "metrics_summary.json").read_text())
        assert summary["meta"]["use_camera"] is True
        assert json.loads((out / folder / "metrics_details.json").read_text())
    summary = json.loads((out / "nuscenes_eval" / "metrics_summary.json").read_text())
    assert summary["mean_ap"] == pytest.approx(written["mAP"], abs=1e-4)
    table = (out / "per_class_tp_errors.csv").read_text().splitlines()
    assert table[0] == "class,AP,ATE,ASE,AOE,AVE,AAE" and len(table) == 11
    car = dict(zip(table[0].split(","), table[1 + list(summary["label_aps"]).index("car")].split(",")))
    assert float(car["ATE"]) == pytest.approx(summary["label_tp_errors"]["car"]["trans_err"], abs=1e-3)


def test_a_version_without_val_split_writes_submissions_and_says_why(
    small_twin, stage_workspace, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(small_twin.parent.parent)
    with open(stage_workspace / "val.pkl", "rb") as f:
        data = pickle.load(f)
    data["metadata"]["version"] = "v1.0-test"
    with open(tmp_path / "test.pkl", "wb") as f:
        pickle.dump(data, f)
    params = stage_params(small_twin, "v1.0-test")
    params["evaluate"]["draw_frames"] = 0
    metrics = evaluate(
        params,
        str(tmp_path / "test.pkl"),
        str(stage_workspace / "model.pth"),
        str(tmp_path / "out"),
        str(tmp_path / "evaluate.json"),
        str(tmp_path / "plots"),
    )
    assert metrics == {"frames": SMALL.samples_per_scene}
    assert "v1.0-test has no annotated val split" in capsys.readouterr().out
    assert (tmp_path / "out" / "results_nusc.json").is_file()
    assert (tmp_path / "out" / "results_nusc_tracking.json").is_file()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tracking_threshold", 1.5, "evaluate.tracking_threshold"),
        ("draw_frames", -1, "evaluate.draw_frames"),
        ("draw_score", 0.3, "evaluate.draw_score: unknown key"),
    ],
)
def test_evaluate_settings_are_checked(small_twin, tmp_path, capsys, key, value, message):
    from stages.evaluate import main

    params = stage_params(small_twin)
    params["evaluate"][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", str(tmp_path / "params.yaml")]) == 2
    assert message in capsys.readouterr().err


# ---- pictures -------------------------------------------------------------------------------


def ego_box_in_lidar(info: dict, x: float, y: float, yaw: float = 0.0) -> np.ndarray:
    """A 4 x 2 x 1.6 m box at ego-frame (x, y), in the LiDAR frame as the model writes boxes."""
    rot, trans = Quaternion(info["lidar2ego_rotation"]), np.asarray(info["lidar2ego_translation"])
    centre = rot.inverse.rotate(np.array([x, y, 0.8]) - trans)
    return np.array([*centre, 4.0, 2.0, 1.6, yaw - rot.yaw_pitch_roll[0], 0.0, 0.0])


def changed(image: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """(k, 2) rows and columns of the pixels a drawing changed."""
    return np.argwhere(np.any(image != baseline, axis=-1))


def test_cameras_and_birds_eye_view_sit_as_on_the_car(small_twin, val_infos, monkeypatch):
    monkeypatch.chdir(small_twin.parent.parent)  # image paths are relative to it, as the converter writes them
    info = val_infos[0]
    l2e = (info["lidar2ego_rotation"], info["lidar2ego_translation"])
    no_box = np.zeros((0, 10))
    baseline = pictures.camera_mosaic(info, np.zeros((0, 7)), no_box, [], [])
    height, width = baseline.shape[0] // 2, baseline.shape[1] // 3
    bev_baseline = pictures.birds_eye(np.zeros((0, 7)), no_box, [], 400)
    ego_rows, ego_cols = np.argwhere(np.all(bev_baseline == 187, axis=-1)).T  # the ego car's grey
    ego_row, ego_col = ego_rows.mean(), ego_cols.mean()

    def drawn(x: float, y: float) -> tuple[set, np.ndarray]:
        box = ego_box_in_lidar(info, x, y)[None]
        mosaic = pictures.camera_mosaic(info, np.zeros((0, 7)), box, [(255, 0, 255)], ["#1 car 0.90"])
        tiles = {(int(r // height), int(c // width)) for r, c in changed(mosaic, baseline)}
        bev = pictures.birds_eye(np.zeros((0, 7)), pictures.to_frame(box, *l2e), [(255, 0, 255)], 400)
        return tiles, changed(bev, bev_baseline).mean(axis=0)

    # (row, column) of the tiles: front-left, front, front-right / back-left, back, back-right
    tiles, (row, col) = drawn(15, 0)
    assert tiles == {(0, 1)} and row < ego_row - 20 and abs(col - ego_col) < 5  # ahead: up
    tiles, (row, col) = drawn(-15, 0)
    assert tiles == {(1, 1)} and row > ego_row + 20 and abs(col - ego_col) < 5
    tiles, (row, col) = drawn(8, 12)
    assert tiles == {(0, 0)} and col < ego_col - 20  # front-left: left
    tiles, (row, col) = drawn(-4, -12)
    assert tiles == {(1, 2)} and col > ego_col + 20 and row > ego_row  # back-right: right, down


def test_pictures_of_ground_truth_fed_back(small_twin, val_infos, tmp_path, monkeypatch):
    monkeypatch.chdir(small_twin.parent.parent)
    infos = in_time_order(val_infos)
    results = gt_as_results(infos)
    sub = tracking_submission(results, infos, CLASSES, 0.2)
    gt, pred = scene_tracks(infos, sub["results"])
    # the tracks picture draws the same tracks on both sides when the prediction is the truth
    assert {str(k) for k in gt} == set(pred) and len(gt) >= 10
    assert all(len(gt[int(k)]) == len(v) for k, v in pred.items())
    draw_pictures(infos, np.zeros(len(infos), int), results, sub, CLASSES, str(tmp_path), 2, 0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame_0.png", "frame_1.png", "tracks.png"]


def test_inference_speed_counts_the_model_calls_after_the_warm_up():
    import torch

    from pipeline.evaluate import InferenceTimer

    calls = []
    timer = InferenceTimer(torch.device("cpu"), warmup=2)
    assert timer.fps is None
    for i in range(5):
        assert timer(lambda batch: calls.append(batch) or [batch], i) == [i]
    assert calls == [0, 1, 2, 3, 4] and timer.frames == 3 and timer.fps > 0


def test_fused_conv_bn_keeps_the_outputs(small_twin, stage_workspace, val_infos, tmp_path, monkeypatch):
    """evaluate.fuse_conv_bn folds each BatchNorm into its convolution (the reference's
    benchmark.py --fuse-conv-bn): the val frames' boxes and scores stay within 1e-4 (absolute) plus
    1e-4 (relative). The relative part is float32 rounding, proven in float64: on the seed's torch
    2.1 this model's fused and plain boxes differ by 1.22e-4 (on a value of 1.6) in float32; run in
    float64 they agree to one float32 step of the (float32) output, 1.5e-5, while the plain model's
    own float32 boxes are 1.6e-4 from its float64 ones."""
    import torch

    from pipeline.dataset import collate, dataset_from_params
    from pipeline.evaluate import eval_model, infer

    monkeypatch.chdir(small_twin.parent.parent)
    ckpt = torch.load(stage_workspace / "model.pth", weights_only=False)
    gen = torch.Generator().manual_seed(0)
    for key, value in ckpt["state_dict"].items():  # running statistics other than the initial 0 / 1
        if key.endswith("running_mean"):
            value.normal_(0.0, 0.2, generator=gen)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0, generator=gen)
    params = stage_params(small_twin)
    dataset = dataset_from_params(params, str(stage_workspace / "val.pkl"), training=False, fast_images=False)
    outputs = []
    for fuse in (False, True):
        model = eval_model(ckpt, params["model"], "fp32", torch.device("cpu"), fuse_conv_bn=fuse)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bool(norms) != fuse  # fused: no BatchNorm left
        outputs.append(infer(model, dataset, list(range(len(dataset))), torch.device("cpu"), collate, False))
    plain, fused = outputs
    for idx in plain:
        for key in ("boxes_3d", "scores_3d", "labels_3d", "instance_ids"):
            np.testing.assert_allclose(fused[idx][key], plain[idx][key], atol=1e-4, rtol=1e-4, err_msg=f"{idx} {key}")


def test_a_checkpoint_trained_with_other_model_settings_is_named():
    from pipeline.evaluate import check_trained_settings
    from pipeline.submission import EvaluateError

    trained = {"model": {"embed_dims": 32, "num_decoder": 2, "loss": {"cls_weight": 2.0}}}
    check_trained_settings(trained, {"embed_dims": 32, "num_decoder": 2, "loss": {"cls_weight": 3.0}}, "m.pth")
    check_trained_settings({"state_dict": {}}, {"embed_dims": 256}, "released.pth")  # from elsewhere: no record
    with pytest.raises(
        EvaluateError, match=r"m.pth was trained with other model settings .*model.num_decoder: 2 in training, 6 now"
    ):
        check_trained_settings(trained, {"embed_dims": 32, "num_decoder": 6, "loss": {}}, "m.pth")
