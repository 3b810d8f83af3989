"""Deformable aggregation speed: the plain grid_sample formulation against the torch fast path (CPU or GPU).

Both run in this process on the same inputs at the Sparse4Dv3 training configuration: bs 1, 900 anchors + 5
denoising groups x 32 boxes x 2 (= 1220 anchors), 13 key points, 6 cameras, the 4 FPN levels of a 256x704 input
(64x176, 32x88, 16x44, 8x22), 256 channels in 8 groups. Timed: forward (autograd on, as in training), forward +
backward (gradients w.r.t. the feature maps, the points and the weights), and inference forward (no_grad).

Inputs are made the way the model makes them: anchor boxes drawn in a 55 m range around the ego car (centre
x, y uniform in [-55, 55] m, z in [-2, 0.5] m, random sizes and yaw), 13 key points per box (7 fixed: centre and
+-0.45 x size along each axis, 6 random inside the box), projected through 6 nuScenes-like pinhole cameras
(yaw 0, +-55, +-110, 180 degrees; 70 degree horizontal field of view, 110 for the back camera; 704x256 images)
exactly as DeformableFeatureAggregation.project_points does (depth clamped at 1e-5, no mask for points behind a
camera). The script prints how many cameras each key point falls into.

Before timing, the script checks that the fast path gives the compiled op's output and gradients on these inputs
(the kernel oracle of tests/kernel_oracle.py, float32: max |fast - op| within 1e-4 of max |op|, per tensor) and
exits with status 1 when it does not; it also prints how far the grid_sample formulation is from the op (they
differ in the half-pixel band around each feature map). With --device cuda and the reference's compiled op
importable (module deformable_aggregation_ext), the op itself is checked and timed too.

Run: python -m benchmarks.deformable_aggregation_speed [--anchors 1220] [--repeats 3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

from model.ops.deformable_aggregation import (
    _load_cuda_ext,
    deformable_aggregation,
    deformable_aggregation_grid_sample,
    flatten_feature_maps,
)
from tests.kernel_oracle import deformable_aggregation_oracle

IMAGE_WH = (704, 256)
STRIDES = (4, 8, 16, 32)
# (yaw in degrees, horizontal field of view in degrees) of the six cameras
CAMERAS = ((0.0, 70.0), (-55.0, 70.0), (55.0, 70.0), (-110.0, 70.0), (110.0, 70.0), (180.0, 110.0))
RELATIVE_TOLERANCE = 1e-4  # float32: max |fast - plain| <= this * max |plain|, per tensor
FIX_SCALE = ((0, 0, 0), (0.45, 0, 0), (-0.45, 0, 0), (0, 0.45, 0), (0, -0.45, 0), (0, 0, 0.45), (0, 0, -0.45))


def projection_matrices() -> torch.Tensor:
    """(num_cams, 4, 4) LiDAR (x forward, y left, z up) -> pixels * depth, cameras 1 m from the centre."""
    mats = []
    width, height = IMAGE_WH
    for yaw_deg, fov_deg in CAMERAS:
        yaw = math.radians(yaw_deg)
        focal = (width / 2) / math.tan(math.radians(fov_deg) / 2)
        forward = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0], dtype=torch.float64)
        right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0], dtype=torch.float64)
        down = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
        rot = torch.stack([right, down, forward])  # camera <- lidar
        centre = forward * 1.0
        extrinsic = torch.eye(4, dtype=torch.float64)
        extrinsic[:3, :3] = rot
        extrinsic[:3, 3] = -rot @ centre
        intrinsic = torch.eye(4, dtype=torch.float64)
        intrinsic[0, 0] = intrinsic[1, 1] = focal
        intrinsic[0, 2], intrinsic[1, 2] = width / 2, height / 2
        mats.append(intrinsic @ extrinsic)
    return torch.stack(mats)


def key_points(num_anchor: int, generator: torch.Generator) -> torch.Tensor:
    """(num_anchor, 13, 3) key points of random boxes within 55 m."""
    centre = torch.empty(num_anchor, 3, dtype=torch.float64)
    centre[:, :2].uniform_(-55, 55, generator=generator)
    centre[:, 2].uniform_(-2, 0.5, generator=generator)
    low = torch.tensor([0.5, 0.5, 0.8], dtype=torch.float64)  # (l, w, h) ranges in metres
    high = torch.tensor([12.0, 3.0, 4.0], dtype=torch.float64)
    size = low * (high / low) ** torch.rand(num_anchor, 3, dtype=torch.float64, generator=generator)
    yaw = torch.rand(num_anchor, dtype=torch.float64, generator=generator) * 2 * math.pi
    scale = torch.cat(
        [
            torch.tensor(FIX_SCALE, dtype=torch.float64).expand(num_anchor, -1, -1),
            torch.rand(num_anchor, 6, 3, dtype=torch.float64, generator=generator) - 0.5,
        ],
        dim=1,
    )  # (num_anchor, 13, 3)
    local = scale * size[:, None]
    cos, sin = yaw.cos()[:, None], yaw.sin()[:, None]
    rotated = torch.stack(
        [cos * local[..., 0] - sin * local[..., 1], sin * local[..., 0] + cos * local[..., 1], local[..., 2]], -1
    )
    return rotated + centre[:, None]


def make_inputs(
    num_anchor: int, channels: int = 256, num_groups: int = 8, seed: int = 0
) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """feature_maps (levels of (1, 6, C, H, W)), points_2d (1, A, 13, 6, 2), weights (1, A, 13, 6, 4, G)."""
    generator = torch.Generator().manual_seed(seed)
    num_cams, num_levels = len(CAMERAS), len(STRIDES)
    width, height = IMAGE_WH
    kps = key_points(num_anchor, generator)  # (A, 13, 3)
    homogeneous = torch.cat([kps, torch.ones_like(kps[..., :1])], -1)  # (A, 13, 4)
    projected = torch.einsum("nij,apj->apni", projection_matrices(), homogeneous)  # (A, 13, num_cams, 4)
    points_2d = projected[..., :2] / projected[..., 2:3].clamp(min=1e-5)
    points_2d = (points_2d / torch.tensor([width, height], dtype=torch.float64))[None].float()
    feature_maps = [torch.randn(1, num_cams, channels, height // s, width // s, generator=generator) for s in STRIDES]
    logits = torch.randn(1, num_anchor, 13 * num_cams * num_levels, num_groups, generator=generator)
    weights = logits.softmax(dim=2).reshape(1, num_anchor, 13, num_cams, num_levels, num_groups)
    return feature_maps, points_2d, weights


def camera_stats(points_2d: torch.Tensor) -> str:
    inside = ((points_2d >= 0) & (points_2d <= 1)).all(-1).sum(-1).flatten()  # cameras per (anchor, point)
    shares = ", ".join(f"{k}: {(inside == k).float().mean() * 100:.1f}%" for k in range(int(inside.max()) + 1))
    return f"cameras per key point: mean {inside.float().mean():.2f} ({shares})"


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_oracle(feature_maps: List[torch.Tensor], points_2d: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The compiled op's semantics (kernel transcription), on the op's flattened layout."""
    mc_ms_feat, spatial_shape, scale_start_index = flatten_feature_maps(feature_maps)
    return deformable_aggregation_oracle(mc_ms_feat, spatial_shape, scale_start_index, points_2d, weights)


