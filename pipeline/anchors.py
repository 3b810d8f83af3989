"""K-means anchors for the instance bank, as the reference anchor generator makes them.

Layout of each anchor (Sparse4D's box encoding):
    [x, y, z, log l, log w, log h, sin yaw, cos yaw, vx, vy, vz] (model/box3d.py)
Centres are the k-means cluster centres of the train boxes' centres within `detection_range`;
every anchor gets the log of the mean box size (columns 3..5 of `gt_boxes`, in the info
layout), yaw 0 (cos yaw = 1) and zero velocity. All boxes count, whatever their class or point
count, as in the reference (`tools/anchor_generator.py`), which is also float64 like its file.

The reference calls scikit-learn's `KMeans(n_clusters=num_anchor)` with the defaults of its time
(k-means++ initialisation, Lloyd iterations, max_iter 300, tol 1e-4, n_init 10: scikit-learn
< 1.4) and no seed; here n_init is a parameter (scikit-learn's default is now 1) and the run is
seeded, so that the anchors are reproducible.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from model.box3d import COS_YAW, HEIGHT, LENGTH, WIDTH, X, Y, Z
from pipeline.exact import norm


class AnchorError(ValueError):
    """Not enough boxes for the requested anchors, or bad parameters; the message names them."""


REFERENCE_N_INIT = 10  # scikit-learn's KMeans default when the reference ran (before 1.4)


def kmeans_anchors(
    gt_boxes: np.ndarray, num_anchor: int, detection_range: float, seed: int, n_init: int = REFERENCE_N_INIT
) -> tuple[np.ndarray, dict[str, float]]:
    """(num_anchor, 11) float64 anchors from (n, >=6) LiDAR-frame boxes, and k-means metrics."""
    if n_init < 1:
        raise AnchorError(f"anchors.n_init: expected a positive number of k-means runs, got {n_init}")
    if num_anchor < 1:
        raise AnchorError(f"anchors.num_anchor: expected a positive number, got {num_anchor}")
    if detection_range <= 0:
        raise AnchorError(f"anchors.detection_range: expected metres > 0, got {detection_range}")
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, gt_boxes.shape[-1] if gt_boxes.size else 7)
    in_range = gt_boxes[norm(gt_boxes[:, :3]) <= detection_range]
    if len(in_range) < num_anchor:
        raise AnchorError(
            f"anchors.num_anchor: {num_anchor} anchors need at least as many train boxes within "
            f"{detection_range} m, but there are {len(in_range)}"
        )
    # One thread: scikit-learn's Lloyd adds the chunks' partial sums in whatever order its
    # OpenMP threads finish, so the centres' last bits would depend on the core count and timing.
    with threadpool_limits(limits=1):
        km = KMeans(
            n_clusters=num_anchor,
            init="k-means++",
            n_init=n_init,
            max_iter=300,
            tol=1e-4,
            algorithm="lloyd",
            random_state=seed,
        ).fit(in_range[:, [X, Y, Z]])
    anchors = np.zeros((num_anchor, 11), dtype=np.float64)
    anchors[:, [X, Y, Z]] = km.cluster_centers_
    # Rounded to 1e-9: numpy's float64 log is SIMD code chosen by CPU (AVX-512 or not), whose last
    # bit differs between machines (pipeline/exact.py); the anchors file must not.
    anchors[:, [LENGTH, WIDTH, HEIGHT]] = np.round(np.log(in_range[:, [LENGTH, WIDTH, HEIGHT]].mean(axis=0)), 9)
    anchors[:, COS_YAW] = 1.0
    return anchors, {"inertia": float(km.inertia_), "boxes_used": int(len(in_range)), "n_init": int(n_init)}
