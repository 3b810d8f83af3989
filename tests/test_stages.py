"""The stage scripts as a user runs them: the installed package, `python -m stages.<name>`, one
error wrapper (a known error is one line and exit code 2, a bug keeps its traceback)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from pipeline.cli import run_stage
from pipeline.params import ParamsError
from tests.conftest import ROOT


def test_the_setup_installs_the_package_from_this_checkout(tmp_path):
    """From another folder and without PYTHONPATH, the environment imports this checkout's code
    (scripts/setup.sh: pip install -e .)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import model.ops, pipeline.twin, stages.train; print(pipeline.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"the project is not installed (bash scripts/setup.sh): {result.stderr[-500:]}"
    assert os.path.samefile(result.stdout.strip(), ROOT / "pipeline" / "__init__.py"), result.stdout


def test_no_code_edits_sys_path():
    """The packages are installed and the scripts run as modules: no file reaches for sys.path."""
    found = []
    for folder in ("stages", "pipeline", "model", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"sys.path edited (the project is installed; run scripts as python -m): {found}"


class StageFailure(RuntimeError):
    pass


def namespace(**kw) -> argparse.Namespace:
    return argparse.Namespace(params="my-params.yaml", **kw)


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (ParamsError("my-params.yaml: demo.k: unknown key"), "demo: my-params.yaml: demo.k: unknown key"),
        (StageFailure("data/x.pkl: not found"), "demo: data/x.pkl: not found"),
        (KeyError("depth"), "demo: my-params.yaml: missing parameter demo.depth"),
    ],
)
def test_known_errors_are_one_line_and_exit_code_2(capsys, error, line):
    def body(args):
        raise error

    assert run_stage("demo", body, namespace(), errors=(StageFailure,)) == 2
    assert capsys.readouterr().err == line + "\n"


def test_a_bug_keeps_its_traceback_and_a_body_its_exit_code():
    def bug(args):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_stage("demo", bug, namespace(), errors=(StageFailure,))
    assert run_stage("demo", lambda args: None, namespace()) == 0
    assert run_stage("demo", lambda args: 3, namespace()) == 3


def evaluate_params(tmp_path, checkpoint: str):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"].update(device="cpu", devices=1, checkpoint=checkpoint)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_evaluate_scores_the_checkpoint_flag_over_the_param(tmp_path, capfd):
    """`--checkpoint` names the file scored even when evaluate.checkpoint names another (here an
    existing file that is no checkpoint); without the flag, the param's file is the one."""
    from stages.evaluate import main

    (tmp_path / "param.pth").write_bytes(b"not a checkpoint")
    params = evaluate_params(tmp_path, str(tmp_path / "param.pth"))
    args = ["--params", str(params), "--out", str(tmp_path / "out"), "--plots", str(tmp_path / "plots")]
    assert main([*args, "--checkpoint", str(tmp_path / "flag.pth")]) == 2
    assert f"evaluate: {tmp_path / 'flag.pth'}: checkpoint not found" in capfd.readouterr().err

    params = evaluate_params(tmp_path, str(tmp_path / "missing-param.pth"))
    assert main(args) == 2
    assert f"evaluate: {tmp_path / 'missing-param.pth'}: checkpoint not found" in capfd.readouterr().err
    assert main([*args, "--checkpoint", ""]) == 2
    assert "evaluate: --checkpoint is empty" in capfd.readouterr().err


# ---------------------------------------------------------------- real data without the twin


