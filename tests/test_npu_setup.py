"""The Ascend port's NPU set-up, checked without an NPU: the environment and command line the
launcher gives the workers, torch_npu's allow_internal_format, the loader and batch of the seed's
profiles (DrivingSDK 9c2fb9ea, model_examples/Sparse4D)."""

from __future__ import annotations

import io
import os
import sys
import types

import numpy as np
import pytest
import torch
import yaml

from pipeline import devices
from pipeline.devices import (
    NPU_ENV,
    DeviceError,
    Dist,
    Launch,
    launch_env,
    resolve_device,
    run_workers,
    worker_command,
    worker_env,
)
from tests.conftest import ROOT

# The exports of the seed's test/train_performance_8p.sh (the same in train_full_8p.sh), as written there.
SEED_EXPORTS = """
export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export ASCEND_GLOBAL_EVENT_ENABLE=0
export TASK_QUEUE_ENABLE=2
export PTCOPY_ENABLE=1
export COMBINED_ENABLE=1
export DYNAMIC_OP="ADD#MUL"
export HCCL_WHITELIST_DISABLE=1
export CPU_AFFINITY_CONF=1
export ACLNN_CACHE_LIMIT=100000
export HOST_CACHE_CAPACITY=20
export HCCL_OP_BASE_FFTS_MODE_ENABLE=TRUE
export MULTI_STREAM_MEMORY_REUSE=1
export OMP_NUM_THREADS=16
export MKL_NUM_THREADS=16
"""
# gperftools built as the seed's README says (./configure --prefix=/usr/local/lib), then LD_PRELOAD.
SEED_TCMALLOC = "/usr/local/lib/lib/libtcmalloc.so.4"


def seed_exports() -> dict[str, str]:
    pairs = (line.split("export ", 1)[1].split("=", 1) for line in SEED_EXPORTS.strip().splitlines())
    return {key: value.strip('"') for key, value in pairs}


@pytest.fixture
def only_the_seeds_tcmalloc(monkeypatch):
    """A machine where the seed's tcmalloc is installed and no other."""
    real = os.path.exists
    monkeypatch.setattr(devices.os.path, "exists", lambda p: p == SEED_TCMALLOC or (real(p) and "tcmalloc" not in p))


def test_npu_workers_get_every_export_of_the_seeds_scripts_and_its_tcmalloc(only_the_seeds_tcmalloc):
    assert NPU_ENV == seed_exports()
    env = launch_env("npu", environ={"PATH": "/bin"})
    assert env == {**seed_exports(), "LD_PRELOAD": SEED_TCMALLOC}
    assert env["HOST_CACHE_CAPACITY"] == "20" and env["MKL_NUM_THREADS"] == "16" and env["OMP_NUM_THREADS"] == "16"
    full = worker_env("npu", environ={"PATH": "/bin", "PYTHONPATH": "/elsewhere"})
    assert full["PATH"] == "/bin" and full["PYTHONPATH"] == f"{ROOT}{os.pathsep}/elsewhere"
    assert {k: full[k] for k in env} == env


