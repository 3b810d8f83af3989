"""The training loop: one process per device (torchrun starts them), resumable, logged with DVCLive.

`build_run` makes the pieces (data, model, optimiser, learning-rate schedule, loss scaler);
`train` resumes them from the last checkpoint when there is one of these settings
(pipeline.checkpoint), then runs the loop: take a batch, `train_step`, advance the schedule, log
(pipeline.live), now and then validate and checkpoint. Resume is exact on CPU with a fixed seed.

With train.eval_interval > 0 the weights are scored on the val split every that many iterations
(pipeline.evaluate.validate), logged as val/mAP, val/NDS, ... beside the losses; the temporal
state and every RNG are put back afterwards, so validation does not change the trained weights.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import (
    Checkpointer,
    code_digest,
    config_fingerprint,
    rng_state,
    save_atomic,
    set_rng_state,
    set_temporal_state,
    temporal_state,
)
from pipeline.devices import (
    Dist,
    amp_dtype,
    grad_scaler,
    init_distributed,
    resolve_device,
    resolve_precision,
    to_device,
)
from pipeline.files import sha256_of, write_json_atomic
from pipeline.live import TrainLog
from pipeline.schedule import adamw, advance_schedule, lr_schedule, scaled_lr
from pipeline.settings import identity_params

# DistributedDataParallel does not copy rank 0's buffers (BatchNorm's running statistics) to the
# other ranks before each forward: each keeps its own, as the reference (and the Ascend port) wrap
# the model (projects/mmdet3d_plugin/apis/mmdet_train.py), and the checkpoint takes rank 0's.
DDP_BROADCAST_BUFFERS = False


class TrainError(RuntimeError):
    """Bad training input or settings; the message names the file or parameter."""


def validation_dataset(params: dict, val_infos: str) -> Any:
    """The val infos read as the evaluate stage reads them for a checkpoint trained here: test
    mode, one sequence per scene, the training's image path (train.eval_interval > 0 only)."""
    from pipeline.dataset import dataset_from_params
    from pipeline.metrics import EVAL_SETS

    version = params["convert"]["version"]
    if version not in EVAL_SETS:
        raise TrainError(
            f"train.eval_interval: convert.version {version} has no annotated val split to validate on "
            f"(expected {list(EVAL_SETS)}, or train.eval_interval: 0)"
        )
    if not Path(val_infos).is_file():
        raise TrainError(f"{val_infos}: val info pkl not found (run the convert stage; train.eval_interval needs it)")
    dataset = dataset_from_params(params, val_infos, training=False)
    if dataset.metadata.get("version") != version:
        raise TrainError(
            f"{val_infos} was converted from {dataset.metadata.get('version')}, but convert.version is {version}"
        )
    return dataset


def validate_between_steps(model: torch.nn.Module, dataset: Any, convert: dict, dist: Dist) -> dict | None:
    """pipeline.evaluate.validate between two iterations, leaving training exactly as it was: the
    head's temporal state and every RNG are put back and the model is in train mode again, so a
    run with validation trains the same weights as one without. Every rank infers its share;
    rank 0 gets the metrics (None elsewhere), the others wait for it."""
    from pipeline.evaluate import validate
    from pipeline.submission import EvaluateError

    temporal, rng = temporal_state(model, dist.device), rng_state()
    try:
        metrics = validate(
            model, dataset, str(convert["data_root"]), str(convert["version"]), dist.device, dist.rank, dist.world_size
        )
    except EvaluateError as err:
        raise TrainError(f"train.eval_interval: validation failed: {err}") from err
    finally:
        set_temporal_state(model, temporal, dist.device)
        set_rng_state(rng)
        model.train()
    if dist.world_size > 1:
        torch.distributed.barrier()
    return metrics


def training_loader(dataset: Any, params: dict, dist: Dist, batch_size: int, skip: int) -> torch.utils.data.DataLoader:
    """The group-in-batch sampler's batches, the first `skip` of them already taken (a resumed run).
    train.pin_memory pins the batches for an accelerator (never on the CPU, where there is nothing
    to pin for); train.persistent_workers keeps the loader processes between passes over it."""
    from pipeline.dataset import collate
    from pipeline.sampler import GroupInBatchSampler, SeededBatches, SeededDataset

    dp, tp, seed = params["data"], params["train"], int(params["train"]["seed"])
    sampler = GroupInBatchSampler(
        dataset.flag,
        batch_size,
        dist.world_size,
        dist.rank,
        seed=seed,
        get_augmentation=dataset.get_augmentation,
        skip_prob=float(dp["skip_prob"]),
        sequence_flip_prob=float(dp["sequence_flip_prob"]),
    )
    return torch.utils.data.DataLoader(
        SeededDataset(dataset),
        batch_sampler=SeededBatches(sampler, seed * 7919 + dist.rank, skip=skip),
        num_workers=int(tp["num_workers"]),
        collate_fn=collate,
        pin_memory=bool(tp["pin_memory"]) and dist.device.type != "cpu",
        persistent_workers=bool(tp["persistent_workers"]),
    )


