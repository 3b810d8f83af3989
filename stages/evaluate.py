"""DVC stage `evaluate`: inference over the val infos, official nuScenes detection and tracking
metrics, charts and pictures; distributed with torchrun when evaluate.devices (or auto: every visible device) > 1."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from pipeline.cli import run_stage, stage_parser
from pipeline.devices import DeviceError, Launch, resolve_device, resolve_devices, run_workers
from pipeline.params import ParamsError, read_params
from pipeline.settings import LAUNCH_KEYS

# The demo's val accuracy over the runs in docs/reproducibility.md (`python -m
# benchmarks.accuracy_spread`): the default params.yaml trained with seeds 0, 1 and 2, and with
# seed 0 on ATen's AVX2 kernels (as another CPU would run it), on the committed data stages'
# outputs, on an AMD EPYC (2 cores). Printed beside a run of exactly that profile.
DEMO_PROFILE = "0d1551034c60223085cb548a2e054c200af94d1606b37b5ba8264e44a2285df5"  # demo_profile_digest of params.yaml then (tests/test_stages.py checks it)
DEMO_SPREAD = {"mAP": (0.1761, 0.2058, 0.2266), "NDS": (0.2298, 0.2469, 0.2594)}  # (min, mean, max) of 4 runs
# Below this mAP a demo run has learned nothing (an untrained model scores about 0): the data,
# the code or the environment is broken, not the run unlucky.
BROKEN_MAP = 0.05


def demo_profile_digest(params: dict) -> str:
    """sha256 of the settings that decide a trained model and its score: every section but
    evaluate's and export's (which come after the score), without the launch settings
    (pipeline.settings.LAUNCH_KEYS)."""
    decisive = {
        section: {k: v for k, v in values.items() if k not in LAUNCH_KEYS.get(section, ())}
        for section, values in params.items()
        if section not in ("evaluate", "export")
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def accuracy_note(params: dict, metrics: dict) -> str | None:
    """For a run of the demo profile, what a user should make of its scores: the measured range
    beside them, and a clear word when the mAP says nothing was learned. None for other profiles."""
    if demo_profile_digest(params) != DEMO_PROFILE:
        return None
    lines = [
        f"evaluate: {key} {metrics[key]:.4f}; the demo's measured range {low:.3f}-{high:.3f} "
        f"(mean {mean:.3f}, docs/reproducibility.md)"
        for key, (low, mean, high) in DEMO_SPREAD.items()
    ]
    if metrics["mAP"] < BROKEN_MAP:
        lines.append(
            f"evaluate: mAP {metrics['mAP']:.4f} is below {BROKEN_MAP}: this model detects nearly nothing, so "
            "something is broken, not unlucky. Check that the train stage ran all its iterations "
            "(metrics/train.json) and that `bash scripts/run.sh test -m 'not slow'` passes "
            "(README, What to expect)"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    params = read_params(args.params)
    ep = params["evaluate"]
    device = resolve_device(str(ep["device"]))
    devices = resolve_devices(ep["devices"], device, "evaluate.devices")
    # The checkpoint scored is exactly the one named: --checkpoint, else evaluate.checkpoint
    # (dvc.yaml passes the param, which is also the stage's dependency).
    checkpoint = str(ep["checkpoint"]) if args.checkpoint is None else args.checkpoint
    if not checkpoint:
        raise ParamsError("--checkpoint is empty: name the checkpoint to score")
    Path(args.plots).mkdir(parents=True, exist_ok=True)
    worker_args = [
        "--params", args.params, "--infos", args.infos, "--checkpoint", checkpoint,
        "--out", args.out, "--metrics", args.metrics, "--plots", args.plots,
    ]  # fmt: skip
    code = run_workers("pipeline.evaluate", worker_args, device, Launch(devices=devices))
    if code == 0:
        note = accuracy_note(params, json.loads(Path(args.metrics).read_text()))
        if note:
            print(note)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate", __doc__)
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_val.pkl")
    parser.add_argument("--checkpoint", help="the checkpoint to score (default: the params file's evaluate.checkpoint)")
    parser.add_argument("--out", default="runs/evaluate")
    parser.add_argument("--metrics", default="metrics/evaluate.json")
    parser.add_argument("--plots", default="plots/evaluate")
    args = parser.parse_args(argv)
    return run_stage("evaluate", run, args, errors=(DeviceError,))


if __name__ == "__main__":
    sys.exit(main())
