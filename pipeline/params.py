"""Reading params.yaml: the whole file checked against pipeline.settings.SCHEMA, then a section.
(The atomic writers are in pipeline.files.)"""

from __future__ import annotations

import os
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
