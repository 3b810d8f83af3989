"""Inference over the val infos in temporal order, nuScenes submission, official metrics, pictures.

Boxes leave the model in the LiDAR frame with Sparse4D's size columns (the devkit's l, w, h);
they go to the nuScenes global frame with (w, l, h) sizes, the reference's default attribute per
class, and the class range filter of the detection config, as the reference's evaluation does.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyquaternion import Quaternion
from tqdm import tqdm

from pipeline.params import write_bytes_atomic, write_json_atomic

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
EVAL_SETS = {"v1.0-mini": "mini_val", "v1.0-trainval": "val"}


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


def lidar_boxes_to_global(
    info: dict,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    class_range: dict[str, float],
) -> list[dict]:
    """(n, >=9) LiDAR-frame boxes x, y, z, [l, w, h], yaw, vx, vy -> nuScenes detection dicts."""
    from nuscenes.utils.data_classes import Box

    l2e_r, l2e_t = Quaternion(info["lidar2ego_rotation"]), np.asarray(info["lidar2ego_translation"])
    e2g_r, e2g_t = Quaternion(info["ego2global_rotation"]), np.asarray(info["ego2global_translation"])
    out = []
    for box, label, score in zip(boxes, labels, scores):
        name = classes[int(label)]
        nb = Box(
            box[:3], box[[4, 3, 5]], Quaternion(axis=[0, 0, 1], radians=float(box[6])), velocity=(box[7], box[8], 0.0)
        )
        nb.rotate(l2e_r)
        nb.translate(l2e_t)
        if np.linalg.norm(nb.center[:2]) > class_range[name]:
            continue  # outside the evaluated range of its class (in the ego frame)
        nb.rotate(e2g_r)
        nb.translate(e2g_t)
        out.append(
            {
                "sample_token": info["token"],
                "translation": nb.center.tolist(),
                "size": nb.wlh.tolist(),
                "rotation": nb.orientation.elements.tolist(),
                "velocity": nb.velocity[:2].tolist(),
                "detection_name": name,
                "detection_score": float(score),
                "attribute_name": attribute_for(name, nb.velocity),
            }
        )
    return out


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


@torch.no_grad()
def infer(
    model: torch.nn.Module,
    dataset: Any,
    indices: list[int],
    device: torch.device,
    collate: Any,
    show_progress: bool = True,
) -> dict[int, dict]:
    """Run the model frame by frame in the given (temporal) order; returns index -> result."""
    model.eval()
    model.head.instance_bank.reset()
    results = {}
    for idx in tqdm(indices, desc="inference", unit="frame", disable=not show_progress):
        batch = collate([dataset[idx]])
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        results[idx] = {k: v.numpy() for k, v in model(batch)[0].items()}
    return results


def submission(
    results: dict[int, dict], infos: list[dict], classes: list[str], eval_version: str = "detection_cvpr_2019"
) -> dict:
    from nuscenes.eval.detection.config import config_factory

    class_range = config_factory(eval_version).class_range
    out = {}
    for idx, info in enumerate(infos):
        r = results.get(idx)
        if r is None:
            out[info["token"]] = []
            continue
        out[info["token"]] = lidar_boxes_to_global(
            info, r["boxes_3d"], r["labels_3d"], r["scores_3d"], classes, class_range
        )
    return {
        "meta": {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False},
        "results": out,
    }


def nuscenes_eval(result_path: str, data_root: str, version: str, out_dir: str, plots_dir: str | None = None) -> dict:
    """Official detection metrics (detection_cvpr_2019) on the split matching the version."""
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import NuScenesEval
    from nuscenes.nuscenes import NuScenes

    if version not in EVAL_SETS:
        raise EvaluateError(
            f"convert.version: {version} has no annotated val split to evaluate (expected {list(EVAL_SETS)})"
        )
    eval_set = EVAL_SETS[version]
    nusc = NuScenes(version=version, dataroot=data_root, verbose=False)
    start = time.perf_counter()
    try:
        evaluator = NuScenesEval(
            nusc,
            config=config_factory("detection_cvpr_2019"),
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
    if plots_dir is not None:
        render_pr_curves(evaluator, metrics, metric_data, plots_dir)
    return summary


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


def ap_bar_chart(per_class: dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = list(per_class)
    ax.bar(names, [per_class[n] for n in names], color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP")
    ax.set_title("per-class AP (nuScenes detection, mean over distance thresholds)")
    ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw_frames(
    infos: list[dict],
    results: dict[int, dict],
    classes: list[str],
    out_dir: str,
    count: int = 3,
    score_threshold: float = 0.3,
) -> None:
    """Predicted (red) and ground-truth (green) boxes on the 6 camera images and in bird's-eye view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nuscenes.utils.data_classes import Box
    from PIL import Image

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    picks = [i for i in np.linspace(0, len(infos) - 1, count).astype(int) if i in results]
    for n, idx in enumerate(picks):
        info, r = infos[idx], results[idx]
        keep = r["scores_3d"] >= score_threshold
        pred = [Box(b[:3], b[[4, 3, 5]], Quaternion(axis=[0, 0, 1], radians=float(b[6]))) for b in r["boxes_3d"][keep]]
        gt = [
            Box(b[:3], b[[4, 3, 5]], Quaternion(axis=[0, 0, 1], radians=float(b[6])))
            for b in info.get("gt_boxes", np.zeros((0, 7)))
        ]
        fig = plt.figure(figsize=(16, 6))
        for c, (cam, cam_info) in enumerate(info["cams"].items()):
            ax = fig.add_subplot(2, 4, c + 1 + (c >= 3))
            img = Image.open(cam_info["data_path"])
            ax.imshow(img)
            r_l2c = np.linalg.inv(cam_info["sensor2lidar_rotation"])
            t_l2c = -r_l2c @ cam_info["sensor2lidar_translation"]
            for boxes, color in ((gt, "lime"), (pred, "red")):
                for box in boxes:
                    b = box.copy()
                    b.rotate(Quaternion(matrix=r_l2c, atol=1e-6))
                    b.translate(t_l2c)
                    if b.corners()[2].min() < 0.5:
                        continue  # (partly) behind the camera: its projection would be meaningless
                    b.render(
                        ax,
                        view=np.asarray(cam_info["cam_intrinsic"]),
                        normalize=True,
                        colors=(color, color, color),
                        linewidth=1,
                    )
            ax.set_xlim(0, img.width)
            ax.set_ylim(img.height, 0)
            ax.set_title(cam, fontsize=8)
            ax.axis("off")
        ax = fig.add_subplot(1, 4, 4)
        for boxes, color in ((gt, "lime"), (pred, "red")):
            for box in boxes:
                corners = box.bottom_corners()[:2]
                ax.plot(np.r_[corners[0], corners[0, :1]], np.r_[corners[1], corners[1, :1]], color=color, linewidth=1)
        ax.set_xlim(-55, 55)
        ax.set_ylim(-55, 55)
        ax.set_aspect("equal")
        ax.set_title("bird's-eye view (LiDAR frame): ground truth green, predictions red", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"frame_{n}.png"), dpi=60)
        plt.close(fig)


