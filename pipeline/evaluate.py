"""The evaluate stage's inference and orchestration: the checkpoint's model over the val infos in
temporal order (every process its run of whole scenes), then the submissions
(pipeline.submission), the official scores and tables (pipeline.metrics) and the pictures
(pipeline.pictures). Also validation during training (`validate`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.files import write_json_atomic
from pipeline.metrics import EVAL_SETS, flat_metrics, nuscenes_eval, score
from pipeline.pictures import draw_pictures
from pipeline.submission import EvaluateError, submission, tracking_submission, write_results


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
    from pipeline.devices import amp_dtype, resolve_precision

    state = ckpt.get("state_dict", ckpt)
    anchor = state["head.instance_bank.anchor"].numpy()
    model = build_model(dict(model_params), anchor).to(device)
    model.load_state_dict(state, strict=True)
    model.eval()
    if fuse_conv_bn:
        from mmcv.cnn import fuse_conv_bn as fuse

        fuse(model)
    model.set_mixed_precision(amp_dtype(device, resolve_precision(precision, device.type)))
    if device.type == "cpu":
        model.use_channels_last()
    return model


def evaluate(params: dict, infos_path: str, checkpoint: str, out_dir: str, metrics_path: str, plots_dir: str) -> dict:
    """The evaluate stage: checkpoint -> detection and tracking results json -> metrics, pictures.
    A version without an annotated split (v1.0-test) gets the two submissions and no metrics."""
    from pipeline.dataset import collate, dataset_from_params
    from pipeline.devices import init_distributed, resolve_device

    ep, mp, dp, dataset_settings = params["evaluate"], params["model"], params["data"], params["convert"]
    ckpt_path = str(checkpoint)  # exactly the checkpoint given (the stage: --checkpoint or evaluate.checkpoint)
    ckpt = load_checkpoint(ckpt_path, infos_path, dataset_settings["version"])
    check_trained_settings(ckpt, mp, ckpt_path)
    dist = init_distributed(resolve_device(str(ep["device"])))
    model = eval_model(ckpt, mp, str(ep["precision"]), dist.device, bool(ep["fuse_conv_bn"]))
    # the fast image path only for a checkpoint trained on it here (data.fast_images); any other, e.g. the
    # released weights, is evaluated on the reference's exact images
    fast_images = bool(dp["fast_images"]) and bool(ckpt.get("fast_images", False))
    dataset = dataset_from_params(params, infos_path, training=False, fast_images=fast_images)
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
    if dataset_settings["version"] in EVAL_SETS:
        log += score(result_path, track_path, dataset_settings, out, plots_dir, metrics)
    else:
        log.append(
            f"convert.version {dataset_settings['version']} has no annotated val split: detection and tracking were not "
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
