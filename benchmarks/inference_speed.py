"""Inference speed of the full Sparse4Dv3 model on this machine: ours against the reference
(HorizonRobotics/Sparse4D c41df4bb), same weights, same frames, in one process.

As the reference's tools/benchmark.py: frames of one scene in temporal order (the instance bank
carries its instances from frame to frame), batch 1, each model call timed alone (no data
loading), the first frames not counted (warm-up). The model is params-full.yaml's (ResNet-50,
900 anchors, 6 decoders) on 6 cameras at 256 x 704, the frames are synthetic
(tests/reference.py `make_scene`). The reference runs on the CPU through its grid_sample
fallback (`use_deformable_func=False`: its compiled op is CUDA only); ours through its CPU
backend, channels-last as the evaluate stage runs it, optionally with conv-BN fused
(`--fuse-conv-bn`, evaluate.fuse_conv_bn). The two models alternate round by round, so a slow
moment of the machine falls on both. Needs the reference checkout (tests/reference.py).

Run: python -m benchmarks.inference_speed [--frames 8] [--warmup 2] [--rounds 2] [--fuse-conv-bn]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=8, help="frames of the scene, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=704)
    parser.add_argument("--fuse-conv-bn", action="store_true")
    args = parser.parse_args(argv)
    if args.frames <= args.warmup:
        parser.error("--frames must be more than --warmup")

    from model import build_model
    from tests.reference import (
        build_reference,
        copy_state,
        make_scene,
        model_params,
        perturb_weights,
        realistic_anchor,
        reference_params,
        require_reference,
        running_reference,
    )

    require_reference()
    params = reference_params(model_params("full"))
    anchor = realistic_anchor(900, seed=1)
    torch.manual_seed(0)
    np.random.seed(0)
    ours = build_model(params, anchor)
    perturb_weights(ours, seed=2)  # not the initial BatchNorm statistics: fusion then changes something
    reference = build_reference(params, anchor, use_deformable_func=False)
    copy_state(ours, reference)
    ours.eval()
    reference.eval()
    ours.use_channels_last()
    if args.fuse_conv_bn:
        from mmcv.cnn import fuse_conv_bn

        fuse_conv_bn(ours)
    frames = make_scene(args.frames, 1, args.height, args.width, seed=3)
    cpu = torch.device("cpu")

    def run_ours(frame: dict):
        return ours(frame)

    def run_reference(frame: dict):
        data = dict(frame)
        img = data.pop("img")
        with running_reference(cpu):
            return reference(img=img, **data)

    def scene_times(run) -> list[float]:
        times = []
        for frame in frames:
            start = time.perf_counter()
            with torch.no_grad():
                run(frame)
            times.append(time.perf_counter() - start)
        return times[args.warmup :]

    per_frame: dict[str, list[float]] = {"ours": [], "reference": []}
    for r in range(args.rounds):
        for name, run in (("ours", run_ours), ("reference", run_reference)):
            ours.head.instance_bank.reset()
            reference.head.instance_bank.reset()
            times = scene_times(run)
            per_frame[name] += times
            print(f"round {r + 1} {name:9s}: {1000 * statistics.mean(times):8.1f} ms/frame", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.frames} frames of 6 x "
          f"{args.height}x{args.width}, {args.warmup} warm-up, {args.rounds} rounds; fused conv-BN: {args.fuse_conv_bn}")  # fmt: skip
    fps = {name: 1 / statistics.mean(t) for name, t in per_frame.items()}
    for name, value in fps.items():
        print(f"{name:9s}: {1000 / value:8.1f} ms/frame  {value:6.3f} FPS")
    print(f"ours / reference FPS: {fps['ours'] / fps['reference']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
