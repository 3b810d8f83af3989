"""The data stages write the same bytes on every machine.

`tests/data/default_data.md5` lists every file that `synthesize`, `convert` and `anchors` write
for the default params (md5sum's format, paths under data/). Here the three stages run as DVC runs
them, under conditions that change what a CPU changes: the number of worker processes, numpy's
SIMD dispatch, OpenBLAS's kernels and the C library's FMA code. Every file must match the list.

To rewrite the list after a deliberate change of the data stages (then commit it with dvc.lock):
    dvc repro anchors && (cd data && find nuscenes infos anchors -type f | sort | xargs md5sum) \\
        > tests/data/default_data.md5
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DIGESTS = ROOT / "tests" / "data" / "default_data.md5"
# numpy 1.26's optional x86 features: NPY_DISABLE_CPU_FEATURES leaves its baseline (SSE3).
NUMPY_X86_FEATURES = (
    "SSSE3 SSE41 POPCNT SSE42 AVX F16C FMA3 AVX2 AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX "
    "AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
)
X86 = platform.machine() in ("x86_64", "AMD64")


def committed_digests() -> dict[str, str]:
    rows = (line.split(maxsplit=1) for line in DIGESTS.read_text().splitlines() if line.strip())
    return {path.strip(): digest for digest, path in rows}


def tree_digests(data: Path) -> dict[str, str]:
    return {
        p.relative_to(data).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for folder in ("nuscenes", "infos", "anchors")
        for p in sorted((data / folder).rglob("*"))
        if p.is_file()
    }


def dvc_dir_md5(digests: dict[str, str], folder: str) -> str:
    """DVC's hash of a folder output (the md5 of its sorted entry list), from per-file md5s."""
    entries = sorted(
        (
            {"md5": md5, "relpath": path[len(folder) + 1 :]}
            for path, md5 in digests.items()
            if path.startswith(folder + "/")
        ),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def test_digest_list_is_the_committed_lock():
    """The list and dvc.lock describe the same outputs (neither is updated without the other)."""
    digests = committed_digests()
    outs = {
        out["path"]: out["md5"]
        for stage in ("synthesize", "convert", "anchors")
        for out in yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"][stage]["outs"]
    }
    assert dvc_dir_md5(digests, "nuscenes") == outs["data/nuscenes"]
    assert dvc_dir_md5(digests, "infos") == outs["data/infos"]
    assert digests["anchors/nuscenes_kmeans.npy"] == outs["data/anchors/nuscenes_kmeans.npy"]


CONDITIONS = {
    "2 workers": ({}, 2),
    "1 worker, numpy baseline": ({"NPY_DISABLE_CPU_FEATURES": NUMPY_X86_FEATURES if X86 else ""}, 1),
    "other OpenBLAS kernels, libm without FMA": (
        # The environment may already pin a core type (OPENBLAS_CORETYPE=Haswell on some CPUs).
        {"OPENBLAS_CORETYPE": "Prescott" if X86 else "ARMV8", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA"},
        2,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_data_stages_write_the_committed_bytes(condition, tmp_path):
    env_change, workers = CONDITIONS[condition]
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, **env_change, "PYTHONPATH": str(ROOT)}
    stages = (
        ("synthesize", "--out", "data/nuscenes", "--metrics", "metrics/synthesize.json", "--workers", str(workers)),
        ("convert", "--out", "data/infos", "--metrics", "metrics/convert.json"),
        ("anchors", "--infos", "data/infos/nuscenes_infos_train.pkl", "--out", "data/anchors/nuscenes_kmeans.npy",
         "--metrics", "metrics/anchors.json"),
    )  # fmt: skip
    for name, *args in stages:
        cmd = [sys.executable, "-m", f"stages.{name}", "--params", "params.yaml", *args]
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{name} under {condition}: {result.stderr[-2000:]}"
    ours, committed = tree_digests(tmp_path / "data"), committed_digests()
    assert sorted(ours) == sorted(committed), f"{condition}: other files than {DIGESTS.name} lists"
    differ = [path for path in sorted(committed) if ours[path] != committed[path]]
    assert not differ, f"{condition}: {len(differ)} files differ from {DIGESTS.name}, first data/{differ[0]}"
    # The stages' metrics files are outputs in dvc.lock too.
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    for name in ("synthesize", "convert", "anchors"):
        (locked,) = (o["md5"] for o in lock[name]["outs"] if o["path"] == f"metrics/{name}.json")
        written = hashlib.md5((tmp_path / "metrics" / f"{name}.json").read_bytes()).hexdigest()
        assert written == locked, f"{condition}: metrics/{name}.json differs from dvc.lock"
