"""End to end: `dvc repro` in a fresh clone reproduces the committed lock and leaves nothing stale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


def dvc(clone: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=clone, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_fresh_clone_repro_reproduces_lock(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    committed = yaml.safe_load((clone / "dvc.lock").read_text())
    dvc(clone, "repro")
    assert "up to date" in dvc(clone, "status").stdout
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    for stage in ("synthesize", "convert", "anchors"):
        assert lock["stages"][stage]["outs"] == committed["stages"][stage]["outs"], stage
    assert (clone / "data" / "nuscenes" / "v1.0-mini" / "sample.json").is_file()
    shown = dvc(clone, "metrics", "show").stdout
    assert "boxes_used" in shown and "samples" in shown

    # A changed anchors parameter reruns anchors (and what depends on it), nothing upstream.
    out = dvc(clone, "exp", "run", "-S", "anchors.num_anchor=200").stdout
    assert "Running stage 'anchors'" in out
    assert "Running stage 'synthesize'" not in out and "Running stage 'convert'" not in out