def load_anchors(path: str) -> np.ndarray:
    """The anchors stage's (num_anchor, 11) array: its rows are the model's anchors."""
    return np.load(path)


def training_model(mp: dict, anchor: np.ndarray, backbone_manifest: str, dist: Dist) -> torch.nn.Module:
    """The model on this process's device, with the pretrained backbone when the manifest names one."""
    import json

    from model import build_model

    model = build_model(dict(mp), anchor).to(dist.device)
    if dist.device.type == "cpu":
        model.use_channels_last()
    manifest = json.loads(Path(backbone_manifest).read_text()) if Path(backbone_manifest).is_file() else {}
    if manifest.get("file"):
        model.load_backbone_weights(Path(backbone_manifest).parent / manifest["file"])
    return model


def train_step(
    ddp: torch.nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    grad_clip: float,
    static_scale: float | None,
    dist: Dist,
) -> tuple[dict, torch.Tensor, torch.Tensor, bool]:
    """One iteration: forward (mixed precision inside: the model's image features only), backward
    through the loss scaler, gradient clipping, and the optimiser's step unless the loss or the
    gradient is not finite on some rank. Returns the losses, their sum, the gradient norm and
    whether the step was taken."""
    losses = ddp(batch)
    loss = sum(v.float() for v in losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), grad_clip)
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
    if dist.world_size > 1:
        finite_everywhere = torch.tensor([float(finite)], device=dist.device)
        torch.distributed.all_reduce(finite_everywhere, op=torch.distributed.ReduceOp.MIN)
        finite = bool(finite_everywhere.item() > 0)
    if finite:
        scaler.step(optimizer)
    scaler.update(static_scale)  # a static scale (the reference's 32) is set back every step
    return losses, loss, grad_norm, finite


class NonFiniteSteps:
    """Counts the iterations whose update was skipped for a non-finite loss or gradient; raises a
    TrainError after `limit` in a row (train.max_nonfinite_steps)."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, 0

    def update(self, finite: bool, iteration: int) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TrainError(
                f"train: {self.in_a_row} consecutive iterations with a non-finite loss or gradient "
                f"(iteration {iteration}; train.max_nonfinite_steps = {self.limit}); lower train.lr or check the data"
            )


@dataclass
class Run:
    """One training process's pieces, as `build_run` makes them from the params."""

    dist: Dist
    device_type: str
    total_batch: int
    max_iters: int
    dataset: Any
    val_dataset: Any  # None without validation (train.eval_interval 0)
    fingerprint: str  # of the settings, inputs and code: a checkpoint of other ones is not resumed
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model, wrapped in DistributedDataParallel with more than one process
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any
    static_scale: float | None  # train.loss_scale, None: dynamic


def same_run_everywhere(fingerprint: str, dist: Dist, inputs: list[str]) -> None:
    """Every process must train the same thing: a node with other params, inputs or code (its
    own copy of the project) stops the run, naming the node, before any step."""
    if dist.world_size == 1:
        return
    import socket

    every: list = [None] * dist.world_size
    torch.distributed.all_gather_object(every, (fingerprint, dist.node, socket.gethostname()), group=dist.objects)
    reference = every[0][0]
    for rank, (theirs, node, host) in enumerate(every):
        if theirs != reference:
            raise TrainError(
                f"node {node} ({host}, rank {rank}) has other settings, inputs or code than node 0 (run fingerprint "
                f"{theirs}, node 0: {reference}): give every node the same commit, params file, "
                f"{' and '.join(inputs)}"
            )


