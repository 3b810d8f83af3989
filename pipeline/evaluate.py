"""Inference over the val infos in temporal order, nuScenes detection and tracking submissions,
official metrics, pictures.

Boxes leave the model in the LiDAR frame with Sparse4D's size columns (the devkit's l, w, h);
they go to the nuScenes global frame with (w, l, h) sizes, the reference's default attribute per
class, and the class range filter of the detection config, as the reference's evaluation does.
The tracking submission is the reference's too: the instance bank's ids as tracking ids, the
boxes whose class score reaches the tracking threshold, the seven nuScenes tracking classes;
scored with the devkit's TrackingEval (tracking_nips_2019: AMOTA, AMOTP, MOTA, IDS, ...).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from pyquaternion import Quaternion
from tqdm import tqdm

from pipeline.files import write_bytes_atomic, write_json_atomic
from pipeline.settings import SPLITS

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
# The devkit split each annotated version is scored on (mini_val, val).
EVAL_SETS = {version: val for version, (_, val) in SPLITS.items() if val}
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


def sequence_chunks(flags: np.ndarray, world_size: int) -> list[list[int]]:
    """Split indices into `world_size` contiguous runs at sequence boundaries (temporal order kept)."""
    starts = [0] + [i for i in range(1, len(flags)) if flags[i] != flags[i - 1]] + [len(flags)]
    sequences = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    chunks: list[list[int]] = [[] for _ in range(world_size)]
    per = len(flags) / world_size
    for seq in sequences:
        rank = min(world_size - 1, int(seq[0] / per)) if per else 0
        chunks[rank].extend(seq)
    return chunks


def gather_results(results: dict[int, dict], world_size: int) -> dict[int, dict]:
    """Every process's index -> result, merged (on every process); as given with one process."""
    if world_size == 1:
        return results
    gathered: list = [None] * world_size
    torch.distributed.all_gather_object(gathered, results)
    return {k: v for part in gathered for k, v in part.items()}


# Frames run before the inference speed is timed, as the reference's tools/benchmark.py (num_warmup 5).
WARMUP_FRAMES = 5


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA, NPU), so that a timer around a model call sees it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


class InferenceTimer:
    """Frames per second of the model alone, as the reference's tools/benchmark.py: each model
    call timed between device synchronisations, data loading excluded, the first WARMUP_FRAMES
    frames not counted."""

    def __init__(self, device: torch.device, warmup: int | None = None):
        self.device, self.frames, self.seconds = device, 0, 0.0
        self.warmup = WARMUP_FRAMES if warmup is None else warmup

    def __call__(self, model: torch.nn.Module, batch: dict) -> Any:
        synchronize(self.device)
        start = time.perf_counter()
        out = model(batch)
        synchronize(self.device)
        if self.warmup > 0:
            self.warmup -= 1
        else:
            self.frames += 1
            self.seconds += time.perf_counter() - start
        return out

    @property
    def fps(self) -> float | None:
        return self.frames / self.seconds if self.frames else None


@torch.no_grad()
def infer(
    model: torch.nn.Module,
    dataset: Any,
    indices: list[int],
    device: torch.device,
    collate: Any,
    show_progress: bool = True,
    timer: InferenceTimer | None = None,
) -> dict[int, dict]:
    """Run the model frame by frame in the given (temporal) order; returns index -> result.
    `timer` (optional) times the model calls."""
    model.eval()
    model.head.instance_bank.reset()
    run = timer or (lambda m, b: m(b))
    results = {}
    for idx in tqdm(indices, desc="inference", unit="frame", disable=not show_progress):
        batch = collate([dataset[idx]])
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        results[idx] = {k: v.numpy() for k, v in run(model, batch)[0].items()}
    return results


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


@contextmanager
def devkit_tracking_compat() -> Iterator[None]:
    """nuscenes-devkit 1.2.0 cannot filter a tracking submission without a single box: it reads
    the class field off the first box it finds and raises otherwise. Such a submission (no box
    above the tracking threshold) is valid and scores the devkit's worst values; while this
    context is open, a box-less set reads as tracking boxes. The one compatibility patch."""
    from nuscenes.eval.common import loaders

    original = loaders._get_box_class_field

    def class_field(eval_boxes: Any) -> str:
        if not any(len(boxes) for boxes in eval_boxes.boxes.values()):
            return "tracking_name"
        return original(eval_boxes)

    loaders._get_box_class_field = class_field
    try:
        yield
    finally:
        loaders._get_box_class_field = original