def write_results(path: str, sub: dict) -> None:
    write_bytes_atomic(path, json.dumps(sub).encode())


def evaluate(params: dict, infos_path: str, checkpoint: str, out_dir: str, metrics_path: str, plots_dir: str) -> dict:
    """The evaluate stage: checkpoint -> results json -> metrics and pictures."""
    import pickle

    from model import build_model
    from pipeline.dataset import Sparse4DDataset, collate
    from pipeline.devices import init_distributed, resolve_device

    ep, mp, dp, cp = params["evaluate"], params["model"], params["data"], params["convert"]
    if cp["version"] not in EVAL_SETS:
        raise EvaluateError(f"convert.version: {cp['version']} has no annotated val split (expected {list(EVAL_SETS)})")
    ckpt_path = str(ep.get("checkpoint") or checkpoint)
    if not Path(ckpt_path).is_file():
        raise EvaluateError(f"{ckpt_path}: checkpoint not found (train first, or set evaluate.checkpoint)")
    if not Path(infos_path).is_file():
        raise EvaluateError(f"{infos_path}: val info pkl not found (run the convert stage)")
    with open(infos_path, "rb") as f:
        meta = pickle.load(f)["metadata"]
    if meta.get("version") != cp["version"]:
        raise EvaluateError(
            f"{infos_path} was converted from {meta.get('version')}, but convert.version is {cp['version']}"
        )
    dist = init_distributed(resolve_device(str(ep["device"])))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt)
    anchor = state["head.instance_bank.anchor"].numpy()
    model = build_model(dict(mp), anchor).to(dist.device)
    model.load_state_dict(state, strict=True)
    if dist.device.type == "cpu":
        model.use_channels_last()
    dataset = Sparse4DDataset(
        infos_path,
        classes=list(mp["classes"]),
        data_aug_conf=dict(dp["aug"]),
        test_mode=True,
        with_seq_flag=True,
        sequences_split_num=1,
        keep_consistent_seq_aug=False,
    )
    chunks = sequence_chunks(dataset.flag, dist.world_size)
    results = infer(model, dataset, chunks[dist.rank], dist.device, collate, show_progress=dist.main)
    if dist.world_size > 1:
        gathered: list = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    if not dist.main:
        return {}
    infos = dataset.data_infos
    sub = submission(results, infos, list(mp["classes"]))
    out = Path(out_dir)
    result_path = str(out / "results_nusc.json")
    write_results(result_path, sub)
    summary = nuscenes_eval(result_path, cp["data_root"], cp["version"], str(out / "nuscenes_eval"), plots_dir)
    metrics = flat_metrics(summary)
    metrics["tracking"] = "skipped: install motmetrics for AMOTA/AMOTP"
    ap_bar_chart(metrics["per_class_AP"], os.path.join(plots_dir, "per_class_ap.png"))
    draw_frames(infos, results, list(mp["classes"]), plots_dir)
    write_json_atomic(metrics_path, metrics)
    return metrics


def worker_main(params_path: str, infos: str, checkpoint: str, out_dir: str, metrics_path: str, plots_dir: str) -> int:
    """Entry point of each evaluation process."""
    import sys

    import yaml

    from pipeline.dataset import DatasetError

    with open(params_path) as f:
        params = yaml.safe_load(f)
    try:
        evaluate(params, infos, checkpoint, out_dir, metrics_path, plots_dir)
    except (EvaluateError, DatasetError) as err:
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
