"""Device choice (cpu, cuda, Ascend npu), distributed set-up and mixed precision, in one place.

torch_npu is optional: it is imported only when an NPU is asked for or auto-detected
(`import_torch_npu`, which also applies the Ascend port's `torch.npu.config` settings).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# The environment the Ascend port's scripts export, every line of them (DrivingSDK 9c2fb9ea,
# model_examples/Sparse4D/test/train_full_8p.sh and train_performance_8p.sh; its tools/dist_train.sh
# sets OMP_NUM_THREADS and MKL_NUM_THREADS on the torchrun line again). The launcher gives them to
# the NPU workers; a variable already set in the caller's environment wins.
NPU_ENV = {
    "ASCEND_SLOG_PRINT_TO_STDOUT": "0",  # host log not to the terminal
    "ASCEND_GLOBAL_LOG_LEVEL": "3",  # errors only
    "ASCEND_GLOBAL_EVENT_ENABLE": "0",
    "TASK_QUEUE_ENABLE": "2",  # operator dispatch queue, level 2
    "PTCOPY_ENABLE": "1",
    "COMBINED_ENABLE": "1",
    "DYNAMIC_OP": "ADD#MUL",
    "HCCL_WHITELIST_DISABLE": "1",
    "CPU_AFFINITY_CONF": "1",  # bind each process's threads to cores
    "ACLNN_CACHE_LIMIT": "100000",
    "HOST_CACHE_CAPACITY": "20",
    "HCCL_OP_BASE_FFTS_MODE_ENABLE": "TRUE",
    "MULTI_STREAM_MEMORY_REUSE": "1",
    "OMP_NUM_THREADS": "16",
    "MKL_NUM_THREADS": "16",
}
# The port's `torch.npu.config.allow_internal_format` (set at import by its runner module,
# projects/mmdet3d_plugin/utils/epoch_based_runner_with_profiling.py in Sparse4D.patch): tensors keep
# the plain (ND) layout instead of the NPU's private ones.
NPU_ALLOW_INTERNAL_FORMAT = False
# tcmalloc, preloaded into the NPU workers when one is installed: first the seed README's build
# (gperftools configured with --prefix=/usr/local/lib, so the library lands in /usr/local/lib/lib),
# then the distributions' packages.
TCMALLOC_PATHS = (
    "/usr/local/lib/lib/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc.so",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4",
    "/usr/local/lib/libtcmalloc.so",
)


class DeviceError(RuntimeError):
    """The requested device is not available; the message says what is missing."""


def import_torch_npu() -> None:
    """Import torch_npu (ImportError when it is not installed) and apply the port's NPU settings."""
    import torch_npu  # noqa: F401

    config = getattr(getattr(torch, "npu", None), "config", None)
    if config is not None:
        config.allow_internal_format = NPU_ALLOW_INTERNAL_FORMAT


def npu_available() -> bool:
    try:
        import_torch_npu()
    except ImportError:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def resolve_device(requested: str) -> str:
    """auto | npu | cuda | cpu -> the device type to use, or a DeviceError."""
    if requested not in ("auto", "npu", "cuda", "cpu"):
        raise DeviceError(f"train.device: expected auto, npu, cuda or cpu, got {requested!r}")
    if requested == "npu":
        try:
            import_torch_npu()
        except ImportError as err:
            raise DeviceError(
                "train.device is npu but torch_npu is not installed (install CANN and torch_npu, see docs/devices.md)"
            ) from err
        if not torch.npu.is_available():
            raise DeviceError("train.device is npu but no NPU is visible")
        return "npu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("train.device is cuda but no CUDA device is available")
        return "cuda"
    if requested == "auto":
        if npu_available():
            return "npu"
        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def backend_for(device: str) -> str:
    return {"npu": "hccl", "cuda": "nccl"}.get(device, "gloo")


# The node a worker runs on, as the launching stage was told (`--node-rank`; node 0 runs the DVC
# stage), and the address of the workers' process group: node 0's train.master_addr and the port
# after train.master_port (torchrun's rendezvous holds that one). The workers form their group
# there with rank = node x devices + local rank, so global rank 0, which reads the checkpoint
# and writes the stage's outputs, is always on node 0, whatever order the nodes joined in.
NODE_RANK_ENV = "SPARSE4D_NODE_RANK"
GROUP_ADDR_ENV = "SPARSE4D_GROUP_ADDR"