def eval_set_of(version: str) -> str:
    if version not in EVAL_SETS:
        raise EvaluateError(
            f"convert.version: {version} has no annotated val split to evaluate (expected {list(EVAL_SETS)})"
        )
    return EVAL_SETS[version]


def nuscenes_eval(result_path: str, data_root: str, version: str, out_dir: str, plots_dir: str | None = None) -> dict:
    """Official detection metrics (detection_cvpr_2019) on the split matching the version."""
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import NuScenesEval
    from nuscenes.nuscenes import NuScenes

    eval_set = eval_set_of(version)
    nusc = NuScenes(version=version, dataroot=data_root, verbose=False)
    start = time.perf_counter()
    try:
        evaluator = NuScenesEval(
            nusc,
            config=config_factory(DETECTION_CONFIG),
            result_path=result_path,
            eval_set=eval_set,
            output_dir=out_dir,
            verbose=False,
        )
    except AssertionError as err:
        raise EvaluateError(
            f"{result_path}: the results do not cover the samples of the {eval_set} split of {version} ({err})"
        ) from err
    metrics, metric_data = evaluator.evaluate()
    summary = metrics.serialize()
    summary["eval_time_s"] = round(time.perf_counter() - start, 2)
    write_devkit_files(out_dir, summary, evaluator.meta, metric_data.serialize())
    if plots_dir is not None:
        render_pr_curves(evaluator, metrics, metric_data, plots_dir)
        cfg = evaluator.cfg
        pr_curve_tables(metric_data, list(cfg.class_names), list(cfg.dist_ths), os.path.join(out_dir, "pr"))
    return summary


def tracking_eval(result_path: str, data_root: str, version: str, out_dir: str) -> dict:
    """Official tracking metrics (tracking_nips_2019: AMOTA, AMOTP, MOTA, IDS, ...) on the split
    matching the version, as the reference's TrackingEval call; the devkit's serialized summary."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.tracking.evaluate import TrackingEval

    eval_set = eval_set_of(version)
    start = time.perf_counter()
    with devkit_tracking_compat():
        try:
            evaluator = TrackingEval(
                config=config_factory(TRACKING_CONFIG),
                result_path=result_path,
                eval_set=eval_set,
                output_dir=out_dir,
                nusc_version=version,
                nusc_dataroot=data_root,
                verbose=False,
            )
        except AssertionError as err:
            raise EvaluateError(
                f"{result_path}: the tracking results do not cover the samples of the {eval_set} split of {version} ({err})"
            ) from err
        metrics, metric_data = evaluator.evaluate()
    summary = metrics.serialize()
    summary["eval_time_s"] = round(time.perf_counter() - start, 2)
    write_devkit_files(out_dir, summary, evaluator.meta, metric_data.serialize())
    return summary


def write_devkit_files(out_dir: str, summary: dict, meta: dict, details: dict) -> None:
    """The files the devkit's own `main` writes: metrics_summary.json (the summary and the
    submission's meta) and metrics_details.json (per class and threshold)."""
    write_json_atomic(os.path.join(out_dir, "metrics_summary.json"), {**summary, "meta": dict(meta)})
    write_json_atomic(os.path.join(out_dir, "metrics_details.json"), details)


TP_ERRORS = (("ATE", "trans_err"), ("ASE", "scale_err"), ("AOE", "orient_err"), ("AVE", "vel_err"), ("AAE", "attr_err"))


def per_class_tp_table(summary: dict) -> list[list[str]]:
    """The devkit's per-class table (its `main` prints it): class, AP (mean over the distance
    thresholds) and the five true-positive errors, as rows of text; the header first."""
    rows = [["class", "AP", *(name for name, _ in TP_ERRORS)]]
    for cls, aps in summary["label_aps"].items():
        errors = summary["label_tp_errors"][cls]
        rows.append([cls, f"{np.mean(list(aps.values())):.3f}", *(f"{errors[key]:.3f}" for _, key in TP_ERRORS)])
    return rows


