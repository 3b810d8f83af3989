"""Our data path against the reference's (HorizonRobotics/Sparse4D c41df4bb), on the synthetic twin.

* converter: our infos and those of the reference's ``tools/nuscenes_converter.py``, key for key and value for
  value (1e-6), on the twin and on a variant of its tables with tilted ego poses (pitch and roll of a few
  degrees, as real vehicles have), boxes seen by radar only and a scene outside both splits;
* dataset: the reference's ``NuScenes3DDetTrackDataset`` with its train and test pipelines (the config's,
  ``projects/configs/sparse4dv3_temporal_r50_1x8_bs6_256x704.py``) and ours with the same augmentation draws:
  images (exact path: at most 1 grey level; the photometric distortion drawn from the same numpy state),
  projection matrices, image sizes, focal lengths, timestamps, poses, gt boxes, labels, instance ids and
  depth maps (1e-5, integers exact);
* sampler: the reference's ``GroupInBatchSampler`` and ours hand out the same batches — indices, skipped
  frames, reversed sequences and augmentations — for the same seeds;
* anchors: the reference's ``tools/anchor_generator.py`` and ours on the same train infos and k-means seed
  (scikit-learn's default number of runs, today 1; the reference's time had 10, our profiles' n_init).

Skipped, with the reason, when the reference checkout is absent (see tests/reference.py).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from pipeline.anchors import kmeans_anchors
from pipeline.convert import convert
from pipeline.dataset import Sparse4DDataset
from pipeline.sampler import GroupInBatchSampler
from pipeline.sensors import IMG_STD
from pipeline.settings import CLASSES as DETECTION_CLASSES
from tests.reference import reference_modules, require_reference
from tests.test_convert import write_variant

CLASSES = list(DETECTION_CLASSES)  # the reference config's class_names, in its order
# The reference config's augmentation, on the small twin's 640 x 360 images.
AUG = {
    "H": 360,
    "W": 640,
    "final_dim": [128, 288],
    "resize_lim": [0.40, 0.47],
    "bot_pct_lim": [0.0, 0.0],
    "rot_lim": [-5.4, 5.4],
    "rand_flip": True,
    "rot3d_range": [-0.3925, 0.3925],
}
# the reference's data settings over AUG, as reference_dataset configures its dataset
REFERENCE_DATA = dict(
    data_aug_conf=AUG, sequences_split_num=2, fast_images=False, use_valid_flag=False, photometric=True
)
IMG_NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)


# --------------------------------------------------------------------------------------- the reference


def reference_tool(name: str) -> types.ModuleType:
    """One of the reference's ``tools/*.py`` scripts as a module."""
    path = require_reference() / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"reference_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def reference_numpy() -> Iterator[None]:
    """The reference's dataset code uses ``np.int`` (removed in numpy 1.24): an alias while it runs."""
    had = hasattr(np, "int")
    if not had:
        np.int = int
    try:
        yield
    finally:
        if not had:
            del np.int


def reference_datasets() -> types.ModuleType:
    """``projects.mmdet3d_plugin.datasets`` (its parents registered by tests/reference.py); IPython, which its
    group sampler imports for debugging only, stubbed while it imports."""
    reference_modules()
    stub = None
    if importlib.util.find_spec("IPython") is None:
        stub = sys.modules.setdefault("IPython", types.ModuleType("IPython"))
        stub.embed = lambda *args, **kwargs: None
    try:
        return importlib.import_module("projects.mmdet3d_plugin.datasets")
    finally:
        if stub is not None and sys.modules.get("IPython") is stub:
            del sys.modules["IPython"]


def reference_pipelines(test_mode: bool) -> list[dict]:
    """The config's train / test pipelines without the final Collect (we compare the full dict)."""
    if test_mode:
        return [
            dict(type="LoadMultiViewImageFromFiles", to_float32=True),
            dict(type="ResizeCropFlipImage"),
            dict(type="NormalizeMultiviewImage", **IMG_NORM),
            dict(type="NuScenesSparse4DAdaptor"),
        ]
    return [
        dict(type="LoadMultiViewImageFromFiles", to_float32=True),
        dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=5),
        dict(type="ResizeCropFlipImage"),
        dict(type="MultiScaleDepthMapGenerator", downsample=[4, 8, 16]),
        dict(type="BBoxRotation"),
        dict(type="PhotoMetricDistortionMultiViewImage"),
        dict(type="NormalizeMultiviewImage", **IMG_NORM),
        dict(type="CircleObjectRangeFilter", class_dist_thred=[55] * len(CLASSES)),
        dict(type="InstanceNameFilter", classes=CLASSES),
        dict(type="NuScenesSparse4DAdaptor"),
    ]