@dataclass(frozen=True)
class Launch:
    """How the workers are started: `devices` processes on each of `nnodes` nodes; this is node
    `node_rank`. torchrun's c10d rendezvous at master_addr:master_port (hosted by node 0) waits
    `join_timeout` seconds for every node and restarts the whole group up to `max_restarts`
    times after a worker fails (each restart resumes from the last checkpoint)."""

    devices: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    join_timeout: int = 600
    max_restarts: int = 0

    @property
    def torchrun(self) -> bool:
        return self.devices * self.nnodes > 1 or self.max_restarts > 0


class LaunchError(DeviceError):
    """The workers did not start or did not meet; the message says which setting to look at."""


def visible_devices(device: str) -> int:
    """How many devices of this type (cuda, npu) the process sees."""
    if device == "cuda":
        return torch.cuda.device_count()
    if device == "npu":
        return torch.npu.device_count()
    raise ValueError(f"visible_devices: {device!r} is not an accelerator")


def resolve_devices(requested: Any, device: str, setting: str) -> int:
    """The number of processes per node: `auto` -> every visible device of the type, one process
    on the CPU; a number of accelerators is checked against what is visible before any process
    starts (a DeviceError naming both numbers). CPU processes are not limited."""
    if device == "cpu":
        return 1 if requested == "auto" else int(requested)
    visible = visible_devices(device)
    if requested == "auto":
        return max(1, visible)
    if int(requested) > visible:
        raise DeviceError(
            f"{setting}: {requested} asked, but this machine has {visible} {device} devices visible "
            f"(set {setting}: auto, or at most {visible})"
        )
    return int(requested)


def run_workers(module: str, args: list[str], device: str, launch: Launch = Launch()) -> int:
    """Run `python -m module args` once, or under torchrun (`worker_command`), with
    `worker_env(device, launch)`; returns the exit code. torchrun's output passes through as it
    comes; when it ends because a node did not join or node 0 could not be reached, a
    LaunchError says so with the settings to check."""
    import subprocess
    import sys

    cmd = worker_command(module, args, launch)
    env = worker_env(device, launch=launch)
    if not launch.torchrun:
        return subprocess.call(cmd, env=env)
    tail = b""
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        while True:
            chunk = proc.stderr.read1(65536) if hasattr(proc.stderr, "read1") else proc.stderr.read(4096)
            if not chunk:
                break
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail = (tail + chunk)[-200_000:]
        code = proc.wait()
    if code != 0:
        _raise_for_rendezvous(tail.decode(errors="replace"), launch)
    return code


def _raise_for_rendezvous(stderr: str, launch: Launch) -> None:
    where = f"{launch.master_addr}:{launch.master_port}"
    others = "python -m stages.train --node-rank K (K = 1 .. train.nnodes - 1)"
    if "RendezvousTimeoutError" in stderr:
        raise LaunchError(
            f"not all {launch.nnodes} nodes joined the rendezvous at {where} within train.join_timeout = "
            f"{launch.join_timeout} s; on every other node run `{others}` on the same commit, params and data"
        )
    if "RendezvousConnectionError" in stderr:
        raise LaunchError(
            f"node {launch.node_rank} could not reach node 0's rendezvous at {where} (train.master_addr, "
            "train.master_port): is node 0 running `dvc repro` (or `dvc exp run`), and is the port open?"
        )


def worker_command(module: str, args: list[str], launch: Launch = Launch()) -> list[str]:
    """The command line of `run_workers`: `python -m module args`, under torchrun (c10d
    rendezvous hosted by node 0, the nodes' number fixed, restarts as asked) when there is more
    than one process or restarts are asked for."""
    import sys

    if not launch.torchrun:
        return [sys.executable, "-m", module, *args]
    host = "1" if launch.node_rank == 0 else "0"
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={launch.devices}", f"--nnodes={launch.nnodes}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={launch.master_addr}:{launch.master_port}",
        f"--rdzv_conf=join_timeout={launch.join_timeout},read_timeout={launch.join_timeout},is_host={host}",
        f"--max_restarts={launch.max_restarts}",
        "-m", module, *args,
    ]  # fmt: skip


