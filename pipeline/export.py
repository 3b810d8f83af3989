"""The export stage: the scored checkpoint as an ONNX graph (`model.export.InferenceStep`: one
frame, the instance bank's state as inputs and outputs), checked in onnxruntime against the eager
PyTorch model over the first val frames in temporal order.

The check runs each frame in onnxruntime from PyTorch's instance-bank state after the frame before,
so that every frame tests the graph's own step (run on its own state, float rounding compounds
through the carried instances, and an undertrained model's near-equal scores then pick other
instances). Per frame: the same set of tracking ids; per id the same label and box within
`export.tolerance`, the sorted scores and class scores too, and the instances kept for the next
frame (anchors, features, confidences, ids) as PyTorch keeps them, for every instance that either
side scores at least `export.min_score` (below it a near-tie in the bank's selections may give an
id to another instance: counted in the metrics, not failed). A graph that fails is not written:
the stage stops with the frame and the difference, and leaves the previous outputs as they were.

Then onnxruntime runs the frames again on its own state, as a deployment would: that run is timed
(`onnxruntime_fps`) and its distance from PyTorch reported (`max_abs_diff_boxes_own_state`).
"""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from tqdm import tqdm

from model.export import INPUTS, OUTPUTS, InferenceStep
from pipeline.files import atomic_directory, write_json_atomic


class ExportCheckError(RuntimeError):
    """The exported graph does not compute what the PyTorch model does."""


def frame_inputs(batch: dict, previous: dict | None) -> Dict[str, torch.Tensor]:
    """The per-frame inputs of InferenceStep from a collated batch of one frame and the previous
    frame's batch (None on the first frame), computed as the eager instance bank does."""
    if previous is None:
        temp2cur = torch.eye(4)[None]
        time_interval = torch.zeros(1)
    else:
        temp2cur = torch.from_numpy(
            np.stack(
                [cur["T_global_inv"] @ prev["T_global"] for cur, prev in zip(batch["img_metas"], previous["img_metas"])]
            )
        ).float()
        time_interval = (batch["timestamp"] - previous["timestamp"]).float()
    return {
        "img": batch["img"].float().contiguous(),
        "projection_mat": batch["projection_mat"].float(),
        "image_wh": batch["image_wh"].float(),
        "temp2cur": temp2cur,
        "time_interval": time_interval,
    }


def next_state(outputs: List[Any]) -> Dict[str, Any]:
    """The state inputs of the next frame from a frame's outputs (tensors or numpy arrays)."""
    named = dict(zip([name for name, *_ in OUTPUTS], outputs))
    first = named["next_anchor"]
    ones = torch.ones(first.shape[0], dtype=torch.bool)
    return {
        "has_history": ones if isinstance(first, torch.Tensor) else ones.numpy(),
        "cached_anchor": named["next_anchor"],
        "cached_feature": named["next_feature"],
        "cached_confidence": named["next_confidence"],
        "cached_id": named["next_id"],
        "prev_id": named["next_prev_id"],
    }


def eager_state(bank: Any) -> Dict[str, np.ndarray]:
    """The eager instance bank's state after a frame, as the graph's state inputs of the next one."""
    return {
        "has_history": np.ones(bank.cached_anchor.shape[0], bool),
        "cached_anchor": bank.cached_anchor.numpy(),
        "cached_feature": bank.cached_feature.numpy(),
        "cached_confidence": bank.confidence.numpy(),
        "cached_id": bank.instance_id[:, : bank.num_temp_instances].numpy(),
        "prev_id": np.array([bank.prev_id], np.int64),
    }


def _exceeds(frame: int, what: str, diff: float, tolerance: float) -> None:
    if not diff <= tolerance:
        raise ExportCheckError(
            f"val frame {frame}: onnxruntime's {what} differ from PyTorch's by {diff:.3g} (export.tolerance {tolerance:g})"
        )


