"""Shared fixtures: one small synthetic twin per test session, a git + DVC copy of the project;
launching a stage as DVC does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