def reference_dataset(info_pkl: Path, test_mode: bool) -> Any:
    datasets = reference_datasets()
    with reference_numpy():
        return datasets.NuScenes3DDetTrackDataset(
            ann_file=str(info_pkl),
            pipeline=reference_pipelines(test_mode),
            data_root="data/nuscenes/",
            classes=CLASSES,
            modality=dict(use_lidar=False, use_camera=True, use_radar=False, use_map=False, use_external=False),
            version="v1.0-mini",
            test_mode=test_mode,
            data_aug_conf=AUG,
            with_seq_flag=not test_mode,
            sequences_split_num=2,
            keep_consistent_seq_aug=True,
        )


def same_augmentation(ours: dict, ref: dict) -> bool:
    return set(ours) == set(ref) and all(
        np.allclose(np.asarray(ours[k], float), np.asarray(ref[k], float)) for k in ref
    )


def unwrap(value: Any) -> Any:
    """mmcv DataContainer -> its data; tensors -> numpy."""
    value = getattr(value, "data", value) if type(value).__name__ == "DataContainer" else value
    return value.numpy() if hasattr(value, "numpy") else value


# --------------------------------------------------------------------------------------- twin variants


@pytest.fixture(scope="module")
def twin_root(small_twin) -> Path:
    return small_twin.parent.parent  # the folder holding data/nuscenes


@pytest.fixture(scope="module")
def variant_root(twin_root, tmp_path_factory) -> Path:
    """The twin's tables with tilted ego poses, radar-only boxes and a scene outside both splits."""
    root = tmp_path_factory.mktemp("variant")
    write_variant(twin_root / "data" / "nuscenes", root / "data" / "nuscenes")
    return root


# --------------------------------------------------------------------------------------- converter


def run_reference_converter(root: Path, out: Path) -> dict[str, dict]:
    converter = reference_tool("nuscenes_converter")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        converter.create_nuscenes_infos("data/nuscenes", str(out / "ref"), version="v1.0-mini", max_sweeps=10)
    finally:
        os.chdir(cwd)
    result = {}
    for split in ("train", "val"):
        with open(out / f"ref_infos_{split}.pkl", "rb") as f:
            result[split] = pickle.load(f)
    return result


def run_ours(root: Path) -> dict[str, dict]:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return convert("data/nuscenes", "v1.0-mini")
    finally:
        os.chdir(cwd)


