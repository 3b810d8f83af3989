"""dvc.yaml lists exactly the code each stage runs, the params it reads, and evaluating a
checkpoint from elsewhere trains nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.imports import PACKAGES, code_closure
from pipeline.settings import LAUNCH_KEYS, SCHEMA
from tests.conftest import ROOT


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_code_deps_are_exactly_what_the_stage_imports(stage):
    spec = dvc_stages()[stage]
    script = ROOT / "stages" / f"{stage}.py"
    assert spec["cmd"].split()[:3] == ["python", "-m", f"stages.{stage}"], f"{stage}: cmd does not run stages.{stage}"
    code = code_closure(script)
    deps = [str(d) for d in spec["deps"]]
    missing = sorted(p for p in code if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage}: add to deps: {missing}"
    code_deps = [d for d in deps if d.split("/")[0] in ("stages", *PACKAGES)]
    unused = [d for d in code_deps if not any(covered(p, [d]) for p in code)]
    assert not unused, f"dvc.yaml stage {stage}: deps the stage never imports: {unused}"


def test_code_closure_follows_workers_and_lazy_imports():
    """The derivation itself: the train stage's script starts pipeline.train by name, which
    imports the model inside a function; both must be found."""
    code = code_closure(ROOT / "stages" / "train.py")
    assert {"pipeline/train.py", "model/detector.py", "model/head.py", "pipeline/settings.py"} <= code


def test_the_checkpoints_code_digest_follows_the_training_workers_code(tmp_path, monkeypatch):
    """A resumable checkpoint is resumed only by the same code: the digest changes with any file
    the training worker runs (model/losses.py here), not with one it does not run."""
    import shutil

    import pipeline.imports
    from pipeline.checkpoint import code_digest

    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline.imports, "ROOT", tmp_path)
    before = code_digest()
    (tmp_path / "pipeline" / "anchors.py").write_text("# the anchors stage's code: not training's\n")
    assert code_digest() == before
    (tmp_path / "model" / "losses.py").write_text((tmp_path / "model" / "losses.py").read_text() + "\n# changed\n")
    assert code_digest() != before


def test_train_tracks_every_identity_setting_and_no_launch_setting():
    """A launch setting (workers, ports, checkpoint interval) does not rerun training; every
    other train, model and data setting does."""
    listed = dvc_stages()["train"]["params"]
    tracked = set()
    for entry in listed:
        section, _, key = str(entry).partition(".")
        keys = [key] if key else list(SCHEMA[section])
        tracked.update(f"{section}.{k}" for k in keys)
    launch = {f"train.{k}" for k in LAUNCH_KEYS["train"]}
    identity = {f"{s}.{k}" for s in ("train", "model", "data") for k in SCHEMA[s]} - launch
    assert not tracked & launch, f"launch settings tracked by the train stage: {sorted(tracked & launch)}"
    assert identity <= tracked, f"settings the train stage reads but dvc.yaml does not list: {identity - tracked}"


@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_evaluate_and_export_take_the_checkpoint_its_param_names(stage):
    spec = dvc_stages()[stage]
    assert "${evaluate.checkpoint}" in spec["deps"]
    assert "--checkpoint ${evaluate.checkpoint}" in spec["cmd"]
    assert "runs/train/model.pth" not in spec["deps"] and "runs/train/model.pth" not in spec["cmd"]


# ---------------------------------------------------------------- DVC itself, in a copy of the project


def dvc(work: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_evaluating_an_external_checkpoint_runs_no_training(project):
    """`dvc exp run -S evaluate.checkpoint=...` (here: the params file edited) plans the data
    stages and evaluate, never backbone or train; the default plans train first. A dry run
    hashes the deps, so each stage's inputs are stood in for by tiny files."""
    stand_ins(project)
    default = dvc(project, "repro", "--dry", "evaluate")
    assert "Running stage 'train'" in default and "Running stage 'evaluate'" in default
    (project / "weights").mkdir()
    (project / "weights" / "sparse4dv3_r50.pth").write_bytes(b"weights")
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(
        params.replace("checkpoint: runs/train/model.pth", "checkpoint: weights/sparse4dv3_r50.pth")
    )
    external = dvc(project, "repro", "--dry", "evaluate")
    assert "Running stage 'evaluate'" in external
    assert "Running stage 'train'" not in external and "Running stage 'backbone'" not in external
    assert "weights/sparse4dv3_r50.pth" in external


def stand_ins(project: Path) -> None:
    """A tiny file (or folder with one) at every dep and out of every stage that is not there."""
    rendered = yaml.safe_load((project / "params.yaml").read_text())
    for spec in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        paths = [*spec.get("deps", [])]
        for kind in ("outs", "metrics", "plots"):
            paths += [next(iter(e)) if isinstance(e, dict) else e for e in spec.get(kind, [])]
        for path in paths:
            path = str(path)
            path = re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(rendered[m[1]][m[2]]), path)
            target = project / path
            if target.exists():
                continue
            if target.suffix:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(f"stand-in for {path}")
            else:
                target.mkdir(parents=True)
                (target / "stand-in").write_text(path)


def changed_stages(project: Path) -> set[str]:
    """The stages `dvc status` reports, not counting fingerprint's "always changed" (it rescans
    the sensor folders on every repro)."""
    status = {name.split(":")[-1]: why for name, why in json.loads(dvc(project, "status", "--json")).items()}
    assert "always changed" in status["fingerprint"]
    return {name for name, why in status.items() if [w for w in why if w != "always changed"]}


def test_dvc_status_follows_code_and_model_settings_not_launch_settings(project):
    """With every stage's outputs recorded (`dvc commit` over stand-ins), `dvc status` reports a
    stage when code it imports changes, and train when a setting of the model's maths changes;
    a launch setting changes nothing."""
    stand_ins(project)
    dvc(project, "commit", "--force")
    assert changed_stages(project) == set()
    params = project / "params.yaml"
    original = params.read_text()

    def with_train(**change) -> set[str]:
        data = yaml.safe_load(original)
        data["train"].update(change)
        params.write_text(yaml.safe_dump(data))
        try:
            return changed_stages(project)
        finally:
            params.write_text(original)

    assert with_train(num_workers=7, master_port=29999, checkpoint_interval=5, max_restarts=2, join_timeout=60) == set()
    assert with_train(lr=1e-4) == {"train"}
    settings = project / "pipeline" / "settings.py"
    settings.write_text(settings.read_text() + "\n# a change\n")
    every = {"synthesize", "fingerprint", "convert", "anchors", "backbone", "train", "evaluate", "export"}
    assert changed_stages(project) == every


def test_stages_read_the_tables_and_the_fingerprint_not_the_dataset_root():
    """No stage hashes the whole dataset root (a million files on trainval); train and evaluate
    follow the sensor files through data/fingerprint.json."""
    stages = dvc_stages()
    for name, spec in stages.items():
        assert "${convert.data_root}" not in spec.get("deps", []), name
    for name in ("train", "evaluate", "export"):
        assert "data/fingerprint.json" in stages[name]["deps"], name
    assert stages["fingerprint"].get("always_changed") is True