def render_pr_curves(evaluator: Any, metrics: Any, metric_data: Any, plots_dir: str) -> None:
    """The devkit's summary and per-class precision/recall curves, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    from nuscenes.eval.detection.render import class_pr_curve, summary_plot

    cfg = evaluator.cfg
    Path(plots_dir).mkdir(parents=True, exist_ok=True)
    summary_plot(
        metric_data,
        metrics,
        cfg.min_precision,
        cfg.min_recall,
        cfg.dist_th_tp,
        savepath=os.path.join(plots_dir, "pr_summary.png"),
    )
    for name in cfg.class_names:
        class_pr_curve(
            metric_data,
            metrics,
            name,
            cfg.min_precision,
            cfg.min_recall,
            savepath=os.path.join(plots_dir, f"pr_{name}.png"),
        )


def pr_curve_tables(metric_data: Any, classes: list[str], dist_ths: list[float], folder: str) -> None:
    """The devkit's precision/recall curves as data for `dvc plots` (pr_* in dvc.yaml): one CSV
    per distance threshold, folder/dist_<th>m.csv, a recall column and one precision column per
    class (the devkit interpolates every curve onto the same 101 recall points)."""
    for th in dist_ths:
        recall = np.asarray(metric_data[(classes[0], th)].recall)
        columns = {name: np.asarray(metric_data[(name, th)].precision) for name in classes}
        lines = [",".join(["recall", *classes])]
        for i, r in enumerate(recall):
            lines.append(",".join([f"{r:.4f}", *(f"{columns[n][i]:.4f}" for n in classes)]))
        write_bytes_atomic(os.path.join(folder, f"dist_{th:g}m.csv"), ("\n".join(lines) + "\n").encode())


def flat_metrics(summary: dict) -> dict:
    ap = {name: round(float(np.mean(list(v.values()))), 4) for name, v in summary["label_aps"].items()}
    tp = summary["tp_errors"]
    return {
        "mAP": round(summary["mean_ap"], 4),
        "NDS": round(summary["nd_score"], 4),
        "mATE": round(tp["trans_err"], 4),
        "mASE": round(tp["scale_err"], 4),
        "mAOE": round(tp["orient_err"], 4),
        "mAVE": round(tp["vel_err"], 4),
        "mAAE": round(tp["attr_err"], 4),
        "per_class_AP": ap,
        "eval_time_s": summary["eval_time_s"],
    }


def validate(
    model: torch.nn.Module,
    dataset: Any,
    data_root: str,
    version: str,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> dict | None:
    """Detection metrics (flat_metrics) of `model` on a val `dataset` (test mode, temporal order),
    for validation during training: every rank infers its run of whole sequences; rank 0 writes
    the submission and runs the devkit in a temporary folder, removed afterwards, and returns the
    metrics; the other ranks return None. Leaves the model in eval mode with an empty instance
    bank: the caller restores what it needs."""
    import shutil
    import tempfile

    from pipeline.dataset import collate

    results = infer(model, dataset, sequence_chunks(dataset.flag, world_size)[rank], device, collate, False)
    results = gather_results(results, world_size)
    if rank != 0:
        return None
    folder = tempfile.mkdtemp(prefix="sparse4d-val-")
    try:
        result_path = os.path.join(folder, "results_nusc.json")
        write_results(result_path, submission(results, dataset.data_infos, list(dataset.classes)))
        return flat_metrics(nuscenes_eval(result_path, data_root, version, os.path.join(folder, "eval")))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def flat_tracking_metrics(summary: dict) -> dict:
    """The devkit's tracking summary -> AMOTA, AMOTP, MOTA, RECALL, IDS, FRAG, per-class AMOTA.
    A metric the devkit leaves undefined (nan: no ground truth of a class, no recall threshold
    reached) is left out rather than written as a non-number."""
    out: dict[str, Any] = {}
    for key, name in (("AMOTA", "amota"), ("AMOTP", "amotp"), ("MOTA", "mota"), ("RECALL", "recall")):
        if np.isfinite(summary[name]):
            out[key] = round(float(summary[name]), 4)
    for key, name in (("IDS", "ids"), ("FRAG", "frag")):
        if np.isfinite(summary[name]):
            out[key] = int(summary[name])
    out["per_class_AMOTA"] = {
        name: round(float(v), 4) for name, v in summary["label_metrics"]["amota"].items() if np.isfinite(v)
    }
    out["tracking_eval_time_s"] = summary["eval_time_s"]
    return out


def per_class_chart(ap: dict[str, float], amota: dict[str, float], path: str) -> None:
    """Per-class detection AP beside per-class tracking AMOTA (tracking classes only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    names = list(ap)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [ap[n] for n in names], width=0.4, color="tab:blue", label="AP (detection)")
    ax.bar(
        x[[i for i, n in enumerate(names) if n in amota]] + 0.2,
        [amota[n] for n in names if n in amota],
        width=0.4,
        color="tab:orange",
        label="AMOTA (tracking)",
    )
    ax.set_xticks(x, names, rotation=35)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("per class: AP (mean over distance thresholds) and AMOTA (nuScenes tracking classes)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def per_class_tp_picture(table: list[list[str]], path: str) -> None:
    """The devkit's per-class table (per_class_tp_table) drawn as a picture for `dvc plots show`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(table) + 0.6))
    ax.axis("off")
    cells = ax.table(cellText=table[1:], colLabels=table[0], loc="center", cellLoc="right", colLoc="right")
    cells.auto_set_font_size(False)
    cells.set_fontsize(9)
    ax.set_title(
        "per class: AP and true-positive errors (the devkit's table; nan: no such box in the split)", fontsize=9
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def per_class_table(ap: dict[str, float], amota: dict[str, float], folder: str) -> None:
    """The per-class chart's numbers as data for `dvc plots` (the bar charts per_class_ap and
    per_class_amota in dvc.yaml): folder/per_class_ap.csv (class, AP: mean over the distance
    thresholds, every class) and folder/per_class_amota.csv (class, AMOTA: the tracking classes
    the devkit scored)."""
    for name, values in (("AP", ap), ("AMOTA", amota)):
        lines = [f"class,{name}", *(f"{cls},{value:.4f}" for cls, value in values.items())]
        write_bytes_atomic(os.path.join(folder, f"per_class_{name.lower()}.csv"), ("\n".join(lines) + "\n").encode())


def global_box(translation: list, size_wlh: list, rotation: list) -> np.ndarray:
    """A devkit box (centre, w l h, quaternion) -> (7,) x, y, z, l, w, h, yaw."""
    w, length, h = size_wlh
    return np.array([*translation, length, w, h, Quaternion(rotation).yaw_pitch_roll[0]], np.float64)


def scene_tracks(infos: list[dict], track_results: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Ground-truth and predicted tracks of the frames `infos` (one scene), global frame:
    track id -> [(frame, (7,) box)]. Ground truth as the tracking evaluation sees it: tracking
    classes, inside their range, with LiDAR points."""
    from nuscenes.eval.common.config import config_factory

    class_range = config_factory(DETECTION_CONFIG).class_range
    names = list(config_factory(TRACKING_CONFIG).tracking_names)
    gt: dict[int, list] = {}
    pred: dict[str, list] = {}
    for frame, info in enumerate(infos):
        keep = np.array([n in names for n in info["gt_names"]], bool) & (info["num_lidar_pts"] > 0)
        labels = np.array([names.index(n) for n in info["gt_names"][keep]], np.int64)
        for row, _, nb in boxes_to_global(info, info["gt_boxes"][keep], labels, names, class_range):
            box = global_box(nb.center, nb.wlh, nb.orientation.elements)
            gt.setdefault(int(info["instance_inds"][keep][row]), []).append((frame, box))
        for t in track_results.get(info["token"], []):
            pred.setdefault(t["tracking_id"], []).append(
                (frame, global_box(t["translation"], t["size"], t["rotation"]))
            )
    return gt, pred


