"""Run a profile (params-full.yaml, params-performance.yaml) as a named DVC experiment, without
copying it over the tracked params.yaml: every value in which the profile differs from
params.yaml becomes one `--set-param` of `dvc exp run -n <name>` (DVC applies them with its
Hydra override grammar, `dvc.utils.hydra.apply_overrides`), so the experiment's params are the
profile's exactly and `dvc exp show` lists it beside the others.

    bash scripts/run.sh profile full [dvc exp run options, e.g. --temp or -S train.devices=4]
    python -m pipeline.profiles full --print     # only list the overrides

As with any `dvc exp run`, the workspace then holds the experiment's params (`git checkout
params.yaml` or `dvc exp apply` goes back); with `--temp` the experiment runs in a copy and the
workspace is left untouched (convert.data_root must then be absolute or tracked by DVC).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pipeline.params import ParamsError, read_params

PROFILES = {"full": "params-full.yaml", "performance": "params-performance.yaml"}


def _value(v: Any) -> str:
    """A value in Hydra's override grammar: strings quoted, lists in brackets."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    raise ParamsError(f"cannot pass {v!r} as a --set-param value")


def overrides(base: dict, profile: dict, prefix: str = "") -> list[str]:
    """`key=value` for every leaf where `profile` differs from `base` (both the same schema)."""
    out = []
    for key, value in profile.items():
        dotted = prefix + key
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out += overrides(base[key], value, dotted + ".")
        elif base.get(key) != value or type(base.get(key)) is not type(value):
            out.append(f"{dotted}={_value(value)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.profiles", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", choices=sorted(PROFILES))
    parser.add_argument("--name", help="the experiment's name (default: the profile's)")
    parser.add_argument("--print", action="store_true", help="print the overrides, run nothing")
    args, extra = parser.parse_known_args(argv)
    try:
        base, profile = read_params("params.yaml"), read_params(PROFILES[args.profile])
    except ParamsError as err:
        print(f"profile: {err}", file=sys.stderr)
        return 2
    sets = overrides(base, profile)
    if args.print:
        print("\n".join(sets))
        return 0
    cmd = ["dvc", "exp", "run", "-n", args.name or args.profile, *(a for s in sets for a in ("-S", s)), *extra]
    print(f"profile: dvc exp run -n {args.name or args.profile} with {len(sets)} settings of {PROFILES[args.profile]}")
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