def compare(
    frame: int, eager: dict, onnx: Dict[str, np.ndarray], tolerance: float, min_score: float
) -> Tuple[Dict[str, float], int, int]:
    """One frame's eager result (BoxPostProcessor.decode's dict) against the graph's outputs of
    sample 0. The tracking ids must be the same set. Per id, the label and box must be the same
    (within `tolerance`) wherever either side scores the instance at least `min_score`; so must the
    sorted scores and class scores. Below it, a near-tie in the instance bank's selections may give
    an id to another instance on one side: such rows are counted, not failed. Boxes are matched by
    id, not by rank (two nearly equal scores may swap places). Returns the largest differences
    over the checked rows, their number, and the number of low-score rows that differ."""
    ids = onnx["instance_ids"][0]
    if sorted(ids.tolist()) != sorted(eager["instance_ids"].tolist()):
        missing = sorted(set(eager["instance_ids"].tolist()) ^ set(ids.tolist()))[:10]
        raise ExportCheckError(
            f"val frame {frame}: onnxruntime and PyTorch give different tracking ids (e.g. {missing})"
        )
    if len(set(ids.tolist())) != len(ids):
        raise ExportCheckError(f"val frame {frame}: onnxruntime gives one tracking id twice")
    row = {int(i): r for r, i in enumerate(eager["instance_ids"])}
    order = np.array([row[int(i)] for i in ids])
    checked = np.maximum(onnx["scores"][0], eager["scores_3d"][order]) >= min_score
    other_label = onnx["labels"][0] != eager["labels_3d"][order]
    if (other_label & checked).any():
        raise ExportCheckError(f"val frame {frame}: onnxruntime and PyTorch give other labels to the same instances")
    box_diff = np.abs(onnx["boxes"][0] - eager["boxes_3d"][order]).max(axis=1)
    differing = int(((box_diff > tolerance) | other_label)[~checked].sum())
    ranked = np.maximum(onnx["scores"][0], eager["scores_3d"]) >= min_score  # the sorted lists, rank by rank
    ranked_cls = np.maximum(onnx["cls_scores"][0], eager["cls_scores"]) >= min_score
    diffs = {
        "boxes": float(box_diff[checked].max(initial=0.0)),
        "scores": float(np.abs(onnx["scores"][0] - eager["scores_3d"])[ranked].max(initial=0.0)),
        "cls_scores": float(np.abs(onnx["cls_scores"][0] - eager["cls_scores"])[ranked_cls].max(initial=0.0)),
    }
    for name, diff in diffs.items():
        _exceeds(frame, name, diff, tolerance)
    return diffs, int(checked.sum()), differing


def compare_state(
    frame: int, eager: Dict[str, np.ndarray], onnx: Dict[str, np.ndarray], tolerance: float, min_score: float
) -> float:
    """The instances kept for the next frame (next_*) against the eager bank's after the same frame:
    the same id count, and every instance PyTorch keeps with confidence >= `min_score` kept by the
    graph too, its anchor, feature and confidence within `tolerance` (matched by id). Returns the
    largest difference."""
    if int(onnx["next_prev_id"][0]) != int(eager["prev_id"][0]):
        raise ExportCheckError(
            f"val frame {frame}: onnxruntime has handed out {int(onnx['next_prev_id'][0])} tracking ids, "
            f"PyTorch {int(eager['prev_id'][0])}"
        )
    kept = {int(i): r for r, i in enumerate(onnx["next_id"][0])}
    worst = 0.0
    for r, (i, confidence) in enumerate(zip(eager["cached_id"][0], eager["cached_confidence"][0])):
        if confidence < min_score:
            continue
        if int(i) not in kept:
            raise ExportCheckError(
                f"val frame {frame}: PyTorch keeps instance {int(i)} (confidence {confidence:.3f}) for the next "
                "frame, onnxruntime does not"
            )
        g = kept[int(i)]
        for mine, theirs in (("next_anchor", "cached_anchor"), ("next_feature", "cached_feature")):
            worst = max(worst, float(np.abs(onnx[mine][0, g] - eager[theirs][0, r]).max()))
        worst = max(worst, abs(float(onnx["next_confidence"][0, g]) - float(confidence)))
    _exceeds(frame, "kept instances (anchors, features, confidences)", worst, tolerance)
    return worst


