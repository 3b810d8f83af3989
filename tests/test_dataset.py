"""The data pipeline: images and projection matrices stay consistent under every augmentation,
depth targets, the fast image path against the reference chain, the object filter, sequences and
the sampler (frame skipping and sequence reversal). Against the reference code itself:
tests/test_parity_data.py."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.convert import convert
from pipeline.dataset import Sparse4DDataset, collate, lidar2img_matrices
from pipeline.sampler import GroupInBatchSampler, SamplerError
from pipeline.sensors import (
    IMG_MEAN,
    IMG_STD,
    REDUCED_READ,
    DatasetError,
    load_image_chain,
    load_image_fast,
    read_image,
)
from pipeline.settings import CLASSES as DETECTION_CLASSES
from tests.conftest import ROOT

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


def make_dataset(infos_pkl, aug: dict = AUG, **settings) -> Sparse4DDataset:
    """The dataset with the reference's data settings (2 sequences per scene, the exact image chain,
    boxes with LiDAR points, photometric distortion) on `aug`, as a test overrides them."""
    reference = dict(sequences_split_num=2, fast_images=False, use_valid_flag=False, photometric=True)
    return Sparse4DDataset(str(infos_pkl), CLASSES, data_aug_conf=aug, **{**reference, **settings})


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
    ds = make_dataset(infos_pkl, photometric=False, fast_images=fast)
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


@pytest.mark.parametrize("test_mode", [False, True], ids=["train", "test"])
def test_fast_image_path_matches_the_reference_chain(infos_pkl, test_mode):
    """Only the resampling filter differs: under 1 grey level on average, 99 % of the pixels within 16,
    and the same black corners where the rotation or the crop leaves the image."""
    kwargs = dict(photometric=False, with_depth=False, test_mode=test_mode)
    fast = make_dataset(infos_pkl, fast_images=True, **kwargs)
    chain = make_dataset(infos_pkl, fast_images=False, **kwargs)
    np.random.seed(3)
    for idx in range(3):
        aug = fast.get_augmentation()
        if not test_mode and idx == 2:  # a crop wider than the resized image: black beyond its right edge
            aug = {**aug, "resize": 0.38, "resize_dims": (243, 136), "crop": (0, 8, 256, 136), "rotate": -5.0}
        a, b = fast[{"idx": idx, "aug_config": aug}], chain[{"idx": idx, "aug_config": aug}]
        np.testing.assert_array_equal(a["projection_mat"].numpy(), b["projection_mat"].numpy())
        img_a = np.round(denormalise(a["img"].numpy().transpose(1, 0, 2, 3).reshape(3, -1, 256)))
        img_b = np.round(denormalise(b["img"].numpy().transpose(1, 0, 2, 3).reshape(3, -1, 256)))
        diff = np.abs(img_a - img_b)
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 16, (diff.mean(), np.percentile(diff, 99))
        black_a, black_b = (img_a == 0).all(-1), (img_b == 0).all(-1)
        assert black_b.sum() == 0 or (black_a & black_b).sum() >= 0.98 * black_b.sum()
        assert (black_a & ~black_b).sum() <= 0.02 * max(1, black_b.sum()) + 20


def test_training_sample_targets(infos_pkl):
    ds = make_dataset(infos_pkl)
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
    ds = make_dataset(infos_pkl, test_mode=True)
    a, b = ds[0], ds[0]
    assert "gt_bboxes_3d" not in a and "gt_depth" not in a
    np.testing.assert_array_equal(a["img"].numpy(), b["img"].numpy())


def test_sequences_are_scenes_cut_in_two(infos_pkl):
    ds = make_dataset(infos_pkl, sequences_split_num=2)
    # 2 train scenes of 3 frames -> parts of 2 + 1 frames each
    assert ds.flag.tolist() == [0, 0, 1, 2, 2, 3]
    assert make_dataset(infos_pkl, sequences_split_num=1).flag.tolist() == [0, 0, 0, 1, 1, 1]


def test_sampler_walks_each_sequence_forward_with_one_augmentation():
    flags = np.repeat(np.arange(6), 4)  # 6 sequences of 4 frames
    draws = iter(range(10**6))
    sampler = GroupInBatchSampler(
        flags,
        batch_size=2,
        seed=1,
        get_augmentation=lambda: {"draw": next(draws)},
        skip_prob=0.0,
        sequence_flip_prob=0.0,
    )
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


def test_sampler_skips_frames_and_reverses_sequences_at_the_reference_rates():
    """Per slot and step a frame is skipped with skip_prob (when two frames are left); a new sequence
    is walked backward with sequence_flip_prob; its first frame is never skipped. Rates over 10,000
    draws each, within 4 standard deviations."""
    flags = np.repeat(np.arange(400), 6)  # 400 sequences of 6 frames
    position = np.tile(np.arange(6), 400)
    np.random.seed(0)
    it = iter(GroupInBatchSampler(flags, batch_size=2, seed=0, skip_prob=0.5, sequence_flip_prob=0.1))
    eligible = skipped = sequences = reversed_ = 0
    previous: list = [None, None]
    forward = [True, True]
    while sequences < 10_000:
        for slot, idx in enumerate(next(it)):
            prev = previous[slot]
            if prev is None or position[prev] == (5 if forward[slot] else 0):  # a new sequence: never skipped
                sequences += 1
                assert position[idx] in (0, 5)
                reversed_ += position[idx] == 5
                forward[slot] = position[idx] == 0
            else:
                assert flags[prev] == flags[idx]
                step = position[idx] - position[prev] if forward[slot] else position[prev] - position[idx]
                assert step in (1, 2)
                left = 5 - position[prev] if forward[slot] else position[prev]  # frames left before this step
                if left > 1:
                    eligible += 1
                    skipped += step == 2
                else:
                    assert step == 1
            previous[slot] = idx
    for count, total, p in ((skipped, eligible, 0.5), (reversed_, sequences, 0.1)):
        assert abs(count / total - p) <= 4 * np.sqrt(p * (1 - p) / total), (count, total, p)


def test_sampler_probabilities_are_checked():
    with pytest.raises(SamplerError, match="data.skip_prob"):
        GroupInBatchSampler(np.arange(4), batch_size=1, skip_prob=1.5)


def test_ranks_take_different_sequences_and_replay_identically():
    flags = np.repeat(np.arange(8), 3)
    ranks = [GroupInBatchSampler(flags, batch_size=2, world_size=2, rank=r, seed=5) for r in range(2)]
    first = [next(iter(s)) for s in ranks]
    assert not {flags[i] for i in first[0]} & {flags[i] for i in first[1]}
    runs = []
    for _ in range(2):  # the same numpy state replays the same batches (what a resume relies on)
        np.random.seed(1)
        it = iter(GroupInBatchSampler(flags, batch_size=2, world_size=2, rank=0, seed=5))
        runs.append([next(it) for _ in range(6)])
    assert runs[0] == runs[1]
    with pytest.raises(SamplerError, match="global batch of 8"):
        GroupInBatchSampler(np.repeat(np.arange(3), 2), batch_size=4, world_size=2)


def test_boxes_without_lidar_points_are_dropped_unless_use_valid_flag(infos_pkl, tmp_path):
    """As the reference: a box with radar points only (valid_flag, no LiDAR point) is not a target,
    unless data.use_valid_flag."""
    with open(infos_pkl, "rb") as f:
        data = pickle.load(f)
    info = data["infos"][0]
    n = len(info["gt_boxes"])
    radar_only = np.arange(n) % 4 == 0
    info["num_lidar_pts"] = np.where(radar_only, 0, np.maximum(info["num_lidar_pts"], 1))
    info["num_radar_pts"] = np.where(radar_only, 3, 0)
    info["valid_flag"] = (info["num_lidar_pts"] + info["num_radar_pts"]) > 0
    path = tmp_path / "infos.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    kept = {}
    for use_valid_flag in (False, True):
        ds = make_dataset(path, use_valid_flag=use_valid_flag)
        index = [i["token"] for i in ds.data_infos].index(info["token"])
        boxes, _, ids = ds.annotations(ds.data_infos[index])
        kept[use_valid_flag] = len(boxes)
        expected = info["instance_inds"][info["valid_flag"] if use_valid_flag else ~radar_only]
        np.testing.assert_array_equal(ids, expected)
    assert kept == {False: n - radar_only.sum(), True: n}


def first_info(infos_pkl: Path) -> dict:
    """The info that the dataset's index 0 loads (the earliest)."""
    with open(infos_pkl, "rb") as f:
        return min(pickle.load(f)["infos"], key=lambda info: info["timestamp"])


