"""End to end: `dvc repro` in a fresh clone reproduces the committed lock and accuracy and leaves
nothing stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.evaluate import DEMO_SPREAD
from tests.conftest import ROOT

# Below the lowest measured run: docs/reproducibility.md says how it was chosen.
SPREAD_MARGIN = 0.04


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
    committed_metrics = json.loads((clone / "metrics" / "evaluate.json").read_text())
    dvc(clone, "repro")
    # nothing stale; fingerprint rescans the sensor files on every repro and is always reported
    status = json.loads(dvc(clone, "status", "--json").stdout)
    assert status == {"fingerprint": ["always changed"]}, status
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    for stage in ("synthesize", "convert", "anchors"):
        assert lock["stages"][stage]["outs"] == committed["stages"][stage]["outs"], stage
    assert (clone / "data" / "nuscenes" / "v1.0-mini" / "sample.json").is_file()
    shown = dvc(clone, "metrics", "show").stdout
    for name in (
        "boxes_used",
        "samples",
        "mAP",
        "NDS",
        "AMOTA",
        "AMOTP",
        "MOTA",
        "IDS",
        "step_time_s",
        "samples_per_s",
        "onnxruntime_fps",
        "max_abs_diff_boxes",
    ):
        assert name in shown, name
    metrics = json.loads((clone / "metrics" / "evaluate.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 1.0 and set(metrics["per_class_AP"]) == set(
        yaml.safe_load((clone / "params.yaml").read_text())["model"]["classes"]
    )
    # The demo learns as measured: within the spread of its runs over training seeds and CPU
    # kernels (stages/evaluate.py DEMO_SPREAD, docs/reproducibility.md), less a margin for a CPU
    # unlike any measured. The weights themselves differ between CPUs; the data did not (above).
    for key in ("mAP", "NDS"):
        floor = DEMO_SPREAD[key][0] - SPREAD_MARGIN
        assert metrics[key] >= floor, f"{key} {metrics[key]:.4f} < {floor:.4f} (committed {committed_metrics[key]:.4f})"
    assert all(isinstance(metrics[k], (int, float)) for k in ("AMOTA", "AMOTP", "MOTA", "IDS")), metrics
    dvc(clone, "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    for name in ("loss", "per_class_ap.png", "frame_0.png", "tracks.png"):
        assert name in html, name

    # A changed training parameter reruns train and evaluate, nothing upstream.
    out = dvc(clone, "exp", "run", "-S", "train.lr=3e-4", "-S", "train.iterations=6").stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    for stage in ("synthesize", "convert", "anchors", "backbone"):
        assert f"Running stage '{stage}'" not in out, stage