def test_synthesize_writes_only_a_placeholder_when_convert_reads_another_dataset(tmp_path, capsys):
    """convert.data_root elsewhere (real nuScenes): no twin, a placeholder saying where the data
    are read, in well under a second; a twin left there before is replaced."""
    from stages.synthesize import main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["convert"]["data_root"] = "data/nuscenes-real"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "data" / "nuscenes"
    (out / "samples" / "CAM_FRONT").mkdir(parents=True)
    args = ["--params", str(tmp_path / "params.yaml"), "--out", str(out), "--metrics", str(tmp_path / "m.json")]
    start = time.perf_counter()
    assert main(args) == 0
    assert time.perf_counter() - start < 1.0
    assert [p.name for p in out.iterdir()] == ["NOT_SYNTHESIZED.txt"]
    assert "data/nuscenes-real" in (out / "NOT_SYNTHESIZED.txt").read_text()
    assert json.loads((tmp_path / "m.json").read_text()) == {"synthesized": False, "data_root": "data/nuscenes-real"}
    assert "the twin is not synthesized" in capsys.readouterr().out
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    params["convert"]["data_root"] = str(out / "real")  # inside the folder the stage replaces
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(args) == 2
    assert "lies inside" in capsys.readouterr().err and (out / "NOT_SYNTHESIZED.txt").is_file()


def test_full_profile_from_an_empty_data_folder_and_a_linked_dataset(project, small_twin):
    """params-full.yaml (convert.data_root: data/nuscenes-real) in a copy of the project with an
    empty data/ and the dataset linked in: `dvc repro` of the data stages writes no twin and
    converts the linked dataset (here a small twin standing in for real nuScenes)."""
    from tests.test_dag import dvc

    params = yaml.safe_load((project / "params-full.yaml").read_text())
    assert params["convert"]["data_root"] == "data/nuscenes-real"
    params["convert"]["version"] = "v1.0-mini"  # the stand-in's version
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert not (project / "data").exists()
    (project / "data").mkdir()
    (project / "data" / "nuscenes-real").symlink_to(small_twin, target_is_directory=True)
    dvc(project, "repro", "synthesize", "fingerprint", "convert")
    assert [p.name for p in (project / "data" / "nuscenes").iterdir()] == ["NOT_SYNTHESIZED.txt"]
    summary = json.loads((project / "metrics" / "convert.json").read_text())
    assert summary["train"]["samples"] == 6 and summary["val"]["samples"] == 3
    assert (project / "data" / "infos" / "nuscenes_infos_val.pkl").is_file()
    assert json.loads((project / "metrics" / "synthesize.json").read_text())["synthesized"] is False
    assert not json.loads(dvc(project, "status", "--json", "synthesize", "convert"))
    # back to the twin: synthesize is out of date (it depends on convert.data_root)
    params["convert"].update(data_root="data/nuscenes")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert "synthesize" in json.loads(dvc(project, "status", "--json", "synthesize"))


def test_the_demo_range_belongs_to_the_committed_demo_profile():
    """DEMO_SPREAD was measured with params.yaml as committed: a change of the demo's settings
    (not of launch settings) needs the spread measured again."""
    from pipeline.params import read_params
    from stages.evaluate import DEMO_PROFILE, demo_profile_digest

    params = read_params(ROOT / "params.yaml")
    assert demo_profile_digest(params) == DEMO_PROFILE, (
        "params.yaml's demo profile changed: rerun `python -m benchmarks.accuracy_spread` and update "
        "DEMO_PROFILE and DEMO_SPREAD in stages/evaluate.py and docs/reproducibility.md"
    )
    launch = {**params, "train": {**params["train"], "master_port": 29999, "num_workers": 2}}
    assert demo_profile_digest(launch) == DEMO_PROFILE
    assert demo_profile_digest({**params, "train": {**params["train"], "lr": 3e-4}}) != DEMO_PROFILE


def test_evaluate_tells_the_demo_range_and_a_broken_run():
    from pipeline.params import read_params
    from stages.evaluate import BROKEN_MAP, DEMO_SPREAD, accuracy_note

    params = read_params(ROOT / "params.yaml")
    low, _, high = DEMO_SPREAD["mAP"]
    note = accuracy_note(params, {"mAP": low, "NDS": DEMO_SPREAD["NDS"][1]})
    assert f"range {low:.3f}-{high:.3f}" in note and "NDS" in note and "broken" not in note
    broken = accuracy_note(params, {"mAP": BROKEN_MAP / 2, "NDS": 0.01})
    assert "detects nearly nothing" in broken and "metrics/train.json" in broken
    assert accuracy_note({**params, "train": {**params["train"], "lr": 3e-4}}, {"mAP": 0.0, "NDS": 0.0}) is None