def draw_pictures(
    infos: list[dict],
    scene_flags: np.ndarray,
    results: dict[int, dict],
    track_sub: dict,
    classes: list[str],
    plots_dir: str,
    frames: int,
    score_threshold: float,
) -> None:
    """`frames` frames spread over the split (cameras + bird's-eye view), and the tracks of the
    first scene of the split (`scene_flags`: one scene number per info, temporal order)."""
    from pipeline import pictures

    picks = sorted({int(i) for i in np.linspace(0, len(infos) - 1, frames)}) if frames > 0 and infos else []
    for n, idx in enumerate(i for i in picks if i in results):
        info = infos[idx]
        title = f"frame {idx + 1}/{len(infos)}, sample {info['token'][:8]}"
        pictures.draw_frame(
            info, results[idx], classes, score_threshold, os.path.join(plots_dir, f"frame_{n}.png"), title
        )
    if infos and "gt_boxes" in infos[0]:
        scene = [info for info, flag in zip(infos, scene_flags) if flag == scene_flags[0]]
        gt, pred = scene_tracks(scene, track_sub["results"])
        title = f"tracks of the first scene of the split (frames 1-{len(scene)} of {len(infos)})"
        pictures.draw_tracks(scene, gt, pred, os.path.join(plots_dir, "tracks.png"), title)


def write_results(path: str, sub: dict) -> None:
    write_bytes_atomic(path, json.dumps(sub).encode())


