"""The data pipeline: images and projection matrices stay consistent under every augmentation,
depth targets, the fast image path against the reference chain, sequences and the sampler."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from model.detector import CLASSES as DETECTION_CLASSES
from pipeline.convert import convert
from pipeline.dataset import IMG_MEAN, IMG_STD, DatasetError, Sparse4DDataset, collate, lidar2img_matrices
from pipeline.sampler import GroupInBatchSampler, SamplerError

CLASSES = list(DETECTION_CLASSES)
AUG = {
    "H": 360,
    "W": 640,
    "final_dim": [128, 256],
    "resize_lim": [0.40, 0.47],
    "bot_pct_lim": [0.0, 0.0],
    "rot_lim": [-5.4, 5.4],
    "rand_flip": True,
    "rot3d_range": [-0.3925, 0.3925],
}


@pytest.fixture(scope="module")
def infos_pkl(small_twin, tmp_path_factory):
    """Train infos of the small twin with absolute paths."""
    root = small_twin.parent.parent
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = convert("data/nuscenes", "v1.0-mini")
    finally:
        os.chdir(cwd)
    infos = result["train"]["infos"]
    for info in infos:
        info["lidar_path"] = str(root / info["lidar_path"])
        for cam in info["cams"].values():
            cam["data_path"] = str(root / cam["data_path"])
    path = tmp_path_factory.mktemp("infos") / "train.pkl"
    with open(path, "wb") as f:
        pickle.dump({"infos": infos, "metadata": {"version": "v1.0-mini"}}, f)
    return path


def denormalise(img_chw: np.ndarray) -> np.ndarray:
    return img_chw.transpose(1, 2, 0) * IMG_STD + IMG_MEAN


def sample_at(img: np.ndarray, uv: np.ndarray) -> np.ndarray:
    u = np.clip(np.round(uv[:, 0]).astype(int), 0, img.shape[1] - 1)
    v = np.clip(np.round(uv[:, 1]).astype(int), 0, img.shape[0] - 1)
    return img[v, u].astype(np.float32)


def project(mat: np.ndarray, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = xyz @ mat[:3, :3].T + mat[:3, 3]
    return p[:, :2] / p[:, 2:3], p[:, 2]


@pytest.mark.parametrize("fast", [True, False])
def test_augmented_images_match_their_projection_matrices(infos_pkl, fast):
    """A LiDAR point's colour in the source image equals its colour where the sample's projection
    matrix puts it in the augmented image (resize, crop, flip, rotation and 3D rotation)."""
    ds = Sparse4DDataset(str(infos_pkl), CLASSES, AUG, photometric=False, fast_images=fast)
    info = ds.data_infos[1]
    aug = {
        "resize": 0.45,
        "resize_dims": (288, 162),
        "crop": (20, 34, 276, 162),
        "flip": True,
        "rotate": 4.0,
        "rotate_3d": 0.3,
    }
    sample = ds[{"idx": 1, "aug_config": aug}]
    points = np.fromfile(info["lidar_path"], np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
    cos, sin = np.cos(0.3), np.sin(0.3)
    rotated = points @ np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]]).T  # the LiDAR frame turns by rotate_3d
    raw_mats, _ = lidar2img_matrices(info)
    diffs = []
    for cam, (raw_mat, cam_info) in enumerate(zip(raw_mats, info["cams"].values())):
        src = np.asarray(Image.open(cam_info["data_path"]).convert("RGB"))
        uv_src, depth_src = project(raw_mat, points)
        uv_aug, depth_aug = project(sample["projection_mat"][cam].double().numpy(), rotated)
        np.testing.assert_allclose(depth_aug, depth_src, rtol=1e-4, atol=1e-3)
        aug_img = denormalise(sample["img"][cam].numpy())
        margin = 3
        ok = (depth_src > 1) & (uv_src[:, 0] > margin) & (uv_src[:, 0] < src.shape[1] - margin)
        ok &= (uv_src[:, 1] > margin) & (uv_src[:, 1] < src.shape[0] - margin)
        ok &= (
            (uv_aug[:, 0] > margin)
            & (uv_aug[:, 0] < 256 - margin)
            & (uv_aug[:, 1] > margin)
            & (uv_aug[:, 1] < 128 - margin)
        )
        if ok.sum() > 20:
            diffs.append(np.abs(sample_at(src, uv_src[ok]) - sample_at(aug_img, uv_aug[ok])).mean(axis=1))
    diffs = np.concatenate(diffs)
    assert len(diffs) > 200
    # a wrong flip, crop offset or rotation moves points by many pixels: colours disagree broadly
    assert np.median(diffs) < 12, np.median(diffs)


def test_fast_image_path_matches_the_reference_chain(infos_pkl):
    fast = Sparse4DDataset(str(infos_pkl), CLASSES, AUG, photometric=False, with_depth=False)
    chain = Sparse4DDataset(str(infos_pkl), CLASSES, AUG, photometric=False, with_depth=False, fast_images=False)
    np.random.seed(3)
    aug = fast.get_augmentation()
    a, b = fast[{"idx": 0, "aug_config": aug}], chain[{"idx": 0, "aug_config": aug}]
    np.testing.assert_array_equal(a["projection_mat"].numpy(), b["projection_mat"].numpy())
    diff = np.abs(denormalise(a["img"][0].numpy()) - denormalise(b["img"][0].numpy()))
    assert diff.mean() < 8, diff.mean()


def test_training_sample_targets(infos_pkl):
    ds = Sparse4DDataset(str(infos_pkl), CLASSES, AUG)
    np.random.seed(0)
    s = ds[2]
    assert s["img"].shape == (6, 3, 128, 256)
    boxes, labels = s["gt_bboxes_3d"].numpy(), s["gt_labels_3d"].numpy()
    assert boxes.shape[1] == 9 and len(labels) == len(boxes) == len(s["instance_id"]) > 0
    assert (np.hypot(boxes[:, 0], boxes[:, 1]) <= 55).all() and ((labels >= 0) & (labels < 10)).all()
    assert (np.abs(boxes[:, 6]) <= np.pi).all()
    assert [d.shape for d in s["gt_depth"]] == [(6, 32, 64), (6, 16, 32), (6, 8, 16)]
    depth = s["gt_depth"][0]
    assert ((depth == -1) | ((depth >= 0.1) & (depth <= 60))).all() and (depth > 0).sum() > 100
    batch = collate([s, ds[3]])
    assert batch["img"].shape == (2, 6, 3, 128, 256) and batch["projection_mat"].shape == (2, 6, 4, 4)
    assert batch["gt_depth"][0].shape == (12, 32, 64) and len(batch["img_metas"]) == 2
    assert batch["timestamp"].dtype.is_floating_point and batch["focal"].shape == (2, 6)


def test_test_mode_is_deterministic_and_has_no_targets(infos_pkl):
    ds = Sparse4DDataset(str(infos_pkl), CLASSES, AUG, test_mode=True)
    a, b = ds[0], ds[0]
    assert "gt_bboxes_3d" not in a and "gt_depth" not in a
    np.testing.assert_array_equal(a["img"].numpy(), b["img"].numpy())


def test_sequences_are_scenes_cut_in_two(infos_pkl):
    ds = Sparse4DDataset(str(infos_pkl), CLASSES, AUG, sequences_split_num=2)
    # 2 train scenes of 3 frames -> parts of 2 + 1 frames each
    assert ds.flag.tolist() == [0, 0, 1, 2, 2, 3]
    assert Sparse4DDataset(str(infos_pkl), CLASSES, AUG, sequences_split_num=1).flag.tolist() == [0, 0, 0, 1, 1, 1]


def test_sampler_walks_each_sequence_forward_with_one_augmentation():
    flags = np.repeat(np.arange(6), 4)  # 6 sequences of 4 frames
    draws = iter(range(10**6))
    sampler = GroupInBatchSampler(flags, batch_size=2, seed=1, get_augmentation=lambda: {"draw": next(draws)})
    it = iter(sampler)
    batches = [next(it) for _ in range(12)]
    for slot in range(2):
        items = [b[slot] for b in batches]
        for start in range(0, 12, 4):  # a sequence every 4 steps
            seq = items[start : start + 4]
            assert [x["idx"] for x in seq] == sorted(x["idx"] for x in seq)
            assert len({flags[x["idx"]] for x in seq}) == 1 and len({x["aug_config"]["draw"] for x in seq}) == 1
    seen = [flags[b[s]["idx"]] for b in batches[::4] for s in range(2)]
    assert sorted(seen) == list(range(6))  # an epoch visits every sequence once


def test_ranks_take_different_sequences_and_replay_identically():
    flags = np.repeat(np.arange(8), 3)
    ranks = [GroupInBatchSampler(flags, batch_size=2, world_size=2, rank=r, seed=5) for r in range(2)]
    first = [next(iter(s)) for s in ranks]
    assert not {flags[i] for i in first[0]} & {flags[i] for i in first[1]}
    again = next(iter(GroupInBatchSampler(flags, batch_size=2, world_size=2, rank=0, seed=5)))
    assert again == first[0]
    with pytest.raises(SamplerError, match="global batch of 8"):
        GroupInBatchSampler(np.repeat(np.arange(3), 2), batch_size=4, world_size=2)


def test_unreadable_image_names_the_file(infos_pkl, tmp_path):
    with open(infos_pkl, "rb") as f:
        data = pickle.load(f)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    data["infos"][0]["cams"]["CAM_FRONT"]["data_path"] = str(bad)
    path = tmp_path / "infos.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    ds = Sparse4DDataset(str(path), CLASSES, AUG, test_mode=True)
    with pytest.raises(DatasetError, match="broken.jpg"):
        ds[0]
    with pytest.raises(DatasetError, match="missing.pkl"):
        Sparse4DDataset(str(tmp_path / "missing.pkl"), CLASSES, AUG)


def test_source_size_other_than_data_aug_is_a_clear_error(infos_pkl):
    ds = Sparse4DDataset(str(infos_pkl), CLASSES, {**AUG, "W": 800, "H": 450}, test_mode=True)
    with pytest.raises(DatasetError, match=r"data.aug says W x H = 800x450"):
        ds[0]
