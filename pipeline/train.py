"""The training loop: one process per device (torchrun starts them), resumable, logged with DVCLive.

Resume is exact on CPU with a fixed seed: a checkpoint holds the model, optimiser, scaler,
iteration (the schedule is a function of it), the number of batches the sampler has handed out,
every RNG state (torch, numpy, python; the sampler's own numpy state) and the head's temporal
state (cached instances and denoising queries), so the run continues as if never stopped.

With train.eval_interval > 0 the weights are scored on the val split every that many iterations
(pipeline.evaluate.validate), logged as val/mAP, val/NDS, ... beside the losses; the temporal
state and every RNG are put back afterwards, so validation does not change the trained weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline.devices import Dist, amp_dtype, grad_scaler, init_distributed, resolve_device
from pipeline.params import write_bytes_atomic, write_json_atomic
from pipeline.settings import REFERENCE_BATCH, identity_params


class TrainError(RuntimeError):
    """Bad training input or settings; the message names the file or parameter."""


def lr_factor(it: int, max_iters: int, warmup_iters: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """mmcv's CosineAnnealing with linear warm-up, as a factor of the base learning rate."""
    cosine = min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * it / max(1, max_iters))) / 2
    if it < warmup_iters:
        return cosine * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))
    return cosine


class SeededBatches:
    """Batches from the group-in-batch sampler, each item tagged with its own seed.

    The sampler draws augmentations from numpy's global RNG; it runs here under a private numpy
    state, so the main process's RNG (grid mask) is not disturbed by how far the data loader
    prefetches, and replaying `consumed` batches restores the sampler exactly.
    """

    def __init__(self, sampler: Any, seed: int, consumed: int = 0):
        self.sampler = sampler
        self.seed = seed
        self.consumed = 0
        self._state = np.random.RandomState(seed).get_state()
        self._it = iter(sampler)
        for _ in range(consumed):
            self._next()

    def _next(self) -> list:
        saved = np.random.get_state()
        np.random.set_state(self._state)
        try:
            batch = next(self._it)
        finally:
            self._state = np.random.get_state()
            np.random.set_state(saved)
        items = []
        for slot, item in enumerate(batch):
            item = dict(item) if isinstance(item, dict) else {"idx": int(item)}
            item["seed"] = (self.seed * 1_000_003 + self.consumed * 1009 + slot) % (2**32)
            items.append(item)
        self.consumed += 1
        return items

    def __iter__(self) -> Iterator[list]:
        while True:
            yield self._next()


class SeededDataset(torch.utils.data.Dataset):
    """Seeds numpy per item (photometric distortion etc. then do not depend on the worker), and
    puts the caller's numpy state back: with num_workers 0 items load in the training process,
    whose numpy stream (the grid mask) must not depend on the loading."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: dict) -> dict:
        item = dict(item)
        saved = np.random.get_state()
        np.random.seed(item.pop("seed"))
        try:
            return self.dataset[item if "aug_config" in item else item["idx"]]
        finally:
            np.random.set_state(saved)


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out


def scaled_lr(lr: float, total_batch: int, rule: str) -> float:
    """train.lr for a global batch other than the reference's 48 (train.lr_scaling).

    reference: x2/3 per halving of the batch (x3/2 per doubling), the rule the reference's
    maintainer gives users with fewer devices: lr * (batch / 48) ** log2(3/2), between sqrt and
    linear. AdamW normalises each update by the gradient's scale, so the batch changes the noise
    of an update more than its size: sqrt, lr * sqrt(batch / 48), is the usual rule for Adam;
    linear, lr * batch / 48 (Goyal et al., for SGD), shrinks it most. none: lr as written.
    """
    ratio = total_batch / REFERENCE_BATCH
    exponent = {"none": 0.0, "reference": math.log2(1.5), "linear": 1.0, "sqrt": 0.5}.get(rule)
    if exponent is None:
        raise TrainError(f"train.lr_scaling: expected none, reference, linear or sqrt, got {rule!r}")
    return lr * ratio**exponent


def config_fingerprint(*parts: Any) -> str:
    """Digest of what decides the trained model; callers pass params through identity_params, so
    a launch setting (pipeline.settings.LAUNCH_KEYS) does not stop a checkpoint from resuming."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_digest() -> str:
    """Digest of the code a checkpoint depends on: a resumed run must run the same code."""
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "model").rglob("*.py")) + [
        root / "pipeline" / n for n in ("train.py", "dataset.py", "sampler.py")
    ]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporal_state(model: torch.nn.Module) -> dict:
    """The head's state carried between iterations (cached instances, denoising queries)."""
    head = model.head
    bank = head.instance_bank
    keys = (
        "cached_feature",
        "cached_anchor",
        "metas",
        "mask",
        "confidence",
        "temp_confidence",
        "instance_id",
        "prev_id",
    )
    return {"bank": {k: getattr(bank, k) for k in keys}, "dn_metas": head.sampler.dn_metas}