def io_description(step: InferenceStep, example: Dict[str, torch.Tensor], outputs: List[torch.Tensor]) -> dict:
    """io.json: every input and output with its shape in this graph, dtype and meaning."""

    def entries(spec, tensors):
        return [
            {"name": name, "shape": list(t.shape), "symbolic_shape": shape, "dtype": dtype, "meaning": meaning}
            for (name, shape, dtype, meaning), t in zip(spec, tensors)
        ]

    return {
        "sizes": step.sizes(),
        "inputs": entries(INPUTS, [example[name] for name, *_ in INPUTS]),
        "outputs": entries(OUTPUTS, outputs),
        "first_frame": "has_history False, cached_* zeros, cached_id -1, prev_id 0 (model.export.InferenceStep.initial_state)",
        "next_frame": "cached_* = the previous frame's next_*, prev_id = next_prev_id, has_history True",
    }


def export(params: dict, infos_path: str, checkpoint: str, out_dir: str, metrics_path: str) -> dict:
    """The export stage's work; returns its metrics."""
    import onnx
    import onnxruntime as ort

    from pipeline.dataset import collate, dataset_from_params
    from pipeline.evaluate import (
        WARMUP_FRAMES,
        InferenceTimer,
        check_trained_settings,
        eval_model,
        load_checkpoint,
    )

    xp, mp = params["export"], params["model"]
    ckpt = load_checkpoint(checkpoint, infos_path, params["convert"]["version"])
    check_trained_settings(ckpt, mp, checkpoint)
    device = torch.device("cpu")
    model = eval_model(ckpt, mp, "fp32", device)
    fast_images = bool(params["data"]["fast_images"]) and bool(ckpt.get("fast_images", False))
    dataset = dataset_from_params(params, infos_path, training=False, fast_images=fast_images)
    count = int(xp["check_frames"]) or len(dataset)
    frames = list(range(min(count, len(dataset))))  # data_infos are in temporal order
    if not frames:
        raise ExportCheckError(f"{infos_path}: no val frames to check the exported graph on")

    # the eager model frame by frame, as the evaluate stage runs it, and its instance bank after each frame
    timer, bank = InferenceTimer(device), model.head.instance_bank
    batches = [collate([dataset[i]]) for i in frames]
    eager, states = [], []
    bank.reset()
    with torch.no_grad():
        for batch in tqdm(batches, desc="PyTorch", unit="frame"):
            eager.append({k: v.numpy() for k, v in timer(model, batch)[0].items()})
            states.append(eager_state(bank))

    step = InferenceStep(model).eval()
    example = {**frame_inputs(batches[0], None), **step.initial_state()}
    buffer = io.BytesIO()
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # the shape checks' Python conditions are constants of this graph (its shapes are fixed)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch_outputs = step(**example)
        export_kwargs: Dict[str, Any] = {"dynamo": False} if _has_dynamo_option() else {}
        torch.onnx.export(
            step,
            tuple(example[name] for name, *_ in INPUTS),
            buffer,
            input_names=[name for name, *_ in INPUTS],
            output_names=[name for name, *_ in OUTPUTS],
            opset_version=int(xp["opset"]),
            do_constant_folding=True,
            **export_kwargs,
        )
    export_s = time.perf_counter() - start
    graph = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(graph))

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    first = {k: v.numpy() for k, v in step.initial_state().items()}
    tolerance, min_score = float(xp["tolerance"]), float(xp["min_score"])
    # The check: each frame from PyTorch's state after the frame before, so that every frame tests
    # the graph's own step (a free run compounds float rounding through the state).
    worst = {"boxes": 0.0, "scores": 0.0, "cls_scores": 0.0, "state": 0.0}
    checked, differing, previous = 0, 0, None
    for k, batch in enumerate(tqdm(batches, desc="onnxruntime (check)", unit="frame")):
        feed = {**{n: v.numpy() for n, v in frame_inputs(batch, previous).items()}, **(states[k - 1] if k else first)}
        named = dict(zip(names, session.run(names, feed)))
        diffs, rows, low = compare(frames[k], eager[k], named, tolerance, min_score)
        diffs["state"] = compare_state(frames[k], states[k], named, tolerance, min_score)
        worst = {key: max(worst[key], diffs[key]) for key in worst}
        checked, differing = checked + rows, differing + low
        previous = batch
    # The deployment: the graph's own state from frame to frame, timed as the eager model's calls.
    ort_timer, state, previous, drift = InferenceTimer(device), first, None, 0.0
    for k, batch in enumerate(tqdm(batches, desc="onnxruntime (own state)", unit="frame")):
        feed = {**{n: v.numpy() for n, v in frame_inputs(batch, previous).items()}, **state}
        named = dict(zip(names, ort_timer(lambda f: session.run(names, f), feed)))
        drift = max(drift, own_state_drift(eager[k], named, min_score))
        state = next_state([named[name] for name, *_ in OUTPUTS])
        previous = batch

    with atomic_directory(out_dir) as tmp:
        (tmp / "model.onnx").write_bytes(graph)
        description = io_description(step, example, list(torch_outputs))
        (tmp / "io.json").write_text(json.dumps(description, indent=2) + "\n")
    metrics = {
        "frames": len(frames),
        "max_abs_diff_boxes": worst["boxes"],
        "max_abs_diff_scores": max(worst["scores"], worst["cls_scores"]),
        "max_abs_diff_state": worst["state"],
        "rows_checked": checked,
        "low_score_rows_differing": differing,
        "max_abs_diff_boxes_own_state": drift,
        "onnxruntime_fps": round(ort_timer.fps, 3) if ort_timer.fps else None,
        "torch_fps": round(timer.fps, 3) if timer.fps else None,
        "onnx_mib": round(len(graph) / 2**20, 1),
    }
    write_json_atomic(metrics_path, metrics)
    if not checked:
        print(
            f"export: no detection scored >= export.min_score {min_score:g} in these frames (an untrained model?): "
            "only the tracking ids, the id count and the low-score rows were compared",
            flush=True,
        )
    print(
        f"export: {Path(out_dir) / 'model.onnx'} ({metrics['onnx_mib']} MiB, opset {xp['opset']}, traced in "
        f"{export_s:.1f} s); onnxruntime equals PyTorch over {len(frames)} val frames (each from PyTorch's state): "
        f"the same tracking ids and labels, boxes within {worst['boxes']:.2g}, scores within "
        f"{metrics['max_abs_diff_scores']:.2g}, kept instances within {worst['state']:.2g} "
        f"(export.tolerance {tolerance:g}; {checked} boxes scoring >= export.min_score {min_score:g} checked, "
        f"{differing} below it differ); on its own state, boxes within {drift:.2g}",
        flush=True,
    )
    if ort_timer.fps and timer.fps:
        print(
            f"export: onnxruntime {ort_timer.fps:.3f} frames per second, PyTorch {timer.fps:.3f} in this run "
            f"(onnxruntime / PyTorch {ort_timer.fps / timer.fps:.2f}x; fp32, {torch.get_num_threads()} threads, "
            f"after the first {WARMUP_FRAMES} frames)",
            flush=True,
        )
    return metrics


def own_state_drift(eager: dict, onnx: Dict[str, np.ndarray], min_score: float) -> float:
    """How far the graph's boxes, run on its own state from the first frame, are from PyTorch's:
    the largest difference over the ids both give and PyTorch scores at least `min_score`
    (reported, not checked: float rounding compounds through the carried state)."""
    rows = {int(i): r for r, i in enumerate(onnx["instance_ids"][0])}
    worst = 0.0
    for r, (i, score) in enumerate(zip(eager["instance_ids"], eager["scores_3d"])):
        if score >= min_score and int(i) in rows:
            worst = max(worst, float(np.abs(onnx["boxes"][0, rows[int(i)]] - eager["boxes_3d"][r]).max()))
    return worst


def _has_dynamo_option() -> bool:
    """torch >= 2.5 has torch.onnx.export(dynamo=...); from 2.9 it defaults to True, and this graph
    is exported with the TorchScript exporter (torch 2.1, the seed's, has only that one)."""
    import inspect

    return "dynamo" in inspect.signature(torch.onnx.export).parameters