def build_run(params: dict, infos: str, anchors: str, backbone_manifest: str, val_infos: str) -> Run:
    """Check the inputs, seed every RNG, and make the datasets, model, optimiser, schedule and
    loss scaler (in this order: the model's initial weights come from the seeded torch RNG)."""
    tp, mp, dp = params["train"], params["model"], params["data"]
    device_type = resolve_device(str(tp["device"]))
    dist = init_distributed(device_type)
    for path, what in ((infos, "train info pkl (run the convert stage)"), (anchors, "anchors (run the anchors stage)")):
        if not Path(path).is_file():
            raise TrainError(f"{path}: {what} not found")
    total_batch = int(tp["total_batch_size"])
    if total_batch % dist.world_size:
        raise TrainError(f"train.total_batch_size: {total_batch} is not divisible by the {dist.world_size} devices")
    precision = resolve_precision(str(tp["precision"]), device_type)

    seed = int(tp["seed"])
    random.seed(seed + dist.rank)
    np.random.seed(seed + dist.rank)
    torch.manual_seed(seed + dist.rank)

    from pipeline.dataset import dataset_from_params

    dataset = dataset_from_params(params, infos, training=True)
    val_dataset = validation_dataset(params, val_infos) if int(tp["eval_interval"]) > 0 else None
    max_iters = int(tp["iterations"]) or int(float(tp["epochs"]) * max(1, len(dataset) // total_batch))
    anchor = load_anchors(anchors)
    fingerprint = config_fingerprint(
        identity_params({"train": tp, "model": mp, "data": dp}),
        sha256_of(infos),
        sha256_of(anchors),
        code_digest(),
        dist.world_size,
    )
    same_run_everywhere(fingerprint, dist, [infos, anchors])
    model = training_model(mp, anchor, backbone_manifest, dist)
    lr = scaled_lr(float(tp["lr"]), total_batch, str(tp["lr_scaling"]))
    optimizer = adamw(model, lr, float(tp["backbone_lr_mult"]), float(tp["weight_decay"]))
    scheduler = lr_schedule(
        optimizer, max_iters, int(tp["warmup_iters"]), float(tp["warmup_ratio"]), float(tp["min_lr_ratio"])
    )
    model.set_mixed_precision(amp_dtype(dist.device, precision))
    static_scale = None if str(tp["loss_scale"]) == "dynamic" else float(tp["loss_scale"])
    scaler = grad_scaler(dist.device, precision, init_scale=static_scale or 2.0**16)
    ddp = model
    if dist.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dist.local_rank] if device_type != "cpu" else None,
            broadcast_buffers=DDP_BROADCAST_BUFFERS,
        )
    return Run(
        dist=dist, device_type=device_type, total_batch=total_batch, max_iters=max_iters, dataset=dataset,
        val_dataset=val_dataset, fingerprint=fingerprint, model=model, ddp=ddp, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, static_scale=static_scale,
    )  # fmt: skip


def startup_lines(params: dict, run: Run, resumed_at: int | None, checkpoints: Path) -> list[str]:
    """What the run is, for the log: device and processes, batch, length, learning rates, resume."""
    tp, dist = params["train"], run.dist
    nodes = int(tp["nnodes"])
    head_lr, backbone_lr = run.optimizer.param_groups[1]["initial_lr"], run.optimizer.param_groups[0]["initial_lr"]
    lr_note = (
        ""
        if head_lr == float(tp["lr"])
        else f" (train.lr {tp['lr']} scaled to batch {run.total_batch}, train.lr_scaling)"
    )
    return [
        f"train: {run.device_type}, {dist.world_size} process(es) on {nodes} node(s), global batch {run.total_batch} "
        f"({run.total_batch // dist.world_size} per process), {run.max_iters} iterations, precision {tp['precision']}",
        f"train: lr {head_lr:.4g}{lr_note}, backbone lr {backbone_lr:.4g}",
        f"train: resumed from {checkpoints / 'latest.pth'} at iteration {resumed_at}"
        if resumed_at is not None
        else "train: started at iteration 0 (no checkpoint of these settings)",
    ]


