"""requirements/ installs where the project says it does: every supported (Python, platform)
target resolves to wheels (uv, against PyPI: needs the network), Python 3.8 fails for the
documented reason, the code's syntax and standard library run on the oldest supported Python
(vermin), and an active environment keeps what it has (scripts/env_requirements.py)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
SEED_TORCH = ("torch==2.1.0", "torchvision==0.16.0")  # the seed's Ascend stack (torch_npu 2.1)
PLATFORMS = ("x86_64-manylinux_2_28", "aarch64-manylinux_2_28")
OLDEST = "3.9"  # pyproject.toml's requires-python, setup.sh's check, vermin's target
# (python, platform, torch): "torch.txt" is requirements/torch.txt (2.14.1 on 3.11, the seed's
# 2.1.0 on 3.9 and 3.10); "seed" replaces it with SEED_TORCH.
TARGETS = [(py, plat, "torch.txt") for py in ("3.9", "3.10", "3.11") for plat in PLATFORMS] + [
    ("3.11", plat, "seed") for plat in PLATFORMS
]
CODE = ("model", "pipeline", "stages", "benchmarks", "tests", "scripts")


def _tool(name: str) -> str:
    """A console script of this environment (requirements/base.txt pins uv and vermin)."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: requirements/base.txt pins it (scripts/setup.sh installs it)")
    return path