def worker_env(device: str, environ: Mapping[str, str] | None = None, launch: Launch = Launch()) -> dict[str, str]:
    """The whole environment of the worker processes: `environ` (default: this process's) with
    `launch_env(device)` added, the node's rank and the workers' group address (NODE_RANK_ENV,
    GROUP_ADDR_ENV), and the repository first on PYTHONPATH."""
    environ = os.environ if environ is None else environ
    env = {**environ, **launch_env(device, environ)}
    env[NODE_RANK_ENV] = str(launch.node_rank)
    env[GROUP_ADDR_ENV] = f"{launch.master_addr}:{launch.master_port + 1}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    return env


def launch_env(device: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the launcher adds to `environ` (default: this process's) for the workers: on an NPU,
    the Ascend port's NPU_ENV (a variable `environ` sets is left as it is) and, unless LD_PRELOAD
    already holds a tcmalloc, the first of TCMALLOC_PATHS that exists, put in front of LD_PRELOAD;
    nothing on other devices."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    if device == "npu":
        env.update({k: v for k, v in NPU_ENV.items() if k not in environ})
        tcmalloc = next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)
        preload = environ.get("LD_PRELOAD", "")
        if tcmalloc and "libtcmalloc" not in preload:  # one allocator: keep one the caller preloads
            env["LD_PRELOAD"] = ":".join(filter(None, [tcmalloc, preload]))
    return env


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    node: int = 0
    # the group for pickled objects (checkpoint state, validation results): gloo, which moves
    # them on the CPU whatever the device's backend; None: the default group
    objects: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, timeout_s: int = 1800) -> Dist:
    """Join the other processes (or run alone) and pick this process's device.

    Started by our launcher (`run_workers`), the workers form their group at GROUP_ADDR_ENV with
    rank = node x local world size + local rank (node 0 holds rank 0); started by a plain
    torchrun, they take torchrun's ranks (env://)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank = int(os.environ.get("RANK", "0"))
    node = int(os.environ.get(NODE_RANK_ENV, os.environ.get("GROUP_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif device_type == "npu":
        torch.npu.set_device(local_rank)
        device = torch.device("npu", local_rank)
    else:
        device = torch.device("cpu")
    objects = None
    if world_size > 1 and not torch.distributed.is_initialized():
        import datetime

        backend, timeout = backend_for(device_type), datetime.timedelta(seconds=timeout_s)
        if GROUP_ADDR_ENV in os.environ:
            rank = node * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) + local_rank
            torch.distributed.init_process_group(
                backend, init_method=f"tcp://{os.environ[GROUP_ADDR_ENV]}", rank=rank, world_size=world_size,
                timeout=timeout,
            )  # fmt: skip
        else:
            torch.distributed.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        if backend != "gloo":
            objects = torch.distributed.new_group(backend="gloo")
    elif world_size > 1:
        rank = torch.distributed.get_rank()
    return Dist(rank, local_rank, world_size, device, node, objects)


def to_device(obj: Any, device: torch.device, non_blocking: bool = False, copy: bool = False) -> Any:
    """`obj` with every tensor in it (nested dicts, lists, tuples) on `device`: the batch to the
    training device, the temporal state to the CPU for a checkpoint and back. The containers are
    new; with copy=True the tensors are too, even where they are already on `device` (a snapshot
    that later in-place changes cannot reach). Everything else is shared."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking, copy=copy)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking, copy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking, copy) for v in obj)
    return obj


def resolve_precision(precision: str, device_type: str) -> str:
    """train.precision / evaluate.precision: `auto` is fp16 on NPU and CUDA (the reference's fp16
    config and test script), fp32 on the CPU; fp32, fp16 and bf16 as written."""
    if precision == "auto":
        return "fp16" if device_type in ("cuda", "npu") else "fp32"
    return precision


def amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of the model's image features: fp16 on cuda/npu, bf16 anywhere when
    asked, else None (fp32). See `Sparse4D.set_mixed_precision`."""
    if precision == "fp16" and device.type in ("cuda", "npu"):
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return None


def grad_scaler(device: torch.device, precision: str, init_scale: float = 32.0):
    """Loss scaling for fp16 (the reference's static loss scale 32: pass it to `update` every
    step; or dynamic from `init_scale`); disabled otherwise."""
    enabled = precision == "fp16" and device.type in ("cuda", "npu")
    if device.type == "npu" and enabled:
        from torch_npu.npu.amp import GradScaler as NpuGradScaler

        return NpuGradScaler(init_scale=init_scale)
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type if enabled else "cpu", init_scale=init_scale, enabled=enabled)
    return torch.cuda.amp.GradScaler(init_scale=init_scale, enabled=enabled)
