"""DVC stage `export`: the scored checkpoint as an ONNX graph (runs/export/model.onnx, with its
inputs and outputs in runs/export/io.json), checked in onnxruntime against PyTorch on the val
frames; its metrics: the largest differences and both frame rates."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import run_stage, stage_parser
from pipeline.params import read_params


def run(args: argparse.Namespace) -> None:
    from model.export import ExportError
    from pipeline.dataset import DatasetError
    from pipeline.evaluate import EvaluateError
    from pipeline.export import ExportCheckError, export

    params = read_params(args.params)
    checkpoint = str(params["evaluate"]["checkpoint"]) if args.checkpoint is None else args.checkpoint
    try:
        export(params, args.infos, checkpoint, args.out, args.metrics)
    except (ExportError, ExportCheckError, EvaluateError, DatasetError) as err:
        raise StageError(str(err)) from None


class StageError(RuntimeError):
    """What the export stage reports in one line."""


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("export", __doc__)
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_val.pkl")
    parser.add_argument("--checkpoint", default=None, help="default: evaluate.checkpoint")
    parser.add_argument("--out", default="runs/export")
    parser.add_argument("--metrics", default="metrics/export.json")
    args = parser.parse_args(argv)
    return run_stage("export", run, args, errors=(StageError,))


if __name__ == "__main__":
    sys.exit(main())
