"""Shared fixtures: one small synthetic twin per test session, a git + DVC copy of the project;
launching a stage as DVC does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.settings import CLASSES
from pipeline.twin.writer import TwinConfig, write_twin

ROOT = Path(__file__).resolve().parents[1]
SMALL = TwinConfig(num_scenes=3, samples_per_scene=3, objects_per_scene=30, image_width=640, image_height=360)


def launch_stage(name: str, *args: str, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """`python -m stages.<name> args` in `cwd`, as DVC runs a stage, importing this checkout's code
    (first on PYTHONPATH: the environment's editable install may point at another checkout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", f"stages.{name}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="session")
def small_twin(tmp_path_factory) -> Path:
    """A 3-scene twin (2 mini_train scenes, 1 mini_val) at <tmp>/data/nuscenes."""
    root = tmp_path_factory.mktemp("twin") / "data" / "nuscenes"
    write_twin(SMALL, root, workers=2)
    return root


# ---- model settings ------------------------------------------------------------------------------


def model_settings(profile: str = "params.yaml", **overrides) -> dict:
    """A complete `model` section for build_model: the profile file's, with `overrides` (the
    `loss` and `matching` sub-sections merged key by key), checked by the schema as part of the
    whole profile."""
    import yaml

    from pipeline.settings import params_problems

    params = yaml.safe_load((ROOT / profile).read_text())
    model = dict(params["model"])
    for key, value in overrides.items():
        model[key] = {**model[key], **value} if key in ("loss", "matching") else value
    problems = params_problems({**params, "model": model})
    assert not problems, f"model settings {overrides} on {profile}: {problems}"
    return model


# ---- a small model over the small twin, for the evaluate and export stages ----------------------

STAGE_MODEL = dict(
    depth=18, with_cp=False, embed_dims=32, num_groups=2, num_decoder=2, num_single_frame_decoder=1,
    num_temp_instances=10, num_dn_groups=1, num_temp_dn_groups=1, max_dn_gt=8, num_depth_layers=1, use_grid_mask=False,
    classes=list(CLASSES),
)  # fmt: skip
STAGE_AUG = dict(H=360, W=640, final_dim=[64, 176], resize_lim=[0.28, 0.28], bot_pct_lim=[0.0, 0.0], rot_lim=[0.0, 0.0], rand_flip=False, rot3d_range=[0.0, 0.0])  # fmt: skip


@pytest.fixture(scope="session")
def stage_workspace(small_twin, tmp_path_factory):
    """Val infos of the small twin and an untrained (randomly initialised) small model."""
    import pickle

    import numpy as np
    import torch

    from model import build_model
    from pipeline.anchors import kmeans_anchors
    from pipeline.convert import convert

    root = tmp_path_factory.mktemp("evaluate")
    cwd = os.getcwd()
    os.chdir(small_twin.parent.parent)
    try:
        converted = convert("data/nuscenes", "v1.0-mini")
    finally:
        os.chdir(cwd)
    with open(root / "val.pkl", "wb") as f:
        pickle.dump(converted["val"], f)
    boxes = np.concatenate([i["gt_boxes"] for i in converted["train"]["infos"]])
    torch.manual_seed(0)
    model = build_model(dict(stage_params(small_twin)["model"]), kmeans_anchors(boxes, 20, 55.0, 0)[0])
    torch.save({"state_dict": model.state_dict()}, root / "model.pth")
    return root


def stage_params(small_twin, version: str = "v1.0-mini") -> dict:
    """params.yaml with the small model and image size, reading the small twin, on the CPU."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(STAGE_MODEL)
    params["data"]["aug"].update(STAGE_AUG)
    params["convert"].update(data_root=str(small_twin), version=version)
    params["evaluate"].update(device="cpu", devices=1, checkpoint="")
    return params


def copy_tracked_files(dest: Path) -> None:
    """The project's tracked and new (not ignored) files into `dest`: no data, no venv."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.fixture
def project(tmp_path) -> Path:
    """A git + DVC copy of the project's tracked and new files (no data, no venv)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    work = tmp_path / "project"
    copy_tracked_files(work)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "project"]):
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    return work