def load_checkpoint(path: str, infos_path: str, version: str) -> dict:
    """The checkpoint to score, after checking that it and the val infos (of `version`) exist."""
    import pickle

    if not Path(path).is_file():
        raise EvaluateError(f"{path}: checkpoint not found (train first, or set evaluate.checkpoint)")
    if not Path(infos_path).is_file():
        raise EvaluateError(f"{infos_path}: info pkl not found (run the convert stage)")
    with open(infos_path, "rb") as f:
        meta = pickle.load(f)["metadata"]
    if meta.get("version") != version:
        raise EvaluateError(f"{infos_path} was converted from {meta.get('version')}, but convert.version is {version}")
    return torch.load(path, map_location="cpu", weights_only=False)


# model settings that only shape training (losses, matching): a checkpoint trained with other
# values is still this model
TRAINING_ONLY_MODEL_KEYS = ("loss", "matching")


def check_trained_settings(ckpt: dict, model_params: dict, path: str) -> None:
    """A checkpoint trained here records its `model` settings: scoring it under other ones (the
    network's shape, its classes, its post-processing) is an error naming them. A checkpoint
    from elsewhere (the released weights) records none and is not checked."""
    trained = ckpt.get("model")
    if not isinstance(trained, dict):
        return
    differ = sorted(
        k
        for k in set(trained) | set(model_params)
        if k not in TRAINING_ONLY_MODEL_KEYS and trained.get(k) != model_params.get(k)
    )
    if differ:
        shown = ", ".join(f"model.{k}: {trained.get(k)!r} in training, {model_params.get(k)!r} now" for k in differ)
        raise EvaluateError(f"{path} was trained with other model settings than params has: {shown}")


def eval_model(
    ckpt: dict, model_params: dict, precision: str, device: torch.device, fuse_conv_bn: bool = False
) -> torch.nn.Module:
    """The checkpoint's model on `device`, its image features in the evaluation precision
    (`auto`: fp16 on NPU and CUDA as the reference's test script, fp32 on CPU); with
    fuse_conv_bn, each BatchNorm folded into the convolution before it (mmcv's fuse_conv_bn, the
    reference's tools/benchmark.py --fuse-conv-bn): the same outputs to about 1e-5, fewer passes."""
    from model import build_model
    from pipeline.devices import amp_dtype

    state = ckpt.get("state_dict", ckpt)
    anchor = state["head.instance_bank.anchor"].numpy()
    model = build_model(dict(model_params), anchor).to(device)
    model.load_state_dict(state, strict=True)
    model.eval()
    if fuse_conv_bn:
        from mmcv.cnn import fuse_conv_bn as fuse

        fuse(model)
    if precision == "auto":
        precision = "fp16" if device.type in ("cuda", "npu") else "fp32"
    model.set_mixed_precision(amp_dtype(device, precision))
    if device.type == "cpu":
        model.use_channels_last()
    return model


def score(result_path: str, track_path: str, cp: dict, out: Path, plots_dir: str, metrics: dict) -> list[str]:
    """Official detection and tracking metrics of the two submissions into `metrics`, the
    per-class chart and tables; returns log lines."""
    summary = nuscenes_eval(result_path, cp["data_root"], cp["version"], str(out / "nuscenes_eval"), plots_dir)
    metrics.update(flat_metrics(summary))
    table = per_class_tp_table(summary)
    write_bytes_atomic(str(out / "per_class_tp_errors.csv"), "".join(",".join(r) + "\n" for r in table).encode())
    track_summary = tracking_eval(track_path, cp["data_root"], cp["version"], str(out / "nuscenes_tracking_eval"))
    metrics.update(flat_tracking_metrics(track_summary))
    log = [
        f"detection evaluation: {summary['eval_time_s']:.1f} s",
        f"tracking evaluation: {track_summary['eval_time_s']:.1f} s",
        "per class (nan: no such box in the split):",
        *("  ".join(f"{cell:>20s}" if i == 0 else f"{cell:>6s}" for i, cell in enumerate(row)) for row in table),
    ]
    undefined = [k for k in ("AMOTA", "AMOTP", "MOTA", "RECALL", "IDS", "FRAG") if k not in metrics]
    if undefined:
        log.append(f"tracking metrics the devkit leaves undefined (no track reached a recall threshold): {undefined}")
    per_class_chart(metrics["per_class_AP"], metrics["per_class_AMOTA"], os.path.join(plots_dir, "per_class_ap.png"))
    per_class_tp_picture(table, os.path.join(plots_dir, "per_class_tp_errors.png"))
    # the same numbers as data, in the cached output (dvc plots diff compares them across runs)
    per_class_table(metrics["per_class_AP"], metrics["per_class_AMOTA"], str(out))
    return log


