"""Training on several nodes as the README documents it, with two "nodes" on 127.0.0.1: two
copies of the project (no shared disk), node 0 running `dvc repro`, node 1 running
`python -m stages.train --node-rank 1`, one CPU process each. The weights equal a single-node
2-process run's; after kill -9 of both nodes the two commands resume at the same iteration and
end with the same weights; a killed worker with train.max_restarts 1 brings the group back."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.devices import DeviceError, resolve_devices
from tests.conftest import ROOT
from tests.test_train import tiny_params

ITERATIONS = 8


def free_port() -> int:
    """A port whose next one is free too (the rendezvous and the workers' group)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def env() -> dict[str, str]:
    """One thread per process, as torchrun gives each of several processes on one node (it leaves
    a lone process's threads alone): the CPU kernels' sums then split the same way everywhere,
    and the two "nodes" do not compete for the cores."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}


def set_train(project: Path, **train) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["train"].update(train)
    path.write_text(yaml.safe_dump(params))


def node0(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-s", *args, "train"],
        cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def node(project: Path, rank: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--node-rank", str(rank)],
        cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def finish(*procs: subprocess.Popen, timeout: float = 600) -> list[str]:
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-4000:]
        outputs.append(out)
    return outputs


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(got: Path, expected: dict[str, torch.Tensor]) -> None:
    state = weights(got)
    assert state.keys() == expected.keys()
    different = [k for k in state if not torch.equal(state[k], expected[k])]
    assert not different, f"{len(different)} of {len(state)} tensors differ, e.g. {different[:3]}"


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    start = time.monotonic()
    while not path.is_file():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"ended before {path} was written: {proc.stdout.read()[-3000:]}")
        assert time.monotonic() - start < timeout, f"no {path} after {timeout} s"
        time.sleep(0.05)


def files_of(project: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(project)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in project.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def checkpoint_iteration(project: Path) -> int:
    path = project / "runs" / "train" / "checkpoints" / "latest.pth"
    return int(torch.load(path, map_location="cpu", weights_only=False)["iteration"])


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two copies of a git + DVC project with a tiny twin, its infos and anchors (each node has its
    own data, as without a shared disk), and the weights of a single-node 2-process run."""
    import psutil  # noqa: F401  (DVC's dependency; the restart test finds the worker with it)

    from tests.conftest import copy_tracked_files

    a = tmp_path_factory.mktemp("node0") / "project"
    copy_tracked_files(a)
    params = tiny_params(iterations=ITERATIONS, checkpoint_interval=2, total_batch_size=2)
    params["synthesize"].update(
        num_scenes=3, samples_per_scene=3, objects_per_scene=30, image_width=640, image_height=360
    )
    params["anchors"]["num_anchor"] = 20
    (a / "params.yaml").write_text(yaml.safe_dump(params))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        [*git, "commit", "-qm", "project"],
        [sys.executable, "-m", "dvc", "repro", "anchors", "fingerprint", "backbone"],
    ):
        result = subprocess.run(cmd, cwd=a, capture_output=True, text=True, env=env())
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    b = tmp_path_factory.mktemp("node1") / "project"
    shutil.copytree(a, b, symlinks=True)

    # the single-node reference: 2 processes on one node, in a third place
    ref = a / "runs" / "single"
    set_train(a, devices=2, nnodes=1, master_port=free_port())
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", "--out", str(ref), "--metrics", str(ref / "train.json"),
         "--live", str(ref / "live")],
        cwd=a, capture_output=True, text=True, env=env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference = weights(ref / "model.pth")
    shutil.rmtree(ref)
    return a, b, reference


def two_nodes(a: Path, b: Path, **train) -> None:
    port = free_port()
    for project in (a, b):
        set_train(project, devices=1, nnodes=2, master_port=port, join_timeout=120, **train)


@pytest.mark.slow
def test_two_nodes_train_as_one_node_with_two_devices(nodes):
    a, b, reference = nodes
    two_nodes(a, b)
    before = files_of(b)
    out0, out1 = finish(node0(a), node(b, 1))
    assert_same_weights(a / "runs" / "train" / "model.pth", reference)
    assert yaml.safe_load((a / "metrics" / "train.json").read_text())["world_size"] == 2
    # node 1 writes nothing in its project: no DVC output, no checkpoint
    assert files_of(b) == before
    # DVC on node 0 recorded the run
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "train"], cwd=a, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + out0[-2000:]