def set_temporal_state(model: torch.nn.Module, state: dict) -> None:
    for k, v in state["bank"].items():
        setattr(model.head.instance_bank, k, v)
    model.head.sampler.dn_metas = state["dn_metas"]


VAL_METRICS = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE")


def validation_dataset(params: dict, val_infos: str) -> Any:
    """The val infos read as the evaluate stage reads them for a checkpoint trained here: test
    mode, one sequence per scene, the training's image path (train.eval_interval > 0 only)."""
    from pipeline.dataset import Sparse4DDataset
    from pipeline.evaluate import EVAL_SETS

    version = params["convert"]["version"]
    if version not in EVAL_SETS:
        raise TrainError(
            f"train.eval_interval: convert.version {version} has no annotated val split to validate on "
            f"(expected {list(EVAL_SETS)}, or train.eval_interval: 0)"
        )
    if not Path(val_infos).is_file():
        raise TrainError(f"{val_infos}: val info pkl not found (run the convert stage; train.eval_interval needs it)")
    dataset = Sparse4DDataset(
        val_infos,
        classes=list(params["model"]["classes"]),
        data_aug_conf=dict(params["data"]["aug"]),
        test_mode=True,
        fast_images=bool(params["data"].get("fast_images", False)),
        with_seq_flag=True,
        sequences_split_num=1,
        keep_consistent_seq_aug=False,
    )
    if dataset.metadata.get("version") != version:
        raise TrainError(
            f"{val_infos} was converted from {dataset.metadata.get('version')}, but convert.version is {version}"
        )
    return dataset


