"""Arithmetic whose bits are the same on every machine, for the data stages' outputs.

Three things in numpy give results that differ in the last bit from one CPU to another:

- `@`, `np.dot` and `np.linalg` go to OpenBLAS, which picks its kernels by CPU (Haswell,
  SkylakeX, ...: other summation orders and fused multiply-adds);
- `np.sin` and `np.cos` on float64 call the C library, which picks FMA or SSE2 code by CPU;
- several float64 functions (`np.arctan2`, `np.exp`, `np.log`, ...) run SIMD code that numpy
  picks by CPU (AVX-512 or not).

A last bit that reaches a rounding boundary — a pixel, a texture cell, a digit written to a table
— changes the data set's bytes. The functions here use only +, -, *, / and sqrt, each as its own
numpy operation in a fixed order: IEEE 754 rounds every one of them the same way everywhere, and
numpy never fuses two of them. (`tests/test_synthesize.py` writes the twin under other OpenBLAS
kernels, numpy's baseline dispatch and the C library's non-FMA code, and compares every file.)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# pi / 2 in two parts (Cody-Waite): the high part's multiples are nearly exact.
_PIO2_HI = 1.5707963267948966
_PIO2_LO = 6.123233995736766e-17
# Taylor coefficients on |r| <= pi / 4: the next terms are below 1e-19.
_SIN = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(1, 10))
_COS = tuple((-1) ** k / math.factorial(2 * k) for k in range(1, 10))


def sin_cos(x: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """sin(x) and cos(x) in float64, within 2e-16 of the C library's, identical on every machine."""
    x = np.asarray(x, dtype=np.float64)
    n = np.rint(x / _PIO2_HI)
    r = (x - n * _PIO2_HI) - n * _PIO2_LO  # |r| <= pi / 4
    r2 = r * r
    ps, pc = np.zeros_like(r), np.zeros_like(r)
    for cs, cc in zip(reversed(_SIN), reversed(_COS)):
        ps = ps * r2 + cs
        pc = pc * r2 + cc
    s = r + r * (r2 * ps)
    c = 1.0 + r2 * pc
    quadrant = np.mod(n, 4.0)
    sin = np.where(quadrant == 0, s, np.where(quadrant == 1, c, np.where(quadrant == 2, -s, -c)))
    cos = np.where(quadrant == 0, c, np.where(quadrant == 1, -s, np.where(quadrant == 2, -c, s)))
    return sin, cos


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for (..., n, k) and (..., k, m) arrays (broadcast), summed over k in order."""
    a, b = np.asarray(a), np.asarray(b)
    out = a[..., :, 0:1] * b[..., 0:1, :]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, k : k + 1] * b[..., k : k + 1, :]
    return out


def transform(points: np.ndarray, rot: np.ndarray, trans: np.ndarray | Sequence[float] | None = None) -> np.ndarray:
    """(..., 3) points rotated by (3, 3) rot and moved by (3,) trans: points @ rot.T + trans, in
    the dtype of the points (a float32 rot or trans is used as given)."""
    points = np.asarray(points)
    out = points[..., 0:1] * rot[:, 0] + points[..., 1:2] * rot[:, 1]
    for k in range(2, points.shape[-1]):
        out = out + points[..., k : k + 1] * rot[:, k]
    return out if trans is None else out + np.asarray(trans, dtype=out.dtype)


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum over the last axis of a * b, in order (a and b broadcast)."""
    a, b = np.asarray(a), np.asarray(b)
    out = a[..., 0] * b[..., 0]
    for k in range(1, max(a.shape[-1], b.shape[-1])):
        out = out + a[..., k] * b[..., k]
    return out


def norm(v: np.ndarray) -> np.ndarray:
    """Euclidean length over the last axis."""
    return np.sqrt(dot(v, v))


def quaternion_matrix(q: Sequence[float] | np.ndarray) -> np.ndarray:
    """(3, 3) rotation of a [w, x, y, z] quaternion (normalised first), as pyquaternion's
    rotation_matrix but without its BLAS products."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = q / norm(q)
    return np.array(
        [
            [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
            [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
            [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
        ]
    )


def matrix_quaternion(rot: np.ndarray) -> list[float]:
    """[w, x, y, z] of a (3, 3) rotation, w >= 0 (Shepperd's method: the largest of the four
    squares first, so no component comes from a difference of nearly equal numbers)."""
    m = np.asarray(rot, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    squares = [trace, m[0, 0], m[1, 1], m[2, 2]]
    i = int(np.argmax(squares))
    if i == 0:
        s = 2.0 * math.sqrt(1.0 + trace)
        q = [s / 4.0, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif i == 1:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, s / 4.0, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif i == 2:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4.0, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4.0]
    sign = -1.0 if q[0] < 0 else 1.0
    return [float(sign * v) + 0.0 for v in q]  # + 0.0: no -0.0 in a written table


def pose_matrix(rotation: Sequence[float], translation: Sequence[float]) -> np.ndarray:
    """(4, 4) homogeneous transform from a [w, x, y, z] rotation and an (x, y, z) translation."""
    mat = np.eye(4)
    mat[:3, :3] = quaternion_matrix(rotation)
    mat[:3, 3] = translation
    return mat


def rigid_inverse(mat: np.ndarray) -> np.ndarray:
    """Inverse of a (4, 4) rotation + translation: [R.T, -R.T t]."""
    out = np.eye(4)
    out[:3, :3] = mat[:3, :3].T
    out[:3, 3] = -transform(mat[:3, 3], mat[:3, :3].T)
    return out
