"""Training: resume after kill -9 equals an uninterrupted run, a small checkpoint, the learning-rate
schedule, non-finite steps, clear errors, validation during training, and a 2-process gloo DDP
run through `dvc repro train`, all on a tiny configuration."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.anchors import kmeans_anchors
from pipeline.convert import convert
from pipeline.devices import DeviceError
from pipeline.live import VAL_METRICS
from pipeline.schedule import adamw, advance_schedule, lr_factor, lr_schedule
from pipeline.settings import CLASSES
from pipeline.train import TrainError, train
from tests.conftest import ROOT, launch_stage

TINY_MODEL = dict(
    depth=18, with_cp=False, embed_dims=32, num_groups=2, num_decoder=2, num_single_frame_decoder=1,
    num_temp_instances=10, num_dn_groups=1, num_temp_dn_groups=1, max_dn_gt=8, num_depth_layers=1, use_grid_mask=True,
    classes=list(CLASSES),
)  # fmt: skip
TINY_AUG = dict(H=360, W=640, final_dim=[64, 176], resize_lim=[0.27, 0.3], bot_pct_lim=[0.0, 0.0], rot_lim=[-5.4, 5.4], rand_flip=True, rot3d_range=[-0.3925, 0.3925])  # fmt: skip


def tiny_params(**train) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(TINY_MODEL)
    # the data settings' code defaults before they were params: photometric distortion, exact images
    params["data"].update(aug=dict(TINY_AUG), sequences_split_num=2, photometric=True, fast_images=False)
    params["train"].update(
        device="cpu", devices=1, total_batch_size=2, iterations=6, warmup_iters=2, checkpoint_interval=2, num_workers=0
    )
    params["train"].update(train)
    return params


@pytest.fixture(scope="module")
def workspace(small_twin, tmp_path_factory):
    """The small twin's root (cwd of the runs) with train and val infos and 20 anchors."""
    root = small_twin.parent.parent
    cwd = os.getcwd()
    os.chdir(root)
    try:
        splits = convert("data/nuscenes", "v1.0-mini")
    finally:
        os.chdir(cwd)
    import pickle

    infos = splits["train"]
    (root / "data" / "infos").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        with open(root / "data" / "infos" / f"{split}.pkl", "wb") as f:
            pickle.dump(splits[split], f)
    boxes = np.concatenate([i["gt_boxes"] for i in infos["infos"]])
    np.save(root / "data" / "anchors.npy", kmeans_anchors(boxes, 20, 55.0, 0)[0])
    return root


def run_train(workspace: Path, out: Path, params: dict, val_infos: str = "data/infos/val.pkl") -> dict:
    return train(
        params,
        "data/infos/train.pkl",
        "data/anchors.npy",
        "ckpt/none.json",
        str(out),
        str(out / "train.json"),
        str(out / "live"),
        val_infos,
    )