def _snapshot(obj: Any) -> Any:
    """A copy that inference cannot change: containers copied, tensors cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def validate_between_steps(model: torch.nn.Module, dataset: Any, convert: dict, dist: Dist) -> dict | None:
    """pipeline.evaluate.validate between two iterations, leaving training exactly as it was: the
    head's temporal state and every RNG are put back and the model is in train mode again, so a
    run with validation trains the same weights as one without. Every rank infers its share;
    rank 0 gets the metrics (None elsewhere), the others wait for it."""
    from pipeline.evaluate import EvaluateError, validate

    temporal, rng = _snapshot(temporal_state(model)), rng_state()
    try:
        metrics = validate(
            model, dataset, str(convert["data_root"]), str(convert["version"]), dist.device, dist.rank, dist.world_size
        )
    except EvaluateError as err:
        raise TrainError(f"train.eval_interval: validation failed: {err}") from err
    finally:
        set_temporal_state(model, temporal)
        set_rng_state(rng)
        model.train()
    if dist.world_size > 1:
        torch.distributed.barrier()
    return metrics


def save_checkpoint(path: Path, payload: dict) -> None:
    import io

    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(path, buf.getvalue())


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
    train.eval_interval > 0, validate on `val_infos` (and the `convert` section's dataset) too."""
    from model import build_model
    from pipeline.dataset import Sparse4DDataset, collate
    from pipeline.sampler import GroupInBatchSampler

    tp, mp, dp = params["train"], params["model"], params["data"]
    device_type = resolve_device(str(tp["device"]))
    dist = init_distributed(device_type)
    out = Path(out_dir)
    for path, what in ((infos, "train info pkl (run the convert stage)"), (anchors, "anchors (run the anchors stage)")):
        if not Path(path).is_file():
            raise TrainError(f"{path}: {what} not found")
    total_batch = int(tp["total_batch_size"])
    if total_batch % dist.world_size:
        raise TrainError(f"train.total_batch_size: {total_batch} is not divisible by the {dist.world_size} devices")
    batch_size = total_batch // dist.world_size
    precision = str(tp.get("precision", "auto"))
    if precision == "auto":
        precision = "fp16" if device_type in ("cuda", "npu") else "fp32"

    seed = int(tp["seed"])
    random.seed(seed + dist.rank)
    np.random.seed(seed + dist.rank)
    torch.manual_seed(seed + dist.rank)
    torch.use_deterministic_algorithms(False)

    dataset = Sparse4DDataset(
        infos,
        classes=list(mp["classes"]),
        data_aug_conf=dict(dp["aug"]),
        test_mode=False,
        with_seq_flag=True,
        sequences_split_num=int(dp["sequences_split_num"]),
        keep_consistent_seq_aug=True,
        photometric=bool(dp.get("photometric", True)),
        fast_images=bool(dp.get("fast_images", False)),
        use_valid_flag=bool(dp.get("use_valid_flag", False)),
    )
    iters_per_epoch = max(1, len(dataset) // total_batch)
    eval_interval = int(tp["eval_interval"])
    val_dataset = validation_dataset(params, val_infos) if eval_interval > 0 else None
    max_iters = int(tp.get("iterations") or 0) or int(float(tp["epochs"]) * iters_per_epoch)
    anchor = np.load(anchors)
    if int(mp.get("num_anchor", len(anchor))) != len(anchor):
        raise TrainError(
            f"model.num_anchor is {mp['num_anchor']} but {anchors} holds {len(anchor)} anchors (anchors.num_anchor)"
        )
    fingerprint = config_fingerprint(
        identity_params({"train": tp, "model": mp, "data": dp}),
        file_digest(infos),
        file_digest(anchors),
        code_digest(),
        dist.world_size,
    )

    model = build_model(dict(mp), anchor).to(dist.device)
    if dist.device.type == "cpu":
        model.use_channels_last()
    manifest = json.loads(Path(backbone_manifest).read_text()) if Path(backbone_manifest).is_file() else {}
    if manifest.get("file"):
        model.load_backbone_weights(Path(backbone_manifest).parent / manifest["file"])
    backbone = [p for n, p in model.named_parameters() if n.startswith("img_backbone") and p.requires_grad]
    others = [p for n, p in model.named_parameters() if not n.startswith("img_backbone") and p.requires_grad]
    lr = scaled_lr(float(tp["lr"]), total_batch, str(tp["lr_scaling"]))
    if dist.main and lr != float(tp["lr"]):
        print(f"train: lr {lr:.4g} (train.lr {tp['lr']} scaled to batch {total_batch}, train.lr_scaling)")
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "lr_mult": float(tp["backbone_lr_mult"])}, {"params": others, "lr_mult": 1.0}],
        lr=lr,
        weight_decay=float(tp["weight_decay"]),
    )
    model.set_mixed_precision(amp_dtype(dist.device, precision))
    loss_scale = tp.get("loss_scale", 32.0)
    static_scale = None if str(loss_scale) == "dynamic" else float(loss_scale)
    scaler = grad_scaler(dist.device, precision, init_scale=static_scale or 2.0**16)
    ddp = model
    if dist.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device_type != "cpu" else None
        )

    # ------------------------------------------------------------------ resume
    latest = out / "checkpoints" / "latest.pth"
    start_iter, consumed, nonfinite_total = 0, 0, 0
    history: list[dict] = []
    resume_rng = None
    if latest.is_file():
        ckpt = torch.load(latest, map_location="cpu", weights_only=False)
        if (
            ckpt.get("fingerprint") == fingerprint
            and ckpt.get("rank_states")
            and len(ckpt["rank_states"]) == dist.world_size
        ):
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            start_iter, consumed, nonfinite_total = ckpt["iteration"], ckpt["consumed"], ckpt["nonfinite_total"]
            history = ckpt["history"]
            rank_state = ckpt["rank_states"][dist.rank]
            resume_rng = rank_state["rng"]  # restored once the data iterator exists (creating it draws a seed)
            set_temporal_state(model, _to(rank_state["temporal"], dist.device))
            if dist.main:
                print(f"train: resuming from {latest} at iteration {start_iter}/{max_iters}")
        elif dist.main:
            print(f"train: {latest} belongs to other settings; starting afresh")

    sampler = GroupInBatchSampler(
        dataset.flag,
        batch_size,
        dist.world_size,
        dist.rank,
        seed=seed,
        get_augmentation=dataset.get_augmentation,
        skip_prob=float(dp.get("skip_prob", 0.5)),  # the reference's values where a profile leaves them out
        sequence_flip_prob=float(dp.get("sequence_flip_prob", 0.1)),
    )
    batches = SeededBatches(sampler, seed * 7919 + dist.rank, consumed=consumed)
    loader = torch.utils.data.DataLoader(
        SeededDataset(dataset),
        batch_sampler=batches,
        num_workers=int(tp["num_workers"]),
        collate_fn=collate,
        persistent_workers=False,
    )
    live = None
    if dist.main:
        from dvclive import Live

        live = Live(dir=live_dir, resume=start_iter > 0, save_dvc_exp=False, dvcyaml=False)
        if start_iter > 0:
            live.step = start_iter
    ddp.train()
    max_nonfinite = int(tp["max_nonfinite_steps"])
    consecutive_nonfinite = 0
    bar = tqdm(total=max_iters, initial=start_iter, desc="train", unit="it", disable=not dist.main)
    data_iter = iter(loader)
    if resume_rng is not None:
        set_rng_state(resume_rng)
    it = start_iter
    checkpoint_interval = int(tp["checkpoint_interval"])
    while it < max_iters:
        t0 = time.perf_counter()
        batch = to_device(next(data_iter), dist.device)
        factor = lr_factor(it, max_iters, int(tp["warmup_iters"]), float(tp["warmup_ratio"]), float(tp["min_lr_ratio"]))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor * group["lr_mult"]
        losses = ddp(batch)  # mixed precision inside: the model's image features only
        loss = sum(v.float() for v in losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(tp["grad_clip"]))
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if dist.world_size > 1:
            flag = torch.tensor([float(finite)], device=dist.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item() > 0)
        if finite:
            scaler.step(optimizer)
            consecutive_nonfinite = 0
        else:
            nonfinite_total += 1
            consecutive_nonfinite += 1
            if consecutive_nonfinite >= max_nonfinite:
                raise TrainError(
                    f"train: {consecutive_nonfinite} consecutive iterations with a non-finite loss or gradient "
                    f"(iteration {it}; train.max_nonfinite_steps = {max_nonfinite}); lower train.lr or check the data"
                )
        scaler.update(static_scale)  # a static scale (the reference's 32) is set back every step
        step_time = time.perf_counter() - t0
        loss_value = float(loss.detach())
        it += 1
        consumed = batches.consumed - _prefetched(loader)
        record = {
            "iteration": it,
            "loss": loss_value,
            "lr": lr * factor,
            "grad_norm": float(grad_norm),
            "step_time": step_time,
            "finite": finite,
        }
        history.append(record)
        if live is not None:
            for key, value in losses.items():
                live.log_metric(f"train/{key}", float(value))
            live.log_metric("train/loss", loss_value)
            live.log_metric("train/lr", lr * factor)
            live.log_metric("train/grad_norm", float(grad_norm))
            live.log_metric("train/step_time_s", step_time)
            live.next_step()
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr * factor:.2e}")
        bar.update()
        if val_dataset is not None and it % eval_interval == 0:
            start = time.perf_counter()
            val = validate_between_steps(model, val_dataset, params["convert"], dist)
            if val is not None and live is not None:  # rank 0
                bar.write(
                    f"train: validation after iteration {it}: mAP {val['mAP']:.4f}, NDS {val['NDS']:.4f} "
                    f"({time.perf_counter() - start:.1f} s)"
                )
                for key in VAL_METRICS:  # at step `it`, as the losses of the next forward: the same weights
                    live.log_metric(f"val/{key}", float(val[key]))
        if it % checkpoint_interval == 0 or it == max_iters:
            _checkpoint(out, model, optimizer, scaler, it, consumed, nonfinite_total, history, fingerprint, dist)
    bar.close()
    summary = {}
    if dist.main:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # fast_images: the image path it was trained on, so evaluation uses the same one (a checkpoint
        # from elsewhere, without the key, is evaluated on the reference's exact images)
        meta = {"model": dict(mp), "iteration": it, "fast_images": bool(dp["fast_images"])}
        save_checkpoint(out / "model.pth", {"state_dict": state, **meta})
        summary = summarize(history, total_batch, dist.world_size, device_type, nonfinite_total)
        write_json_atomic(metrics_path, summary)
        if live is not None:
            live.end()
    if dist.world_size > 1:
        torch.distributed.barrier()
    return summary