def train(
    params: dict,
    infos: str,
    anchors: str,
    backbone_manifest: str,
    out_dir: str,
    metrics_path: str,
    live_dir: str,
    val_infos: str = "data/infos/nuscenes_infos_val.pkl",
) -> dict:
    """Run (or resume) training with the `train`, `model` and `data` sections of params; with
    train.eval_interval > 0, validate on `val_infos` (and the `convert` section's dataset) too.
    Writes out_dir/model.pth and the summary (metrics_path, also returned; {} on ranks > 0)."""
    tp = params["train"]
    run = build_run(params, infos, anchors, backbone_manifest, val_infos)
    dist, model, scheduler = run.dist, run.model, run.scheduler
    out = Path(out_dir)
    checkpointer = Checkpointer(
        out / "checkpoints" / "latest.pth", run.fingerprint, dist, model, run.optimizer, scheduler, run.scaler
    )
    resumed = checkpointer.resume(run.max_iters) or {"iteration": 0, "sampler_batches": 0, "counters": {}}
    start, counters = resumed["iteration"], resumed["counters"]
    batch_size = run.total_batch // dist.world_size
    loader = training_loader(run.dataset, params, dist, batch_size, skip=resumed["sampler_batches"])
    log = TrainLog(
        live_dir,
        dist.main,
        start,
        run.max_iters,
        counters.get("summary"),
        str(out / "train.log"),
        int(tp["log_interval"]),
    )
    for line in startup_lines(params, run, resumed["iteration"] if start else None, out / "checkpoints"):
        log.note(line)
    nonfinite = NonFiniteSteps(int(tp["max_nonfinite_steps"]), counters.get("nonfinite_total", 0))
    run.ddp.train()
    data = iter(loader)
    if "rng" in resumed:
        set_rng_state(resumed["rng"])  # after iter(loader): creating the iterator draws a seed

    eval_interval, checkpoint_interval = int(tp["eval_interval"]), int(tp["checkpoint_interval"])
    grad_clip = float(tp["grad_clip"])
    for it in range(start + 1, run.max_iters + 1):  # `it`: the iteration being run, counted from 1
        t0 = time.perf_counter()
        batch = to_device(next(data), dist.device, non_blocking=True)
        lr = scheduler.get_last_lr()[-1]  # the head's group: train.lr x the schedule's factor
        losses, loss, grad_norm, finite = train_step(
            run.ddp, batch, run.optimizer, run.scaler, grad_clip, run.static_scale, dist
        )
        advance_schedule(scheduler)
        nonfinite.update(finite, it - 1)
        log.step(it, losses, float(loss.detach()), lr, float(grad_norm), time.perf_counter() - t0)
        if run.val_dataset is not None and it % eval_interval == 0:
            t0 = time.perf_counter()
            metrics = validate_between_steps(model, run.val_dataset, params["convert"], dist)
            log.validation(it, metrics, time.perf_counter() - t0)
        log.end_iteration()
        if it % checkpoint_interval == 0 or it == run.max_iters:
            summary = log.summary.state_dict()
            checkpointer.save(it, sampler_batches=it, nonfinite_total=nonfinite.total, summary=summary)

    summary = {}
    if dist.main:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # fast_images: the image path it was trained on, so evaluation uses the same one (a checkpoint
        # from elsewhere, without the key, is evaluated on the reference's exact images)
        meta = {"model": dict(params["model"]), "iteration": max(start, run.max_iters)}
        meta["fast_images"] = bool(params["data"]["fast_images"])
        save_atomic(out / "model.pth", {"state_dict": state, **meta})
        summary = log.summary.result(run.total_batch, dist.world_size, run.device_type, nonfinite.total)
        write_json_atomic(metrics_path, summary)
        log.note(f"train: done, {out / 'model.pth'}; {metrics_path}: {summary}", echo=False)
    log.close()
    if dist.world_size > 1:
        torch.distributed.barrier()
    return summary


def worker_main(
    params_path: str,
    infos: str,
    anchors: str,
    backbone_manifest: str,
    out_dir: str,
    metrics_path: str,
    live_dir: str,
    val_infos: str = "data/infos/nuscenes_infos_val.pkl",
) -> int:
    """Entry point of each training process."""
    import sys

    from pipeline.dataset import DatasetError
    from pipeline.devices import DeviceError
    from pipeline.params import ParamsError, read_params
    from pipeline.sampler import SamplerError

    try:
        params = read_params(params_path)  # checked in each process, not only by the stage
        train(params, infos, anchors, backbone_manifest, out_dir, metrics_path, live_dir, val_infos)
    except (TrainError, DatasetError, SamplerError, DeviceError, ParamsError) as err:
        print(f"train: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser()
    for name in ("params", "infos", "anchors", "backbone", "out", "metrics", "live"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--val-infos", default="data/infos/nuscenes_infos_val.pkl")
    a = parser.parse_args()
    sys.exit(worker_main(a.params, a.infos, a.anchors, a.backbone, a.out, a.metrics, a.live, a.val_infos))