def test_resume_after_kill_equals_an_uninterrupted_run(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(workspace)
    params = tiny_params(log_interval=2)
    summary = run_train(workspace, tmp_path / "straight", params)
    assert summary["iterations"] == 6 and summary["step_time_s"] > 0 and summary["samples_per_s"] > 0
    # an iteration's interval holds its step, and more (logging, checkpoints)
    assert summary["iter_time_s"] >= summary["step_time_s"] - 1e-4
    assert summary["fps"] == pytest.approx(2 / summary["iter_time_s"], rel=1e-3)
    history = json.loads((tmp_path / "straight" / "train.json").read_text())
    assert history["world_size"] == 1 and history["device"] == "cpu"
    assert (tmp_path / "straight" / "live" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    # the plain-text log a user attaches to an issue: what runs, then a line every log_interval iterations
    log = (tmp_path / "straight" / "train.log").read_text()
    assert "train: cpu, 1 process(es) on 1 node(s), global batch 2 (2 per process), 6 iterations" in log
    assert "train: lr 0.002, backbone lr 0.001" in log and "started at iteration 0" in log
    assert [int(i) for i in re.findall(r"iteration (\d+)/6  loss ", log)] == [2, 4, 6]
    assert "train: done" in log

    # The same run in a process killed with SIGKILL once the first checkpoint is on disk, then rerun.
    out = tmp_path / "killed"
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    args = [
        "--params",
        str(params_path),
        "--infos",
        "data/infos/train.pkl",
        "--anchors",
        "data/anchors.npy",
        "--backbone",
        "ckpt/none.json",
    ]
    args += ["--out", str(out), "--metrics", str(out / "train.json"), "--live", str(out / "live")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = out / "checkpoints" / "latest.pth"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists()
    assert not (out / "model.pth").exists()
    done = subprocess.run([sys.executable, "-m", "pipeline.train", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    a = torch.load(tmp_path / "straight" / "model.pth", weights_only=False)["state_dict"]
    b = torch.load(out / "model.pth", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the log goes on where the killed run left it
    log = (out / "train.log").read_text()
    assert [int(i) for i in re.findall(r"iteration (\d+)/6  loss ", log)] == [2, 4, 6]
    assert re.search(r"train: resumed from \S+latest.pth at iteration [24]", log), log
    # the summary covers the whole run, the iterations before the kill included
    resumed = json.loads((out / "train.json").read_text())
    assert resumed["iterations"] == 6 and resumed["final_loss"] == history["final_loss"]


def test_the_checkpoint_holds_no_images(workspace, tmp_path, monkeypatch):
    """Besides the model and optimiser, latest.pth holds small state: of the previous batch only
    the timestamps and poses the instance bank reads (no image, depth map or projection), and no
    record per iteration."""
    monkeypatch.chdir(workspace)
    params = tiny_params(iterations=2)
    run_train(workspace, tmp_path, params)
    ckpt = torch.load(tmp_path / "checkpoints" / "latest.pth", weights_only=False)
    assert ckpt["iteration"] == 2 and ckpt["sampler_batches"] == 2
    view = 3 * params["data"]["aug"]["final_dim"][0] * params["data"]["aug"]["final_dim"][1]  # one camera image

    def arrays(obj, where=""):
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            yield where, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from arrays(v, f"{where}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from arrays(v, f"{where}/{i}")

    rest = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    sizes = {where: (a.numel() if isinstance(a, torch.Tensor) else a.size) for where, a in arrays(rest)}
    assert sum(sizes.values()) < view, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    metas = ckpt["rank_states"][0]["temporal"]["bank"]["metas"]
    assert set(metas) == {"timestamp", "img_metas"}
    assert not any(isinstance(v, list) and len(v) >= 2 for v in ckpt["counters"].values())


def test_the_running_summary_reports_the_whole_run_across_a_resume():
    """metrics/train.json from the running summary (saved and loaded half-way, as on resume)
    equals the figures of every iteration's record: step time without the first 5 iterations
    (the first one for runs of up to 10), the mean of the last 10 finite losses."""
    from pipeline.live import RunningSummary

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 10, 11, 30):
        times, losses = rng.uniform(0.5, 2.0, n).tolist(), rng.uniform(5, 12, n).tolist()
        if n > 3:
            losses[-2] = float("nan")
        summary = RunningSummary()
        for i in range(n):
            if i == n // 2:
                state = summary.state_dict()
                summary = RunningSummary()
                summary.load_state_dict(state)
            summary.add(i + 1, losses[i], times[i])
        got = summary.result(4, 2, "cpu", 1)
        skip = 5 if n > 10 else min(1, n - 1)
        tail = [x for x in losses[-10:] if np.isfinite(x)]
        assert got["step_time_s"] == pytest.approx(np.mean(times[skip:]), abs=1e-4), n
        assert got["final_loss"] == pytest.approx(np.mean(tail), abs=1e-4), n
        assert (got["iterations"], got["global_batch"], got["world_size"], got["nonfinite_steps"]) == (n, 4, 2, 1)


def test_iter_time_is_the_seeds_step_time_on_a_fake_timeline():
    """iter_time_s is mmcv's per-iteration `time` averaged as the seed's train_performance_8p.sh:
    from one iteration's end to the next (the gap between two steps, logging and a checkpoint
    say, included), every iteration but the first; a resumed process leaves out its own first
    one too. fps = global batch / iter_time_s; step_time_s keeps timing the step alone."""
    from pipeline.live import RunningSummary

    # 6 iterations: each step takes 1 s, and iteration 4 also waits 3 s for a checkpoint or a slow batch
    ends = [10.0, 11.5, 13.0, 17.5, 19.0, 20.5]  # iteration ends; the first started at 0 (start-up)
    summary = RunningSummary()
    for i, end in enumerate(ends):
        summary.add(i + 1, 1.0, 1.0)
        summary.end_iteration(end)
    got = summary.result(48, 8, "npu", 0)
    assert got["iter_time_s"] == pytest.approx((20.5 - 10.0) / 5) and got["fps"] == pytest.approx(48 / 2.1, abs=1e-4)
    assert got["step_time_s"] == 1.0 and got["samples_per_s"] == 48.0

    # the same run killed after iteration 3 and resumed: the new process's first interval (start-up,
    # from 100 to 104) is not counted, the saved intervals are
    summary = RunningSummary()
    for i, end in enumerate(ends[:3]):
        summary.add(i + 1, 1.0, 1.0)
        summary.end_iteration(end)
    state = summary.state_dict()
    summary = RunningSummary()
    summary.load_state_dict(state)
    for i, end in enumerate([104.0, 105.5, 107.0]):
        summary.add(i + 4, 1.0, 1.0)
        summary.end_iteration(end)
    assert summary.result(48, 8, "npu", 0)["iter_time_s"] == pytest.approx((1.5 + 1.5 + 1.5 + 1.5) / 4)

    one = RunningSummary()
    one.add(1, 1.0, 1.0)
    one.end_iteration(3.0)
    assert one.result(2, 1, "cpu", 0)["iter_time_s"] is None and one.result(2, 1, "cpu", 0)["fps"] is None


def test_ddp_leaves_each_ranks_buffers_as_the_reference(workspace, monkeypatch):
    """More than one process: DistributedDataParallel with broadcast_buffers=False, as the reference
    and the Ascend port wrap the model (apis/mmdet_train.py)."""
    import pipeline.train as train_module
    from pipeline.devices import Dist

    monkeypatch.chdir(workspace)
    wrapped = {}

    def fake_ddp(model, **kwargs):
        wrapped.update(kwargs)
        return model

    monkeypatch.setattr(train_module, "init_distributed", lambda device: Dist(0, 0, 2, torch.device("cpu")))
    monkeypatch.setattr(train_module, "same_run_everywhere", lambda *args: None)  # no other process to ask
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", fake_ddp)
    train_module.build_run(tiny_params(), "data/infos/train.pkl", "data/anchors.npy", "ckpt/none.json", "")
    assert wrapped == {"device_ids": None, "broadcast_buffers": False}


def test_a_node_with_other_settings_or_code_stops_the_run_naming_it(monkeypatch):
    """Each node has its own copy of the project: before the first step every process compares
    its run fingerprint (settings, inputs, code) with rank 0's."""
    from pipeline.devices import Dist
    from pipeline.train import same_run_everywhere

    every = [("aaaa", 0, "host-a"), ("aaaa", 0, "host-a"), ("bbbb", 1, "host-b"), ("aaaa", 1, "host-b")]

    def all_gather_object(out, obj, group=None):
        out[:] = every

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    dist = Dist(3, 1, 4, torch.device("cpu"), node=1)
    with pytest.raises(TrainError, match=r"node 1 \(host-b, rank 2\) has other settings, inputs or code than node 0"):
        same_run_everywhere("aaaa", dist, ["data/infos/train.pkl", "data/anchors.npy"])
    every[2] = ("aaaa", 1, "host-b")
    same_run_everywhere("aaaa", dist, ["data/infos/train.pkl", "data/anchors.npy"])


def test_the_schedule_is_the_cosine_with_warm_up_and_resumes():
    """The LambdaLR schedule of the demo's settings gives, at every iteration, the learning rates
    of the formula (train.lr x lr_factor, the backbone's x train.backbone_lr_mult), bit for bit,
    also after its state is saved and loaded half-way."""
    tp = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    lr, mult, iters = float(tp["lr"]), float(tp["backbone_lr_mult"]), int(tp["iterations"])
    shape = (iters, int(tp["warmup_iters"]), float(tp["warmup_ratio"]), float(tp["min_lr_ratio"]))

    def schedule():
        model = torch.nn.ModuleDict({"img_backbone": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2)})
        optimizer = adamw(model, lr, mult, float(tp["weight_decay"]))
        return optimizer, lr_schedule(optimizer, *shape)

    optimizer, scheduler = schedule()
    for it in range(iters):
        if it == iters // 2:  # continue in a fresh optimiser and schedule from their saved state
            states = optimizer.state_dict(), scheduler.state_dict()
            optimizer, scheduler = schedule()
            optimizer.load_state_dict(states[0])
            scheduler.load_state_dict(states[1])
        factor = lr_factor(it, *shape)
        assert [g["lr"] for g in optimizer.param_groups] == [lr * factor * mult, lr * factor], it
        assert scheduler.get_last_lr()[-1] == lr * factor, it  # the logged train/lr
        advance_schedule(scheduler)
    assert lr_factor(0, *shape) == pytest.approx(float(tp["warmup_ratio"]), rel=1e-4)
    assert lr_factor(iters, *shape) == pytest.approx(float(tp["min_lr_ratio"]))


def test_validation_logs_accuracy_curves_and_leaves_the_weights_unchanged(workspace, tmp_path, monkeypatch):
    """train.eval_interval 2 over 5 iterations: the val split is scored after iterations 2 and 4,
    mAP, NDS and the TP errors land in the DVCLive curves at those steps, the devkit's files are
    gone afterwards, and the final weights equal those of the same run without validation (the
    instance bank's cache, the denoising queries and every RNG are put back). Inference draws no
    random numbers today; here it draws from every RNG, as a change of the data path could."""
    import random

    import pipeline.evaluate

    monkeypatch.chdir(workspace)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real_validate = pipeline.evaluate.validate

    def drawing_validate(*args, **kwargs):
        torch.rand(3), np.random.rand(3), random.random()
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(pipeline.evaluate, "validate", drawing_validate)
    run_train(workspace, tmp_path / "plain", tiny_params(iterations=5))
    run_train(workspace, tmp_path / "validated", tiny_params(iterations=5, eval_interval=2))

    curves = tmp_path / "validated" / "live" / "plots" / "metrics" / "val"
    for key in VAL_METRICS:
        rows = list(csv.DictReader((curves / f"{key}.tsv").read_text().splitlines(), delimiter="\t"))
        steps = [int(row["step"]) for row in rows]
        values = [float(row[key]) for row in rows]
        assert steps == [2, 4], (key, steps)
        assert all(0.0 <= v <= (1.0 if key in ("mAP", "NDS") else 10.0) for v in values), (key, values)
    summary = json.loads((tmp_path / "validated" / "live" / "metrics.json").read_text())
    assert set(VAL_METRICS) <= set(summary["val"])
    assert not (tmp_path / "plain" / "live" / "plots" / "metrics" / "val").exists()
    assert list(scratch.iterdir()) == []

    a = torch.load(tmp_path / "plain" / "model.pth", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "validated" / "model.pth", weights_only=False)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_non_finite_steps_are_skipped_then_abort(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(workspace)
    from model.detector import Sparse4D

    original = Sparse4D.forward_train
    calls = {"n": 0}

    def first_step_nan(self, data):
        losses = original(self, data)
        calls["n"] += 1
        if calls["n"] == 1:
            losses["loss_nan"] = torch.tensor(float("nan"), requires_grad=True)
        return losses

    monkeypatch.setattr(Sparse4D, "forward_train", first_step_nan)
    summary = run_train(workspace, tmp_path / "one", tiny_params(iterations=3))
    assert summary["nonfinite_steps"] == 1 and summary["iterations"] == 3

    def always_nan(self, data):
        losses = original(self, data)
        losses["loss_nan"] = torch.tensor(float("nan"), requires_grad=True)
        return losses

    monkeypatch.setattr(Sparse4D, "forward_train", always_nan)
    with pytest.raises(TrainError, match="3 consecutive"):
        run_train(workspace, tmp_path / "all", tiny_params(iterations=6, max_nonfinite_steps=3))
    assert not (tmp_path / "all" / "model.pth").exists()


def test_photometric_distortion_follows_data_photometric(workspace, tmp_path, monkeypatch):
    """`data.photometric: false` (the demo: the twin's classes are told by hue) trains without
    mmdet's PhotoMetricDistortion; true (the seed) applies it to every training view."""
    import pipeline.dataset

    monkeypatch.chdir(workspace)
    calls = []
    real = pipeline.dataset.photometric_distortion
    monkeypatch.setattr(pipeline.dataset, "photometric_distortion", lambda img, rng: calls.append(1) or real(img, rng))
    for photometric, expect_calls in ((False, False), (True, True)):
        calls.clear()
        params = tiny_params(iterations=1)
        params["data"]["photometric"] = photometric
        run_train(workspace, tmp_path / str(photometric), params)
        assert bool(calls) is expect_calls, photometric
    assert len(calls) % 6 == 0  # all six views of a sample


def test_errors_name_what_is_wrong(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(workspace)
    with pytest.raises(TrainError, match="missing.pkl"):
        train(
            tiny_params(),
            "data/missing.pkl",
            "data/anchors.npy",
            "x.json",
            str(tmp_path),
            str(tmp_path / "m.json"),
            str(tmp_path / "l"),
        )
    with pytest.raises(TrainError, match="nope.npy"):
        train(
            tiny_params(),
            "data/infos/train.pkl",
            "data/nope.npy",
            "x.json",
            str(tmp_path),
            str(tmp_path / "m.json"),
            str(tmp_path / "l"),
        )
    with pytest.raises(TrainError, match="no-val.pkl"):
        run_train(workspace, tmp_path, tiny_params(eval_interval=2), val_infos="data/no-val.pkl")
    if not hasattr(torch, "npu"):
        with pytest.raises(DeviceError, match="torch_npu"):
            run_train(workspace, tmp_path, tiny_params(device="npu"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(devices=2, total_batch_size=3)))
    result = launch_stage("train", "--params", str(params))
    assert result.returncode == 2 and "train.total_batch_size: 3 is not divisible by 2 devices" in result.stderr


@pytest.mark.slow
def test_two_process_ddp_through_dvc_repro_train(tmp_path):
    """`dvc repro train` in a copy of the project with a tiny twin and 2 gloo processes, validating
    on the val split after the last iteration (both processes infer, rank 0 logs)."""
    work = tmp_path / "project"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    params = tiny_params(devices=2, total_batch_size=2, iterations=3, eval_interval=3)
    params["synthesize"].update(
        num_scenes=3, samples_per_scene=3, objects_per_scene=30, image_width=640, image_height=360
    )
    params["anchors"]["num_anchor"] = 20
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    commands = [
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        [*git, "commit", "-qm", "project"],
        [sys.executable, "-m", "dvc", "repro", "train"],
        [sys.executable, "-m", "dvc", "metrics", "show"],
    ]
    for cmd in commands:
        result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step_time_s" in result.stdout and "samples_per_s" in result.stdout
    metrics = json.loads((work / "metrics" / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iterations"] == 3 and metrics["global_batch"] == 2
    assert (work / "runs" / "train" / "model.pth").is_file()
    curve = (work / "runs" / "train" / "live" / "plots" / "metrics" / "val" / "mAP.tsv").read_text()
    assert [int(row["step"]) for row in csv.DictReader(curve.splitlines(), delimiter="\t")] == [3]