def _prefetched(loader: torch.utils.data.DataLoader) -> int:
    """Batches the loader has drawn from the sampler but not handed out yet."""
    it = getattr(loader, "_iterator", None)
    if it is None:
        return 0
    return max(0, getattr(it, "_send_idx", 0) - getattr(it, "_rcvd_idx", 0))


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _checkpoint(
    out: Path,
    model,
    optimizer,
    scaler,
    it: int,
    consumed: int,
    nonfinite_total: int,
    history: list,
    fingerprint: str,
    dist: Dist,
) -> None:
    """Every rank contributes its RNG and temporal state; rank 0 writes one file atomically."""
    rank_state = {"rng": rng_state(), "temporal": _to(temporal_state(model), torch.device("cpu"))}
    if dist.world_size > 1:
        gathered: list = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, pickle.dumps(rank_state))
        rank_states = [pickle.loads(g) for g in gathered]
    else:
        rank_states = [rank_state]
    if dist.main:
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "iteration": it,
            "consumed": consumed,
            "nonfinite_total": nonfinite_total,
            "history": history,
            "fingerprint": fingerprint,
            "rank_states": rank_states,
        }
        save_checkpoint(out / "checkpoints" / "latest.pth", payload)
    if dist.world_size > 1:
        torch.distributed.barrier()


