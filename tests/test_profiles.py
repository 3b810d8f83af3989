"""`bash scripts/run.sh profile full`: a profile as a named DVC experiment, params.yaml untouched in
git. DVC applies the overrides with its own function (`dvc exp run -S` -> apply_overrides); the
result must be the profile file exactly."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline.profiles import PROFILES, overrides
from tests.conftest import ROOT


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_dvc_applies_the_overrides_into_the_profile_exactly(profile, tmp_path):
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run --set-param` calls

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    base = yaml.safe_load(params.read_text())
    wanted = yaml.safe_load((ROOT / PROFILES[profile]).read_text())
    sets = overrides(base, wanted)
    assert sets and all("=" in s for s in sets)
    apply_overrides(params, sets)
    assert yaml.safe_load(params.read_text()) == wanted


def test_values_dvc_could_misread_are_quoted():
    sets = overrides(
        {"a": {"v": "x", "ip": "1.2.3.4", "lr": 1.0, "l": [1, 2], "b": False}},
        {"a": {"v": "v1.0-mini", "ip": "10.0.0.1", "lr": 1e-05, "l": [64, 176], "b": True}},
    )
    assert sets == ["a.v='v1.0-mini'", "a.ip='10.0.0.1'", "a.lr=1e-05", "a.l=[64,176]", "a.b=true"]


def test_the_command_lists_the_overrides_and_checks_the_files():
    cmd = [sys.executable, "-m", "pipeline.profiles", "full", "--print"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "train.devices=8" in result.stdout.splitlines() and "train.total_batch_size=48" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.profiles", "huge"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and "invalid choice: 'huge'" in result.stderr
