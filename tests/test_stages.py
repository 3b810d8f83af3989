"""The stage scripts as a user runs them: the installed package, `python -m stages.<name>`, one
error wrapper (a known error is one line and exit code 2, a bug keeps its traceback)."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys

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