def summarize(
    history: list[dict], total_batch: int, world_size: int, device: str, nonfinite_total: int, warmup: int = 5
) -> dict:
    """step_time_s: mean seconds per iteration without the first `warmup` ones (or the first
    one when the run is short), as the seed's performance script; samples_per_s = batch / that."""
    times = [h["step_time"] for h in history]
    skip = warmup if len(times) > 2 * warmup else min(1, len(times) - 1)
    steady = times[skip:] or times
    step_time = float(np.mean(steady)) if steady else float("nan")
    tail = [h["loss"] for h in history[-10:] if math.isfinite(h["loss"])]
    return {
        "step_time_s": round(step_time, 4),
        "samples_per_s": round(total_batch / step_time, 4) if step_time > 0 else 0.0,
        "iterations": history[-1]["iteration"] if history else 0,
        "world_size": world_size,
        "global_batch": total_batch,
        "device": device,
        "final_loss": round(float(np.mean(tail)), 4) if tail else None,
        "nonfinite_steps": nonfinite_total,
    }


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

    import yaml

    from pipeline.dataset import DatasetError
    from pipeline.devices import DeviceError
    from pipeline.sampler import SamplerError

    with open(params_path) as f:
        params = yaml.safe_load(f)
    try:
        train(params, infos, anchors, backbone_manifest, out_dir, metrics_path, live_dir, val_infos)
    except (TrainError, DatasetError, SamplerError, DeviceError) as err:
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