@pytest.mark.slow
def test_both_nodes_killed_resume_at_the_same_iteration_and_end_with_the_same_weights(nodes):
    a, b, reference = nodes
    shutil.rmtree(a / "runs" / "train" / "checkpoints", ignore_errors=True)
    two_nodes(a, b)
    procs = [node0(a, "-f"), node(b, 1)]
    wait_for(a / "runs" / "train" / "checkpoints" / "latest.pth", procs)
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    stopped_at = checkpoint_iteration(a)
    assert stopped_at < ITERATIONS and not (a / "runs" / "train" / "model.pth").exists()

    out0, out1 = finish(node0(a), node(b, 1))
    resumed0 = re.findall(r"resuming from \S+ at iteration (\d+)/", out0)
    resumed1 = re.findall(r"node 1 resumes at iteration (\d+)/", out1)
    assert resumed0 and resumed0 == resumed1, (out0[-2000:], out1[-2000:])
    assert int(resumed0[0]) >= stopped_at
    assert_same_weights(a / "runs" / "train" / "model.pth", reference)


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(nodes):
    import psutil

    a, b, reference = nodes
    shutil.rmtree(a / "runs" / "train" / "checkpoints", ignore_errors=True)
    two_nodes(a, b, max_restarts=1)
    procs = [node0(a, "-f"), node(b, 1)]
    wait_for(a / "runs" / "train" / "checkpoints" / "latest.pth", procs)
    workers = [  # the training process itself: not torchrun's helper (pt_elastic), which has it as a child
        p
        for p in psutil.Process(procs[1].pid).children(recursive=True)
        if "pipeline.train" in " ".join(p.cmdline()) and not p.children()
    ]
    assert len(workers) == 1
    workers[0].kill()
    out0, out1 = finish(*procs)
    assert "node 1 resumes at iteration" in out1, out1[-3000:]
    assert_same_weights(a / "runs" / "train" / "model.pth", reference)


def stage_alone(tmp_path: Path, *args: str, **train) -> subprocess.CompletedProcess:
    """The train stage with tiny params changed by `train`, where no other node will come."""
    params = tiny_params(**train)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.train", "--params", str(tmp_path / "params.yaml"), *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={**env(), "PYTHONPATH": str(ROOT)})


def test_node_0_stops_when_a_node_does_not_join_in_time(tmp_path):
    result = stage_alone(tmp_path, nnodes=2, master_port=free_port(), join_timeout=2)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("train: not all 2 nodes joined the rendezvous at 127.0.0.1:") and "join_timeout = 2 s" in last
    )
    assert "python -m stages.train --node-rank K" in last


def test_another_node_says_when_node_0_cannot_be_reached(tmp_path):
    result = stage_alone(tmp_path, "--node-rank", "1", nnodes=2, master_port=free_port(), join_timeout=2)
    assert result.returncode == 2
    assert "train: node 1 could not reach node 0's rendezvous" in result.stderr.strip().splitlines()[-1]


def test_a_node_rank_outside_the_nodes_stops_before_any_process(tmp_path):
    result = stage_alone(tmp_path, "--node-rank", "2", nnodes=2)
    assert result.returncode == 2
    assert result.stderr.strip() == "train: --node-rank: 2 is not a node of train.nnodes = 2 (0 .. 1)"


def test_devices_auto_takes_what_the_machine_has(monkeypatch):
    assert resolve_devices("auto", "cpu", "evaluate.devices") == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_devices("auto", "cuda", "evaluate.devices") == 4
    assert resolve_devices(2, "cuda", "train.devices") == 2
    with pytest.raises(DeviceError, match="train.devices: 8 asked, but this machine has 4 cuda devices"):
        resolve_devices(8, "cuda", "train.devices")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceError, match="evaluate.devices: 1 asked, but this machine has 0 cuda"):
        resolve_devices(1, "cuda", "evaluate.devices")
    assert resolve_devices(3, "cpu", "train.devices") == 3  # CPU processes: as many as asked
