"""What every stage script shares: its argument parser and one error wrapper.

A stage's known errors (a bad params file, a missing input, an unavailable device) end it with
one line `<stage>: <message>` on stderr and exit code 2; anything else is a bug and keeps its
traceback. Only pipeline.params is imported here, so a stage depends on no other stage's code."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.params import ParamsError


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser named as DVC runs the stage (`python -m stages.<stage>`), with --params."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=doc)
    parser.add_argument("--params", default="params.yaml")
    return parser


def run_stage(
    stage: str,
    body: Callable[[argparse.Namespace], int | None],
    args: argparse.Namespace,
    errors: tuple[type[BaseException], ...] = (),
    section: str | None = None,
) -> int:
    """`body(args)`, a stage's work, and its exit code (0 when it returns None).

    ParamsError and the stage's own `errors` print `<stage>: <message>` on stderr and return 2; so
    does a KeyError, as a parameter missing from the `section` (default: the stage's name) of the
    params file `args.params`."""
    try:
        code = body(args)
    except (ParamsError, *errors) as err:
        print(f"{stage}: {err}", file=sys.stderr)
        return 2
    except KeyError as err:
        print(f"{stage}: {args.params}: missing parameter {section or stage}.{err.args[0]}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)