def uv_compile(python: str, platform: str, files=(), stdin: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`uv pip compile` of requirement `files` plus the requirements `stdin` for one target, wheels
    only (an Ascend aarch64 box builds nothing but mmcv); the pins on stdout, uv's error on stderr."""
    cmd = [_tool("uv"), "pip", "compile", "--no-header", "--no-annotate", "--only-binary", ":all:"]
    # no interpreter download: nothing is built, and the target's Python need not exist here
    cmd += ["--no-python-downloads", "--python-version", python, "--python-platform", platform]
    cmd += [*map(str, files), *(["-"] if stdin else [])]
    return subprocess.run(cmd, input="".join(f"{r}\n" for r in stdin), capture_output=True, text=True, timeout=300)


def dvc_pin() -> str:
    return next(line.split()[0] for line in (REQ / "base.txt").read_text().splitlines() if line.startswith("dvc=="))


@pytest.fixture(scope="module")
def resolutions() -> dict:
    """Every resolution of this module, run at once (each is mostly waiting on PyPI): the TARGETS,
    Python 3.8 with the seed's torch, and the pinned dvc alone on 3.8."""
    jobs = {}
    for python, platform, torch in TARGETS:
        torch_files, torch_pins = ([], SEED_TORCH) if torch == "seed" else ([REQ / "torch.txt"], ())
        jobs[python, platform, torch] = (
            python,
            platform,
            [REQ / "base.txt", REQ / "openmmlab.txt", *torch_files],
            torch_pins,
        )
    jobs["3.8"] = ("3.8", PLATFORMS[0], [REQ / "base.txt", REQ / "openmmlab.txt"], SEED_TORCH)
    jobs["3.8 dvc"] = ("3.8", PLATFORMS[0], [], (dvc_pin(),))
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(uv_compile, *job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def unresolvable(stderr: str) -> str:
    """The package uv could not find a distribution for, and why, from its error."""
    found = re.search(
        r"([A-Za-z0-9_.\-]+==[^\s,]+),? (has no (?:usable )?wheels(?: with a matching [A-Za-z ]+ tag)?|depends on Python[^\s,]+)",
        stderr,
    )
    cause = f"{found[1]} {found[2]}" if found else "(no package named)"
    hint = re.search(r"^hint: .*", stderr, re.M)
    return cause + (f"\n{hint[0]}" if hint else "") + f"\n--- uv:\n{stderr.strip()}"


@pytest.mark.parametrize(
    ("python", "platform", "torch"), TARGETS, ids=[f"py{p}-{a.split('-')[0]}-{t}" for p, a, t in TARGETS]
)
def test_requirements_resolve(resolutions, python, platform, torch):
    res = resolutions[python, platform, torch]
    if res.returncode != 0 and ("network" in res.stderr.lower() or "failed to fetch" in res.stderr.lower()):
        pytest.fail(f"uv could not reach the package index (PyPI):\n{res.stderr}")
    assert res.returncode == 0, f"Python {python} on {platform} ({torch}): no distribution: {unresolvable(res.stderr)}"
    pins = dict(line.split("==", 1) for line in res.stdout.splitlines() if "==" in line and not line.startswith("#"))
    want = SEED_TORCH if torch == "seed" or python != "3.11" else ("torch==2.14.1", "torchvision==0.29.1")
    assert [f"{n}=={pins.get(n)}" for n in ("torch", "torchvision")] == list(want)
    assert pins["numpy"].startswith("1."), pins["numpy"]


def test_python38_is_unsupported_because_of_dvc(resolutions):
    """3.8 resolves nothing, and the reason setup.sh, pyproject.toml and README give holds: the
    pinned dvc (every dvc since 3.43.0) needs Python >= 3.9."""
    assert resolutions["3.8"].returncode != 0, "requirements/ resolve on Python 3.8: lower requires-python"
    dvc, alone = dvc_pin(), resolutions["3.8 dvc"]
    assert alone.returncode != 0 and f"{dvc} depends on Python>=3.9" in alone.stderr, alone.stderr
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert f"{dvc.replace('==', ' ')} (requirements/base.txt; every dvc since 3.43.0) needs Python >= 3.9" in setup
    assert "sys.version_info < (3, 9)" in setup
    assert f'requires-python = ">={OLDEST}"' in (ROOT / "pyproject.toml").read_text()
    assert f'target-version = "py{OLDEST.replace(".", "")}"' in (ROOT / "pyproject.toml").read_text()


def test_code_runs_on_oldest_python():
    """Syntax and standard-library API of the code, statically, against Python 3.9 (vermin;
    `.long()` is torch's, not Python 2's). Annotations are only evaluated lazily where a module has
    `from __future__ import annotations`; a PEP 604 union (`X | None`) anywhere else needs 3.10."""
    cmd = [_tool("vermin"), f"--target={OLDEST}-", "--no-tips", "--violations", "--eval-annotations"]
    cmd += ["--exclude", "long", *CODE]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"code that needs a Python newer than {OLDEST}:\n{res.stdout}{res.stderr}"
    assert "File with incompatible versions" not in res.stdout, res.stdout  # vermin could not decide
    assert unions_evaluated_at_runtime(ROOT) == []


def unions_evaluated_at_runtime(root: Path) -> list[str]:
    """`X | Y` over types (None or a builtin type) outside an annotation, or in an annotation of a
    module without `from __future__ import annotations`: a TypeError on Python 3.9."""
    import ast

    types = {
        "int",
        "float",
        "complex",
        "str",
        "bytes",
        "bool",
        "list",
        "dict",
        "tuple",
        "set",
        "frozenset",
        "type",
        "object",
    }

    def typeish(n):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
            return typeish(n.left) or typeish(n.right)
        if isinstance(n, ast.Subscript):
            return typeish(n.value)
        return (isinstance(n, ast.Constant) and n.value is None) or (isinstance(n, ast.Name) and n.id in types)

    found = []
    for folder in CODE:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            lazy = any(
                isinstance(s, ast.ImportFrom)
                and s.module == "__future__"
                and any(a.name == "annotations" for a in s.names)
                for s in tree.body
            )
            annotations = set()
            for n in ast.walk(tree):
                roots = [getattr(n, "annotation", None), getattr(n, "returns", None)]
                for a in filter(None, roots):
                    annotations.update(id(m) for m in ast.walk(a))
            unions = [n for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)]
            for n in sorted(unions, key=lambda n: (n.lineno, n.col_offset)):
                if typeish(n) and (id(n) not in annotations or not lazy):
                    found.append(f"{path.relative_to(root)}:{n.lineno}: {ast.unparse(n)}")
    return found


def test_union_check_finds_runtime_unions(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "a.py").write_text("def f(x: int | None): pass\nT = dict[str, int] | None\n")
    (tmp_path / "tests" / "b.py").write_text("from __future__ import annotations\ndef f(x: int | None): return 1 | 2\n")
    assert unions_evaluated_at_runtime(tmp_path) == [
        "tests/a.py:1: int | None",
        "tests/a.py:2: dict[str, int] | None",
    ]


# ---- an active environment keeps what it has: scripts/env_requirements.py, nothing installed


@pytest.fixture(scope="module")
def envreq():
    spec = importlib.util.spec_from_file_location("env_requirements", ROOT / "scripts" / "env_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def marker_env(python: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0"}


def requirement_files():
    return [REQ / "base.txt", REQ / "openmmlab.txt"]


def test_markers_pick_one_pin_per_python(envreq):
    for python in ("3.9", "3.10", "3.11"):
        reqs = envreq.read_requirements(requirement_files(), marker_env(python))
        names = [r.name for r in reqs]
        assert len(names) == len(set(names)), f"a package pinned twice for Python {python}"
        assert {"numpy", "dvc", "mmdet", "uv", "vermin", "pillow"} <= set(names)
    pins = {r.name: str(r.specifier) for r in envreq.read_requirements(requirement_files(), marker_env("3.11"))}
    assert pins["pillow"] == "==13.0.0" and pins["pandas"] == "==3.0.6"  # this machine's environment
    torch = {r.name: str(r.specifier) for r in envreq.read_requirements([REQ / "torch.txt"], marker_env("3.10"))}
    assert [f"{n}{torch[n]}" for n in ("torch", "torchvision")] == list(SEED_TORCH)


def test_ascend_env_keeps_torch_npu_mmcv_numpy(envreq):
    reqs = envreq.read_requirements(requirement_files(), marker_env("3.9"))
    pins = {r.name: str(r.specifier)[2:] for r in reqs}
    installed = {
        "torch": "2.1.0",
        "torchvision": "0.16.0",
        "torch_npu": "2.1.0.post8",
        "mmcv-full": "1.7.2",  # DrivingSDK-patched, built from source
        "mx_driving": "1.0.0",
        "numpy": "1.23.5",  # not the pin, but compatible: kept
        "pandas": "1.1.5",  # Sparse4D's own pin: incompatible, replaced
        "Pillow": pins["pillow"],  # the pin (another spelling of the name): kept
        "mmdet": "2.28.2",
        "yapf": "0.33.0",
    }
    add, constraints = envreq.plan(reqs, installed)
    added = dict(add)
    assert added["pandas==" + pins["pandas"]] == "replaces 1.1.5"
    assert added["yapf==0.40.1"] == "replaces 0.33.0"
    assert added["dvc==" + pins["dvc"]] == "missing"
    assert not any(a.split("==")[0] in {"numpy", "pillow", "mmdet", "torch", "torchvision"} for a in added)
    assert len(add) == len(reqs) - 3  # all but numpy, pillow, mmdet
    for kept in ("numpy==1.23.5", "torch==2.1.0", "torchvision==0.16.0", "torch-npu==2.1.0.post8", "mmcv-full==1.7.2"):
        assert kept in constraints
    assert (
        "mx-driving==1.0.0" in constraints
        and "pillow==" + pins["pillow"] in constraints
        and "mmdet==2.28.2" in constraints
    )
    assert not any(c.startswith(("pandas==", "yapf==")) for c in constraints)  # being replaced: not held


def test_incompatible_numpy_is_replaced_and_not_held(envreq):
    reqs = envreq.read_requirements(requirement_files(), marker_env("3.10"))
    for numpy in ("2.1.0", "1.20.3"):
        add, constraints = envreq.plan(reqs, {"numpy": numpy, "torch": "2.1.0+cpu"})
        assert ("numpy==1.26.4", f"replaces {numpy}") in add
        assert "torch==2.1.0+cpu" in constraints and not any(c.startswith("numpy==") for c in constraints)


def test_complete_env_adds_nothing(envreq):
    reqs = envreq.read_requirements(requirement_files(), marker_env("3.11"))
    installed = {r.name: str(r.specifier)[2:] for r in reqs}
    add, constraints = envreq.plan(reqs, installed)
    assert add == [] and len(constraints) == len(reqs)


def test_cli_lists_what_this_environment_lacks(envreq, tmp_path, capsys):
    files = tmp_path / "req.txt"
    files.write_text("pytest>=1  # installed here\nnot-a-real-package-x==1.0; python_version >= '3'\n-r other.txt\n")
    cons = tmp_path / "cons.txt"
    assert envreq.main(["--constraints", str(cons), str(files)]) == 0
    assert capsys.readouterr().out == "not-a-real-package-x==1.0\tmissing\n"
    assert re.search(r"^pytest==\S+$", cons.read_text(), re.M)
