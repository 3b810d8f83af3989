"""benchmarks/device_check.py, the script Ascend and GPU users paste into issues, runs end to end
(here on the CPU with the demo model: the same code path but the accelerator's sync and memory)."""

from __future__ import annotations

import pytest

from benchmarks import device_check
from tests.conftest import ROOT


def test_device_check_prints_a_summary_with_the_seeds_measure(capsys):
    device_check.main(
        ["--device", "cpu", "--params", str(ROOT / "params.yaml"), "--batch", "1", "--iters", "1", "--warmup", "0",
         "--seed-iters", "3"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "device_check summary: torch" in out and "aggregation backend torch" in out
    assert "fp32:" in out and "bf16:" in out  # the CPU's autocast dtype
    line = next(x for x in out.splitlines() if "the seed's measure" in x)
    assert "2 iterations end to end" in line and "FPS" in line and "1.110 s" in line


def test_device_check_without_an_accelerator_says_so(monkeypatch):
    monkeypatch.setattr(device_check, "resolve_device", lambda requested: "cpu")
    with pytest.raises(SystemExit, match="no NPU or CUDA device"):
        device_check.main(["--device", "auto"])
