"""Scoring with the official nuScenes devkit: detection (detection_cvpr_2019: mAP, NDS, TP errors)
and tracking (tracking_nips_2019: AMOTA, AMOTP, MOTA, IDS, ...), the devkit's own output files,
and the tables and charts of the evaluate stage (per-class AP and AMOTA, PR curves, TP errors).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.files import write_bytes_atomic, write_json_atomic
from pipeline.settings import SPLITS
from pipeline.submission import DETECTION_CONFIG, TRACKING_CONFIG, EvaluateError

# The devkit split each annotated version is scored on (mini_val, val).
EVAL_SETS = {version: val for version, (_, val) in SPLITS.items() if val}


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


def score(result_path: str, track_path: str, dataset: dict, out: Path, plots_dir: str, metrics: dict) -> list[str]:
    """Official detection and tracking metrics of the two submissions into `metrics`, the
    per-class chart and tables; returns log lines."""
    summary = nuscenes_eval(
        result_path, dataset["data_root"], dataset["version"], str(out / "nuscenes_eval"), plots_dir
    )
    metrics.update(flat_metrics(summary))
    table = per_class_tp_table(summary)
    write_bytes_atomic(str(out / "per_class_tp_errors.csv"), "".join(",".join(r) + "\n" for r in table).encode())
    track_summary = tracking_eval(
        track_path, dataset["data_root"], dataset["version"], str(out / "nuscenes_tracking_eval")
    )
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