def max_errors(
    a: Tuple[torch.Tensor, ...], b: Tuple[torch.Tensor, ...], names: List[str]
) -> Dict[str, Tuple[float, float]]:
    return {n: ((x - y).abs().max().item(), y.abs().max().item()) for n, x, y in zip(names, a, b)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--anchors", type=int, default=900 + 5 * 32 * 2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    feature_maps, points_2d, weights = make_inputs(args.anchors)
    feature_maps, points_2d, weights = [f.to(device) for f in feature_maps], points_2d.to(device), weights.to(device)
    leaves = [*[f.requires_grad_() for f in feature_maps], points_2d.requires_grad_(), weights.requires_grad_()]
    grad_out = torch.randn(1, args.anchors, feature_maps[0].shape[2]).to(device)
    print(
        f"anchors {args.anchors}, 13 points, 6 cameras, levels {[tuple(f.shape[-2:]) for f in feature_maps]}, "
        f"C {feature_maps[0].shape[2]}, groups {weights.shape[-1]}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
    )
    print(camera_stats(points_2d.detach()))

    impls: Dict[str, Callable[..., torch.Tensor]] = {
        "plain": deformable_aggregation_grid_sample,
        "fast": lambda f, p, w: deformable_aggregation(f, p, w, backend="torch"),
    }
    if device.type == "cuda" and _load_cuda_ext() is not None:
        impls["cuda_ext"] = lambda f, p, w: deformable_aggregation(f, p, w, backend="cuda_ext")
    # correctness on these inputs first: every implementation against the op's semantics
    outs, grads = {}, {}
    for name, fn in {**impls, "op": op_oracle}.items():
        out = fn(feature_maps, points_2d, weights)
        outs[name] = out.detach()
        grads[name] = torch.autograd.grad(out, leaves, grad_out)
    names = ["output", *[f"grad features[{i}]" for i in range(len(feature_maps))], "grad points", "grad weights"]
    failed = False
    for name in impls:
        errors = max_errors((outs[name], *grads[name]), (outs["op"], *grads["op"]), names)
        print(f"max |{name} - op| (max |op|): " + ", ".join(f"{k} {e:.2e} ({m:.2e})" for k, (e, m) in errors.items()))
        bad = [k for k, (err, scale) in errors.items() if not err <= RELATIVE_TOLERANCE * max(scale, 1e-12)]
        if name == "plain":
            print(f"  grid_sample differs from the op in {', '.join(bad) or 'nothing'} (its border band)")
        elif bad:
            print(f"MISMATCH: {name} and the op disagree (relative error > {RELATIVE_TOLERANCE:g}) in {', '.join(bad)}")
            failed = True
    if failed:
        sys.exit(1)
    print(f"fast path == op semantics (relative error <= {RELATIVE_TOLERANCE:g} for every tensor)")

    results: Dict[str, Dict[str, float]] = {}
    for name, fn in impls.items():

        def forward(fn=fn) -> None:
            fn(feature_maps, points_2d, weights)

        def forward_backward(fn=fn) -> None:
            torch.autograd.grad(fn(feature_maps, points_2d, weights), leaves, grad_out)

        def inference(fn=fn) -> None:
            with torch.no_grad():
                fn(feature_maps, points_2d, weights)

        results[name] = {
            "forward": timed(forward, args.repeats, device),
            "forward+backward": timed(forward_backward, args.repeats, device),
            "inference forward (no_grad)": timed(inference, args.repeats, device),
        }
    others = [name for name in impls if name != "plain"]
    print(f"{'':30s}{'plain':>12s}" + "".join(f"{n:>12s}{'speed-up':>10s}" for n in others))
    for key in results["plain"]:
        plain = results["plain"][key]
        row = "".join(f"{results[n][key] * 1000:10.1f}ms{plain / results[n][key]:9.1f}x" for n in others)
        print(f"{key:30s}{plain * 1000:10.1f}ms{row}")
    plain, fast = results["plain"]["forward+backward"], results["fast"]["forward+backward"]
    where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"forward+backward: grid_sample {plain * 1000:.1f} ms, torch {fast * 1000:.1f} ms, "
        f"ratio {plain / fast:.1f}x (target >= 5x) on {where}"
    )


if __name__ == "__main__":
    main()
