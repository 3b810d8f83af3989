"""Reading params.yaml sections and writing outputs atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.settings import params_problems


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key."""


def read_params(path: str | os.PathLike) -> dict[str, Any]:
    """The whole params file, checked against pipeline.settings.SCHEMA: an unknown or misspelt
    key anywhere, a missing one, a wrong type or a value out of range is a ParamsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    problems = params_problems(data)
    if len(problems) == 1:
        raise ParamsError(f"{path}: {problems[0]}")
    if problems:
        raise ParamsError(f"{path}: {len(problems)} problems:\n  " + "\n  ".join(problems))
    return data


def load_params(path: str | os.PathLike, section: str) -> dict[str, Any]:
    """The `section` mapping of a params file, after checking the whole file (read_params)."""
    return read_params(path)[section]


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