def evaluate(params: dict, infos_path: str, checkpoint: str, out_dir: str, metrics_path: str, plots_dir: str) -> dict:
    """The evaluate stage: checkpoint -> detection and tracking results json -> metrics, pictures.
    A version without an annotated split (v1.0-test) gets the two submissions and no metrics."""
    from pipeline.dataset import Sparse4DDataset, collate
    from pipeline.devices import init_distributed, resolve_device

    ep, mp, dp, cp = params["evaluate"], params["model"], params["data"], params["convert"]
    ckpt_path = str(checkpoint)  # exactly the checkpoint given (the stage: --checkpoint or evaluate.checkpoint)
    ckpt = load_checkpoint(ckpt_path, infos_path, cp["version"])
    check_trained_settings(ckpt, mp, ckpt_path)
    dist = init_distributed(resolve_device(str(ep["device"])))
    model = eval_model(ckpt, mp, str(ep["precision"]), dist.device, bool(ep["fuse_conv_bn"]))
    # the fast image path only for a checkpoint trained on it here (data.fast_images); any other, e.g. the
    # released weights, is evaluated on the reference's exact images
    fast_images = bool(dp["fast_images"]) and bool(ckpt.get("fast_images", False))
    dataset = Sparse4DDataset(
        infos_path,
        classes=list(mp["classes"]),
        data_aug_conf=dict(dp["aug"]),
        test_mode=True,
        fast_images=fast_images,
        with_seq_flag=True,
        sequences_split_num=1,
        keep_consistent_seq_aug=False,
    )
    chunks = sequence_chunks(dataset.flag, dist.world_size)
    start = time.perf_counter()
    timer = InferenceTimer(dist.device)
    results = infer(model, dataset, chunks[dist.rank], dist.device, collate, show_progress=dist.main, timer=timer)
    results = gather_results(results, dist.world_size)
    if not dist.main:
        return {}
    inference_s = time.perf_counter() - start
    infos, classes = dataset.data_infos, list(mp["classes"])
    out = Path(out_dir)
    result_path = str(out / "results_nusc.json")
    write_results(result_path, submission(results, infos, classes))
    track_sub = tracking_submission(results, infos, classes, float(ep["tracking_threshold"]))
    track_path = str(out / "results_nusc_tracking.json")
    write_results(track_path, track_sub)
    metrics: dict[str, Any] = {"frames": len(results)}
    trained = f", trained {ckpt['iteration']} iterations" if "iteration" in ckpt else ""
    log = [f"{ckpt_path}{trained}: inference over {len(results)} frames: {inference_s:.1f} s"]
    if timer.fps is not None:  # rank 0's model calls: frames per second of one device
        metrics["fps"] = round(timer.fps, 3)
        log.append(f"{metrics['fps']} frames per second (the model alone, one device, after {WARMUP_FRAMES} frames)")
    if cp["version"] in EVAL_SETS:
        log += score(result_path, track_path, cp, out, plots_dir, metrics)
    else:
        log.append(
            f"convert.version {cp['version']} has no annotated val split: detection and tracking were not "
            f"evaluated (no mAP/NDS/AMOTA in {metrics_path}); the submissions are {result_path} and {track_path}"
        )
    start = time.perf_counter()
    frames, score_threshold = int(ep["draw_frames"]), float(ep["draw_score_threshold"])
    draw_pictures(infos, dataset.flag, results, track_sub, classes, plots_dir, frames, score_threshold)
    log.append(f"pictures: {time.perf_counter() - start:.1f} s")
    write_json_atomic(metrics_path, metrics)
    for line in log:
        print(f"evaluate: {line}", flush=True)
    return metrics


def worker_main(params_path: str, infos: str, checkpoint: str, out_dir: str, metrics_path: str, plots_dir: str) -> int:
    """Entry point of each evaluation process."""
    import sys

    from pipeline.dataset import DatasetError
    from pipeline.params import ParamsError, read_params

    try:
        params = read_params(params_path)  # checked in each process, not only by the stage
        evaluate(params, infos, checkpoint, out_dir, metrics_path, plots_dir)
    except (EvaluateError, DatasetError, ParamsError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser()
    for name in ("params", "infos", "checkpoint", "out", "metrics", "plots"):
        parser.add_argument(f"--{name}", required=True)
    a = parser.parse_args()
    sys.exit(worker_main(a.params, a.infos, a.checkpoint, a.out, a.metrics, a.plots))
