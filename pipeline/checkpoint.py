"""The resumable training state: what `runs/train/checkpoints/latest.pth` holds, and how a run
that was stopped continues as if it never had been (bit for bit on CPU with a fixed seed).

One file, written atomically by rank 0 (on node 0) and read by it alone, which sends the state
to the other ranks on resume (nodes need no shared disk), with

- the model, optimiser, learning-rate schedule and loss scaler (their state dicts);
- the iteration, the sampler's position (the batches the loop has taken: a resumed run draws
  them again, `pipeline.sampler.SeededBatches`) and whatever small counters the loop adds;
- per rank, every RNG (python, numpy, torch on the CPU, and CUDA's or the NPU's when there is
  one) and the head's temporal state: the instance bank's cached instances, the denoising
  queries, and of the previous batch only what the bank reads from it on the next frame (the
  timestamps and the per-sample poses in `img_metas`), never its images;
- a fingerprint of the settings, inputs and code (`config_fingerprint`): a checkpoint written
  under other settings is not resumed, the run starts afresh.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.devices import Dist, to_device
from pipeline.files import write_bytes_atomic

# What the instance bank keeps between frames (model/instance_bank.py), and the two entries of
# the previous batch it reads on the next frame: the time since that frame, and its poses.
BANK_KEYS = (
    "cached_feature",
    "cached_anchor",
    "metas",
    "mask",
    "confidence",
    "temp_confidence",
    "instance_id",
    "prev_id",
)
PREVIOUS_FRAME_KEYS = ("timestamp", "img_metas")


def save_atomic(path: Path, obj: Any) -> None:
    """torch.save to a temporary file, then renamed over `path`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def config_fingerprint(*parts: Any) -> str:
    """Digest of what decides the trained model; callers pass params through identity_params, so
    a launch setting (pipeline.settings.LAUNCH_KEYS) does not stop a checkpoint from resuming."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_digest() -> str:
    """Digest of the code a checkpoint depends on, every in-repo file the training worker runs
    (pipeline.imports.code_closure of pipeline/train.py): a resumed run must run the same code."""
    from pipeline.imports import ROOT, code_closure

    h = hashlib.sha256()
    for name in sorted(code_closure(ROOT / "pipeline" / "train.py")):
        h.update(name.encode() + (ROOT / name).read_bytes())
    return h.hexdigest()


def _npu() -> Any:
    """torch.npu when torch_npu is loaded (pipeline.devices imports it for an NPU run) and an NPU
    is visible, else None; torch_npu is never imported here."""
    npu = getattr(torch, "npu", None)
    if npu is None or not hasattr(npu, "get_rng_state") or not npu.is_available():
        return None
    return npu


def rng_state() -> dict:
    """Every RNG the training draws from: python, numpy, torch on the CPU and on each CUDA
    device or NPU."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    npu = _npu()
    if npu is not None:
        state["npu"] = npu.get_rng_state_all() if hasattr(npu, "get_rng_state_all") else [npu.get_rng_state()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npu = _npu()
    if "npu" in state and npu is not None:
        if hasattr(npu, "set_rng_state_all"):
            npu.set_rng_state_all(state["npu"])
        else:
            npu.set_rng_state(state["npu"][0])


def temporal_state(model: torch.nn.Module, device: torch.device) -> dict:
    """A copy on `device` of the head's state carried from one iteration to the next: the
    instance bank's cache and the denoising queries. Of the previous batch (the bank's `metas`)
    only the timestamps and `img_metas` are kept, what the bank reads from it."""
    bank = model.head.instance_bank
    state = {k: getattr(bank, k) for k in BANK_KEYS}
    if state["metas"] is not None:
        state["metas"] = {k: state["metas"][k] for k in PREVIOUS_FRAME_KEYS}
    return to_device({"bank": state, "dn_metas": model.head.target_assigner.dn_metas}, device, copy=True)


def set_temporal_state(model: torch.nn.Module, state: dict, device: torch.device) -> None:
    state = to_device(state, device)
    for k, v in state["bank"].items():
        setattr(model.head.instance_bank, k, v)
    model.head.target_assigner.dn_metas = state["dn_metas"]


class Checkpointer:
    """Saves and restores the full training state of `model`, `optimizer`, `scheduler` and
    `scaler` in `path`; every rank calls both methods (rank 0 writes, the others send their RNG
    and temporal state)."""

    def __init__(
        self,
        path: Path,
        fingerprint: str,
        dist: Dist,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
    ):
        self.path, self.fingerprint, self.dist = Path(path), fingerprint, dist
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler

    def save(self, iteration: int, sampler_batches: int, **counters: Any) -> None:
        """The state after `iteration` iterations, when the loop has taken `sampler_batches`
        batches; `counters`: small values the loop wants back on resume."""
        rank_state = {"rng": rng_state(), "temporal": temporal_state(self.model, torch.device("cpu"))}
        if self.dist.world_size > 1:
            gathered: list = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, pickle.dumps(rank_state), group=self.dist.objects)
            rank_states = [pickle.loads(g) for g in gathered]
        else:
            rank_states = [rank_state]
        if self.dist.main:
            payload = {
                "fingerprint": self.fingerprint,
                "iteration": iteration,
                "sampler_batches": sampler_batches,
                "counters": counters,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rank_states": rank_states,
            }
            save_atomic(self.path, payload)
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def resume(self, max_iters: int) -> dict | None:
        """Load the saved state into the model, optimiser, schedule, scaler and head when `path`
        holds a checkpoint of these settings and this many processes; return its iteration,
        sampler_batches, counters and this rank's RNG state (put back with `set_rng_state` once
        the data iterator exists: creating one draws a seed), or None to start afresh.

        Only rank 0 (on node 0, where the DVC stage runs) reads `path`; it sends every other
        rank the whole state, so nodes without a shared disk resume at the same iteration, and
        a checkpoint another node may hold is never read."""
        ckpt = self._read() if self.dist.main else None
        if self.dist.world_size > 1:
            box = [ckpt]
            torch.distributed.broadcast_object_list(box, src=0, group=self.dist.objects)
            ckpt = box[0]
        if ckpt is None:
            return None
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        ranks = ckpt["rank_states"]
        set_temporal_state(self.model, ranks[self.dist.rank]["temporal"], self.dist.device)
        if self.dist.main:
            print(f"train: resuming from {self.path} at iteration {ckpt['iteration']}/{max_iters}")
        elif self.dist.local_rank == 0:
            print(
                f"train: node {self.dist.node} resumes at iteration {ckpt['iteration']}/{max_iters} (node 0's checkpoint)"
            )
        return {
            "iteration": ckpt["iteration"],
            "sampler_batches": ckpt["sampler_batches"],
            "counters": ckpt["counters"],
            "rng": ranks[self.dist.rank]["rng"],
        }

    def _read(self) -> dict | None:
        """The checkpoint at `path` when it is one of these settings and this many processes."""
        if not self.path.is_file():
            return None
        ckpt = torch.load(self.path, map_location="cpu", weights_only=False)
        if ckpt.get("fingerprint") != self.fingerprint or len(ckpt.get("rank_states") or []) != self.dist.world_size:
            print(f"train: {self.path} belongs to other settings; starting afresh")
            return None
        return ckpt
