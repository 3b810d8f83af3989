"""benchmarks/device_check.py, the script Ascend and GPU users paste into issues, runs end to end
(here on the CPU with the demo model: the same code path but the accelerator's sync and memory)."""

from __future__ import annotations

import pytest
import torch

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


def test_device_check_times_the_reference_beside_ours(capsys):
    """`--reference on` (the default on a CUDA GPU): the reference's own model with our initial weights, the
    same batch and step, and ours / reference (here on the CPU: its grid_sample fallback, fp32 only)."""
    device_check.main(
        ["--device", "cpu", "--params", str(ROOT / "params.yaml"), "--batch", "1", "--iters", "1", "--warmup", "0",
         "--seed-iters", "0", "--reference", "on"]
    )  # fmt: skip
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("  the reference fp32 (grid_sample fallback)"))
    assert "s/step" in line and "finite True" in line and "ours / reference: step" in line
    assert "the reference bf16" not in out  # mmcv's fp16 is CUDA's autocast


def test_device_check_says_why_the_reference_is_not_timed(monkeypatch):
    """On a GPU without the reference's compiled op the comparison is skipped with the reason, not run
    through the oracle that stands in for the op."""
    import argparse

    monkeypatch.setattr(device_check, "compiled_reference_op", lambda: False)
    args = argparse.Namespace(reference="auto")
    lines = device_check.side_by_side(args, torch.device("cuda"), {}, {}, None, {})
    assert len(lines) == 1 and "its compiled op deformable_aggregation_ext does not import" in lines[0]
    assert device_check.side_by_side(args, torch.device("cpu"), {}, {}, None, {}) == []