def assert_equal_values(ours: Any, ref: Any, where: str = "") -> float:
    """Key for key, value for value: arrays of the same shape and kind within 1e-6, everything else equal.
    Returns the largest absolute difference of floating values."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict), f"{where}: {type(ours).__name__} vs the reference's dict"
        assert set(ours) == set(ref), (
            f"{where}: keys differ: ours-only {sorted(set(ours) - set(ref))}, reference-only {sorted(set(ref) - set(ours))}"
        )
        return max([assert_equal_values(ours[k], ref[k], f"{where}.{k}") for k in ref] + [0.0])
    if isinstance(ref, (list, tuple)) and not (ref and isinstance(ref[0], (int, float))):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(ref), f"{where}: lengths differ"
        return max([assert_equal_values(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(ours, ref))] + [0.0])
    if isinstance(ref, np.ndarray) or isinstance(ref, (list, tuple)):
        a, b = np.asarray(ours), np.asarray(ref)
        assert a.shape == b.shape, f"{where}: shape {a.shape} vs the reference's {b.shape}"
        assert a.dtype.kind == b.dtype.kind, f"{where}: dtype {a.dtype} vs the reference's {b.dtype}"
        if b.dtype.kind == "f":
            assert np.array_equal(np.isnan(a), np.isnan(b)), f"{where}: NaNs differ"
            diff = float(np.nanmax(np.abs(a - b))) if a.size and not np.isnan(b).all() else 0.0
            assert diff <= 1e-6, f"{where}: differs by {diff}"
            return diff
        assert np.array_equal(a, b), f"{where}: values differ"
        return 0.0
    assert ours == ref and type(ours) is type(ref), f"{where}: {ours!r} vs the reference's {ref!r}"
    return 0.0


@pytest.mark.parametrize("variant", ["twin", "tilted-radar-outside-split"])
def test_converter_infos_equal_the_reference_converters(variant, twin_root, variant_root, tmp_path):
    root = twin_root if variant == "twin" else variant_root
    ref = run_reference_converter(root, tmp_path)
    ours = run_ours(root)
    assert set(ours) == set(ref) == {"train", "val"}
    diff = assert_equal_values(ours, ref, variant)
    print(f"{variant}: largest difference {diff:.2e}")
    if variant != "twin":
        infos = ref["train"]["infos"] + ref["val"]["infos"]
        radar_only = sum(int(((i["num_lidar_pts"] == 0) & i["valid_flag"]).sum()) for i in infos)
        assert radar_only > 0  # the variant exercises valid_flag without LiDAR points
        assert len(ref["val"]["infos"]) > len(run_ours(twin_root)["val"]["infos"])  # the renamed scene is in val


# --------------------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def info_pkls(variant_root) -> dict[str, Path]:
    """Our infos of the variant (tilted poses, radar-only boxes), train and val, with paths from its root."""
    result = run_ours(variant_root)
    paths = {}
    for split, data in result.items():
        paths[split] = variant_root / f"infos_{split}.pkl"
        with open(paths[split], "wb") as f:
            pickle.dump(data, f)
    return paths


def compare_samples(ours: dict, ref: dict, test_mode: bool) -> dict[str, float]:
    """The model inputs of one sample; returns the image difference in grey levels (max, mean)."""
    img_ours, img_ref = unwrap(ours["img"]), unwrap(ref["img"])
    assert img_ours.shape == img_ref.shape
    grey = np.abs(img_ours - img_ref) * IMG_STD[None, :, None, None]
    assert grey.max() <= 1.0, f"images differ by {grey.max():.2f} grey levels"
    np.testing.assert_allclose(unwrap(ours["projection_mat"]), ref["projection_mat"], rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(unwrap(ours["image_wh"]), ref["image_wh"])
    np.testing.assert_allclose(ours["T_global"], ref["T_global"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours["T_global_inv"], ref["T_global_inv"], rtol=0, atol=1e-9)
    assert ours["timestamp"] == ref["timestamp"]
    np.testing.assert_allclose(unwrap(ours["focal"]), ref["focal"], rtol=1e-6)
    if not test_mode:
        np.testing.assert_allclose(unwrap(ours["gt_bboxes_3d"]), unwrap(ref["gt_bboxes_3d"]), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(unwrap(ours["gt_labels_3d"]), unwrap(ref["gt_labels_3d"]))
        np.testing.assert_array_equal(ours["instance_id"], ref["instance_id"])
        assert len(ours["gt_depth"]) == len(ref["gt_depth"]) == 3
        for a, b in zip(ours["gt_depth"], ref["gt_depth"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return {"max": float(grey.max()), "mean": float(grey.mean())}


@pytest.mark.parametrize("test_mode", [False, True], ids=["train", "test"])
def test_dataset_samples_equal_the_reference_pipelines(test_mode, info_pkls, variant_root, monkeypatch):
    monkeypatch.chdir(variant_root)
    pkl = info_pkls["val" if test_mode else "train"]
    ref_ds = reference_dataset(pkl, test_mode)
    ours = Sparse4DDataset(str(pkl), CLASSES, test_mode=test_mode, **REFERENCE_DATA)
    assert [i["token"] for i in ours.data_infos] == [i["token"] for i in ref_ds.data_infos]
    if not test_mode:
        np.testing.assert_array_equal(ours.flag, ref_ds.flag)
    radar_only_seen = 0
    for index in range(len(ours)):
        np.random.seed(100 + index)
        aug = ref_ds.get_augmentation()
        np.random.seed(100 + index)
        assert same_augmentation(ours.get_augmentation(), aug)
        # Ours draws its photometric RNG's seed from numpy; the reference distorts from numpy's global state.
        np.random.seed(7 + index)
        photometric_seed = np.random.randint(2**31)
        np.random.seed(7 + index)
        sample = ours[{"idx": index, "aug_config": aug}]
        np.random.seed(photometric_seed)
        with reference_numpy():
            ref_sample = ref_ds[{"idx": index, "aug_config": aug}]
        grey = compare_samples(sample, ref_sample, test_mode)
        print(f"sample {index}: images differ by {grey['max']:.3g} grey levels at most, {grey['mean']:.2g} on average")
        info = ours.data_infos[index]
        if "num_lidar_pts" in info:
            radar_only_seen += int(((info["num_lidar_pts"] == 0) & info["valid_flag"]).sum())
    assert test_mode or radar_only_seen > 0  # boxes that only use_valid_flag would keep were there to drop


# --------------------------------------------------------------------------------------- sampler


class FlagDataset:
    """What both samplers read from a dataset: flags, keep_consistent_seq_aug and get_augmentation."""

    def __init__(self, flags: np.ndarray):
        self.flag = flags
        self.keep_consistent_seq_aug = True

    def __len__(self) -> int:
        return len(self.flag)

    def get_augmentation(self) -> dict:
        return {"resize": float(np.random.uniform(0.4, 0.47)), "flip": bool(np.random.choice([0, 1]))}


def batches(sampler: Any, count: int, numpy_seed: int) -> list[list]:
    np.random.seed(numpy_seed)
    it = iter(sampler)
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize("world_size, batch_size", [(1, 3), (2, 2)])
def test_sampler_hands_out_the_reference_batches(world_size, batch_size):
    samplers = reference_datasets().samplers
    lengths = np.random.default_rng(0).integers(1, 9, 40)  # 40 sequences of 1 to 8 frames
    dataset = FlagDataset(np.repeat(np.arange(40), lengths))
    for rank in range(world_size):
        ref = samplers.GroupInBatchSampler(dataset, batch_size, world_size, rank, seed=3)
        ours = GroupInBatchSampler(
            dataset.flag, batch_size, world_size, rank, seed=3, get_augmentation=dataset.get_augmentation
        )
        a, b = batches(ours, 600, numpy_seed=11 + rank), batches(ref, 600, numpy_seed=11 + rank)
        assert a == b
        steps = [(x["idx"], y["idx"]) for i in range(len(a) - 1) for x, y in zip(a[i], a[i + 1])]
        same = [(x, y) for x, y in steps if dataset.flag[x] == dataset.flag[y]]
        assert any(abs(y - x) == 2 for x, y in same) and any(y < x for x, y in same)  # skips and reversals


def test_sampler_on_the_datasets_hands_out_the_reference_batches(info_pkls, variant_root, monkeypatch):
    """With each side's own dataset: its flags and its augmentation draws."""
    monkeypatch.chdir(variant_root)
    samplers = reference_datasets().samplers
    ref_ds = reference_dataset(info_pkls["train"], test_mode=False)
    ours_ds = Sparse4DDataset(str(info_pkls["train"]), CLASSES, **REFERENCE_DATA)
    ref = samplers.GroupInBatchSampler(ref_ds, 2, 1, 0, seed=0)
    ours = GroupInBatchSampler(ours_ds.flag, 2, 1, 0, seed=0, get_augmentation=ours_ds.get_augmentation)
    a, b = batches(ours, 100, numpy_seed=5), batches(ref, 100, numpy_seed=5)
    assert [[x["idx"] for x in batch] for batch in a] == [[x["idx"] for x in batch] for batch in b]
    for x, y in zip(sum(a, []), sum(b, [])):
        assert same_augmentation(x["aug_config"], y["aug_config"])


# --------------------------------------------------------------------------------------- anchors


def test_anchors_equal_the_reference_generators(info_pkls, tmp_path):
    reference_modules()  # registers the reference's packages: its generator imports their box layout
    generator = reference_tool("anchor_generator")
    np.random.seed(0)  # the reference's KMeans is unseeded: numpy's global state
    generator.get_kmeans_anchor(str(info_pkls["train"]), 24, 55, str(tmp_path / "ref.npy"))
    ref = np.load(tmp_path / "ref.npy")
    with open(info_pkls["train"], "rb") as f:
        infos = pickle.load(f)["infos"]
    from sklearn.cluster import KMeans

    n_init = KMeans(n_clusters=2).get_params()["n_init"]
    ours, _ = kmeans_anchors(
        np.concatenate([i["gt_boxes"] for i in infos]), 24, 55.0, 0, 1 if n_init == "auto" else n_init
    )
    assert ours.dtype == ref.dtype and ours.shape == ref.shape == (24, 11)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)