def test_the_callers_settings_win_and_one_tcmalloc_is_preloaded(only_the_seeds_tcmalloc):
    env = launch_env("npu", environ={"OMP_NUM_THREADS": "4", "LD_PRELOAD": "/opt/libfoo.so"})
    assert "OMP_NUM_THREADS" not in env and env["MKL_NUM_THREADS"] == "16"
    assert env["LD_PRELOAD"] == f"{SEED_TCMALLOC}:/opt/libfoo.so"
    assert worker_env("npu", environ={"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"
    assert "LD_PRELOAD" not in launch_env("npu", environ={"LD_PRELOAD": "/usr/lib64/libtcmalloc.so"})


def test_no_tcmalloc_no_preload_and_nothing_added_off_the_npu(monkeypatch):
    monkeypatch.setattr(devices.os.path, "exists", lambda p: False)
    assert launch_env("npu", environ={}) == seed_exports()
    for device in ("cpu", "cuda"):
        assert launch_env(device, environ={}) == {}
        env = worker_env(device, environ={"A": "1"})
        assert {k: v for k, v in env.items() if not k.startswith("SPARSE4D_")} == {"A": "1", "PYTHONPATH": str(ROOT)}


def test_the_launcher_runs_torchrun_with_that_environment(only_the_seeds_tcmalloc, monkeypatch):
    assert worker_command("pipeline.train", ["--x", "1"]) == [sys.executable, "-m", "pipeline.train", "--x", "1"]
    launch = Launch(devices=8, master_port=29512)
    cmd = worker_command("pipeline.train", ["--x", "1"], launch)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[-4:] == ["-m", "pipeline.train", "--x", "1"]
    assert {"--nproc_per_node=8", "--nnodes=1", "--rdzv_endpoint=127.0.0.1:29512", "--max_restarts=0"} <= set(cmd)
    calls = []

    class Proc:  # subprocess.Popen as run_workers uses it: a context, stderr read to its end
        def __init__(self, cmd, env, stderr):
            calls.append((cmd, env))
            self.stderr = io.BytesIO(b"")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait(self):
            return 0

    monkeypatch.setattr("subprocess.Popen", Proc)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("HOST_CACHE_CAPACITY", raising=False)
    assert run_workers("pipeline.train", ["--x", "1"], "npu", launch) == 0
    ((got_cmd, got_env),) = calls
    assert got_cmd == cmd and got_env["HOST_CACHE_CAPACITY"] == "20" and got_env["LD_PRELOAD"] == SEED_TCMALLOC


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """torch_npu as far as the device choice sees it: importable, one NPU, its config."""
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    npu = types.SimpleNamespace(config=types.SimpleNamespace(allow_internal_format=True), is_available=lambda: True)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return npu


@pytest.mark.parametrize("requested", ["npu", "auto"])
def test_using_torch_npu_turns_off_its_internal_formats(fake_torch_npu, requested):
    assert resolve_device(requested) == "npu"
    assert fake_torch_npu.config.allow_internal_format is False


def test_without_torch_npu_nothing_is_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu raises ImportError
    with pytest.raises(DeviceError, match="torch_npu is not installed"):
        resolve_device("npu")
    assert resolve_device("cpu") == "cpu"


def profile(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["params-full.yaml", "params-performance.yaml"])
def test_the_seed_profiles_load_as_the_port(name):
    """6 loader processes per device (the reference's workers_per_gpu = batch 6), pinned memory and
    persistent workers (the port's apis/mmdet_train.py), 6 per device on 8 devices."""
    tp = profile(name)["train"]
    assert (tp["num_workers"], tp["pin_memory"], tp["persistent_workers"]) == (6, True, True)
    assert (tp["devices"] * tp["nnodes"], tp["total_batch_size"]) == (8, 48)


def test_the_performance_profile_is_the_seeds_performance_run():
    """test/train_performance_8p.sh: batch 6 x 8, stopped at iteration 1000 (brake_at(1000)), no
    validation; no checkpoint inside the timed iterations."""
    tp = profile("params-performance.yaml")["train"]
    assert (tp["iterations"], tp["eval_interval"]) == (1000, 0)
    assert tp["checkpoint_interval"] >= tp["iterations"]


def test_the_demo_keeps_loading_in_the_training_process():
    tp = profile("params.yaml")["train"]
    assert (tp["num_workers"], tp["pin_memory"], tp["persistent_workers"]) == (0, False, False)


class FakeDataset:
    flag = np.arange(96) // 2  # 48 sequences of 2 frames: enough for a global batch of 48

    def get_augmentation(self) -> dict:
        return {}

    def __len__(self) -> int:
        return len(self.flag)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 6 workers on this machine's cores
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_loader_pins_for_an_accelerator_only(device):
    from pipeline.train import training_loader

    params = profile("params-full.yaml")
    dist = Dist(0, 0, 8, torch.device(device))
    loader = training_loader(FakeDataset(), params, dist, 6, skip=0)
    assert (loader.num_workers, loader.persistent_workers) == (6, True)
    assert loader.pin_memory is (device != "cpu")