def infos_with_files(infos_pkl: Path, tmp_path: Path, image: Path | None = None, lidar: Path | None = None) -> Path:
    """A copy of the infos whose earliest sample reads `image` as CAM_FRONT and `lidar` as its points."""
    with open(infos_pkl, "rb") as f:
        data = pickle.load(f)
    first = min(data["infos"], key=lambda info: info["timestamp"])
    if image is not None:
        first["cams"]["CAM_FRONT"]["data_path"] = str(image)
    if lidar is not None:
        first["lidar_path"] = str(lidar)
    path = tmp_path / "infos.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def copy_of(src: str | Path, dest_dir: Path, cut: int = 0, pad: bytes = b"") -> Path:
    """A copy of `src` in `dest_dir` without its last `cut` bytes and with `pad` appended."""
    data = Path(src).read_bytes()
    dest = dest_dir / Path(src).name
    dest.write_bytes(data[: len(data) - cut] + pad)
    return dest


def test_unreadable_image_names_the_file(infos_pkl, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = make_dataset(infos_with_files(infos_pkl, tmp_path, image=bad), test_mode=True)
    with pytest.raises(DatasetError, match="broken.jpg"):
        ds[0]
    with pytest.raises(DatasetError, match="missing.pkl"):
        make_dataset(tmp_path / "missing.pkl")


def test_source_size_other_than_data_aug_is_a_clear_error(infos_pkl):
    ds = make_dataset(infos_pkl, aug={**AUG, "W": 800, "H": 450}, test_mode=True)
    with pytest.raises(DatasetError, match=r"data.aug says W x H = 800x450"):
        ds[0]


def twin_jpegs(small_twin: Path) -> list[Path]:
    """The first key frame's image of each camera in the twin."""
    return [
        sorted((small_twin / "samples").glob(f"{cam}/*.jpg"))[0]
        for cam in sorted(os.listdir(small_twin / "samples"))
        if cam.startswith("CAM_")
    ]


@pytest.mark.parametrize("flags", [*REDUCED_READ.values(), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION])
def test_checked_image_reader_decodes_as_cv2_imread(small_twin, flags):
    """Reading the bytes, checking the end marker and decoding them gives imread's pixels, bit for bit."""
    paths = twin_jpegs(small_twin)
    assert len(paths) == 6
    for path in paths:
        np.testing.assert_array_equal(read_image(str(path), flags), cv2.imread(str(path), flags))


def test_cut_jpeg_is_an_error_naming_the_file(infos_pkl, tmp_path):
    """A JPEG cut to its first 5 kB (libjpeg would decode it with its lower part grey) is refused
    by both image paths and by the dataset; so is a missing file."""
    src = Path(first_info(infos_pkl)["cams"]["CAM_FRONT"]["data_path"])
    cut = copy_of(src, tmp_path, cut=src.stat().st_size - 5000)
    assert cv2.imread(str(cut)) is not None  # what the check is for: OpenCV alone accepts it
    aug = {"resize": 0.45, "resize_dims": (288, 162), "crop": (16, 34, 272, 162), "flip": False, "rotate": 0.0}
    message = rf"{cut.name}: truncated or corrupt JPEG"
    with pytest.raises(DatasetError, match=message):
        load_image_fast(str(cut), aug, (256, 128), (640, 360))
    with pytest.raises(DatasetError, match=message):
        load_image_chain(str(cut), aug, (640, 360))
    for fast in (True, False):
        ds = make_dataset(infos_with_files(infos_pkl, tmp_path, image=cut), test_mode=True, fast_images=fast)
        with pytest.raises(DatasetError, match=message):
            ds[0]
    with pytest.raises(DatasetError, match="missing.jpg"):
        load_image_chain(str(tmp_path / "missing.jpg"), aug, (640, 360))


def test_jpeg_with_trailing_zero_padding_loads(small_twin, tmp_path):
    """Padding after the end-of-image marker, as some cameras write, is accepted: the same pixels."""
    src = twin_jpegs(small_twin)[0]
    padded = copy_of(src, tmp_path, pad=bytes(64))
    for flags in REDUCED_READ.values():
        np.testing.assert_array_equal(read_image(str(padded), flags), cv2.imread(str(src), flags))


def test_cut_lidar_file_is_an_error_naming_it(infos_pkl, tmp_path):
    """A LiDAR file cut by 7 bytes (not a whole point) or emptied is refused with its name and size."""
    src = Path(first_info(infos_pkl)["lidar_path"])
    cut = copy_of(src, tmp_path, cut=7)
    size = src.stat().st_size - 7
    ds = make_dataset(infos_with_files(infos_pkl, tmp_path, lidar=cut), photometric=False)
    with pytest.raises(DatasetError, match=rf"{cut.name}: {size} bytes"):
        ds[0]
    cut.write_bytes(b"")
    with pytest.raises(DatasetError, match=rf"{cut.name}: 0 bytes"):
        ds[0]


@pytest.mark.parametrize("profile", ["params.yaml", "params-full.yaml", "params-performance.yaml"])
def test_the_stages_dataset_follows_the_profile(infos_pkl, profile):
    """dataset_from_params is the one way train, validation, evaluate and the benchmarks build
    the dataset: each data setting is the profile's."""
    import yaml

    from pipeline.dataset import dataset_from_params

    params = yaml.safe_load((ROOT / profile).read_text())
    dp = params["data"]
    train = dataset_from_params(params, str(infos_pkl), training=True)
    assert not train.test_mode and train.keep_consistent_seq_aug
    assert (train.photometric, train.fast_images, train.use_valid_flag) == (
        dp["photometric"],
        dp["fast_images"],
        dp["use_valid_flag"],
    )
    scenes = len(set(train.flag.tolist()))
    whole = dataset_from_params(params, str(infos_pkl), training=False, fast_images=False)
    assert (
        whole.test_mode
        and not whole.fast_images
        and len(set(whole.flag.tolist())) * dp["sequences_split_num"] == scenes
    )
