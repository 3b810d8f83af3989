"""The export stage: the scored checkpoint as an ONNX graph (`model.export.InferenceStep`: one
frame, the instance bank's state as inputs and outputs), checked in onnxruntime against the eager
PyTorch model over the first val frames in temporal order.

Both run the same frames one after the other, each carrying its own state (onnxruntime its own
next_* outputs back in as cached_*), as a deployment would. Per frame the two must give the same
set of tracking ids, and per id the same label and boxes within `export.tolerance`; the scores
(sorted) and the class scores too. A graph that fails is not written: the stage stops with the
frame and the difference, and leaves the previous outputs as they were.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

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


def compare(frame: int, eager: dict, onnx: Dict[str, np.ndarray], tolerance: float) -> Dict[str, float]:
    """One frame's eager result (BoxPostProcessor.decode's dict) against the graph's outputs of
    sample 0: the same ids, and per id the same label and boxes; the sorted scores and class scores
    elementwise (near-equal scores may swap places, so boxes are matched by id, not by rank)."""
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
    if not np.array_equal(onnx["labels"][0], eager["labels_3d"][order]):
        raise ExportCheckError(f"val frame {frame}: onnxruntime and PyTorch give other labels to the same instances")
    diffs = {
        "boxes": float(np.abs(onnx["boxes"][0] - eager["boxes_3d"][order]).max()),
        "scores": float(np.abs(onnx["scores"][0] - eager["scores_3d"]).max()),
        "cls_scores": float(np.abs(onnx["cls_scores"][0] - eager["cls_scores"]).max()),
    }
    for name, diff in diffs.items():
        if not diff <= tolerance:
            raise ExportCheckError(
                f"val frame {frame}: onnxruntime's {name} differ from PyTorch's by {diff:.3g} "
                f"(export.tolerance {tolerance:g})"
            )
    return diffs


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
        infer,
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

    # the eager model, as the evaluate stage runs it
    timer = InferenceTimer(device)
    eager = infer(model, dataset, frames, device, collate, show_progress=False, timer=timer)

    step = InferenceStep(model).eval()
    batches = [collate([dataset[i]]) for i in frames]
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
    state: Dict[str, Any] = {k: v.numpy() for k, v in step.initial_state().items()}
    ort_timer = InferenceTimer(device)
    worst = {"boxes": 0.0, "scores": 0.0, "cls_scores": 0.0}
    previous = None
    for frame, batch in zip(tqdm(frames, desc="onnxruntime", unit="frame"), batches):
        feed = {**{k: v.numpy() for k, v in frame_inputs(batch, previous).items()}, **state}
        outputs = ort_timer(lambda f: session.run(names, f), feed)  # timed as the eager model's calls
        named = dict(zip(names, outputs))
        for key, diff in compare(frame, eager[frame], named, float(xp["tolerance"])).items():
            worst[key] = max(worst[key], diff)
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
        "onnxruntime_fps": round(ort_timer.fps, 3) if ort_timer.fps else None,
        "torch_fps": round(timer.fps, 3) if timer.fps else None,
        "onnx_mib": round(len(graph) / 2**20, 1),
    }
    write_json_atomic(metrics_path, metrics)
    print(
        f"export: {Path(out_dir) / 'model.onnx'} ({metrics['onnx_mib']} MiB, opset {xp['opset']}, traced in "
        f"{export_s:.1f} s); onnxruntime equals PyTorch over {len(frames)} val frames: the same tracking ids and "
        f"labels, boxes within {worst['boxes']:.2g}, scores within {metrics['max_abs_diff_scores']:.2g} "
        f"(export.tolerance {float(xp['tolerance']):g})",
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


def _has_dynamo_option() -> bool:
    """torch >= 2.5 has torch.onnx.export(dynamo=...); from 2.9 it defaults to True, and this graph
    is exported with the TorchScript exporter (torch 2.1, the seed's, has only that one)."""
    import inspect

    return "dynamo" in inspect.signature(torch.onnx.export).parameters
