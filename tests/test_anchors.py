"""K-means anchors: reference layout and settings, determinism, clear errors. Against the reference generator
itself: tests/test_parity_data.py."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import yaml

from model.box3d import COS_YAW, SIN_YAW, VX, VZ
from pipeline.anchors import AnchorError, kmeans_anchors
from tests.conftest import ROOT, launch_stage


def boxes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.uniform(-70, 70, (n, 3)) * [1, 1, 0.02]
    size = rng.uniform(0.5, 5.0, (n, 3))
    return np.concatenate([centre, size, rng.uniform(-3, 3, (n, 1))], 1)


def test_layout_and_sizes():
    gt = boxes(2000)
    anchors, metrics = kmeans_anchors(gt, 50, 55.0, seed=0)
    assert anchors.shape == (50, 11) and anchors.dtype == np.float64  # as the reference's file
    used = gt[np.linalg.norm(gt[:, :3], axis=1) <= 55.0]
    assert metrics["boxes_used"] == len(used) and metrics["inertia"] > 0
    assert np.allclose(anchors[:, 3:6], np.log(used[:, 3:6].mean(0)), atol=1e-6)
    assert (anchors[:, SIN_YAW] == 0).all() and (anchors[:, COS_YAW] == 1).all()
    assert (anchors[:, VX : VZ + 1] == 0).all()
    assert (np.linalg.norm(anchors[:, :3], axis=1) <= 55.0).all()  # centres of in-range boxes


def test_deterministic_for_a_seed():
    gt = boxes(3000)
    a, _ = kmeans_anchors(gt, 100, 55.0, seed=3)
    b, _ = kmeans_anchors(gt, 100, 55.0, seed=3)
    c, _ = kmeans_anchors(gt, 100, 55.0, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_more_initialisations_never_fit_worse():
    """n_init k-means runs keep the best (the reference's scikit-learn ran 10; today's default is 1)."""
    gt = boxes(3000)
    one = kmeans_anchors(gt, 100, 55.0, seed=0, n_init=1)[1]
    ten = kmeans_anchors(gt, 100, 55.0, seed=0, n_init=10)[1]  # its first run is the n_init=1 run
    assert ten["n_init"] == 10 and ten["inertia"] < one["inertia"]
    with pytest.raises(AnchorError, match="anchors.n_init"):
        kmeans_anchors(gt, 100, 55.0, seed=0, n_init=0)


def test_fewer_boxes_than_anchors():
    with pytest.raises(AnchorError, match="anchors.num_anchor"):
        kmeans_anchors(boxes(100), 900, 55.0, seed=0)


def test_stage_error_is_clean(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["anchors"]["num_anchor"] = 10_000
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with open(tmp_path / "train.pkl", "wb") as f:
        pickle.dump({"infos": [{"gt_boxes": boxes(500)}], "metadata": {}}, f)
    args = ["--params", "params.yaml", "--out", "a.npy", "--metrics", "m.json"]
    result = launch_stage("anchors", *args, "--infos", "train.pkl", cwd=tmp_path)
    assert result.returncode != 0 and "anchors.num_anchor" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a.npy").exists()
    missing = launch_stage("anchors", *args, "--infos", "nope.pkl", cwd=tmp_path)
    assert missing.returncode != 0 and "nope.pkl" in missing.stderr
