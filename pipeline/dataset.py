"""Sparse4D's nuScenes dataset over the info pkls, with the reference train and test pipelines.

Train pipeline (the reference's order): load 6 images and the key-frame LiDAR points;
resize-crop-flip-rotate each image and update ``lidar2img`` with the same matrix; depth maps from
the points at strides 4/8/16; 3D rotation of boxes and frames; photometric distortion;
normalisation; 55 m circular range filter and class filter; then the Sparse4D adaptor
(projection matrices, image sizes, ``T_global``, focal lengths, instance ids).

Images, two paths (``fast_images``):

- exact (``False``; the full profiles): the reference's chain — full decode with OpenCV (as
  ``mmcv.imread``), PIL resize to whole-pixel sizes (bicubic), crop, flip, PIL rotation (nearest,
  black corners) — pixel for pixel the reference's images;
- fast (``True``; the demo): the JPEG is decoded at a reduced DCT scale when the resize factor allows it
  (1/2, 1/4, 1/8), shrunk by an integer box filter where still more than 2x too large, and
  resampled once (bilinear) straight into the crop, with the mapping of the reference's
  whole-pixel resize; then what lies outside the resized image is blacked out, the flip and the
  rotation (PIL, nearest, black corners) are the reference's own. Only the resampling filter
  differs (``benchmarks/image_pipeline_speed.py`` measures both the difference and the speed).

Objects: as the reference (``use_valid_flag=False``) a box is kept when it holds LiDAR points
(``num_lidar_pts > 0``); ``use_valid_flag=True`` keeps the converter's ``valid_flag`` (LiDAR or
radar points) instead.

A sample is a dict; :func:`collate` stacks a list of them into the batch the model takes.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model.box3d import YAW
from pipeline.geometry import pose_matrix
from pipeline.sensors import (
    DatasetError,
    load_image_chain,
    load_image_fast,
    load_points,
    normalise,
    photometric_distortion,
)

DEPTH_STRIDES = (4, 8, 16)
AUG_KEYS = ("H", "W", "final_dim", "resize_lim", "bot_pct_lim", "rot_lim", "rand_flip", "rot3d_range")  # data.aug
MAX_DEPTH = 60.0

# --------------------------------------------------------------------------------------- geometry


def lidar2img_matrices(info: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per camera (in info order): 4x4 LiDAR -> image matrix and the 3x3 intrinsic."""
    mats, intrinsics = [], []
    for cam in info["cams"].values():
        lidar2cam = np.eye(4)
        rot = np.asarray(cam["sensor2lidar_rotation"], np.float64)
        lidar2cam[:3, :3] = rot.T
        lidar2cam[:3, 3] = -rot.T @ np.asarray(cam["sensor2lidar_translation"], np.float64)
        viewpad = np.eye(4)
        intrinsic = np.asarray(cam["cam_intrinsic"], np.float64)
        viewpad[:3, :3] = intrinsic
        mats.append(viewpad @ lidar2cam)
        intrinsics.append(intrinsic.copy())
    return mats, intrinsics


def image_transform(aug: dict) -> np.ndarray:
    """3x3 matrix from original pixels to output pixels: resize, crop, flip, rotate (as the reference)."""
    resize, crop, flip = aug["resize"], aug["crop"], aug["flip"]
    mat = np.eye(3)
    mat[:2, :2] *= resize
    mat[:2, 2] -= np.array(crop[:2])
    if flip:
        mat = np.array([[-1.0, 0, crop[2] - crop[0]], [0, 1, 0], [0, 0, 1]]) @ mat
    angle = aug["rotate"] / 180 * np.pi
    rot = np.array([[np.cos(angle), np.sin(angle), 0], [-np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    centre = np.array([crop[2] - crop[0], crop[3] - crop[1]]) / 2
    rot[:2, 2] = -rot[:2, :2] @ centre + centre
    return rot @ mat


def limit_period(val: np.ndarray, offset: float = 0.5, period: float = 2 * np.pi) -> np.ndarray:
    return val - np.floor(val / period + offset) * period


def rotate_boxes(boxes: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (n, 9) boxes [x, y, z, l-ish, w-ish, h, yaw, vx, vy] by `angle` about the LiDAR z axis."""
    cos, sin = np.cos(angle), np.sin(angle)
    rot_t = np.array([[cos, sin, 0], [-sin, cos, 0], [0, 0, 1]])
    boxes = boxes.copy()
    boxes[:, :3] = boxes[:, :3] @ rot_t
    boxes[:, YAW] += angle
    if boxes.shape[1] > 7:
        vel = boxes.shape[1] - 7
        boxes[:, 7:] = boxes[:, 7:] @ rot_t[:vel, :vel]
    return boxes


def depth_maps(
    points: np.ndarray, lidar2img: Sequence[np.ndarray], img_hw: tuple[int, int], strides=DEPTH_STRIDES
) -> list[np.ndarray]:
    """Sparse depth targets per stride: (cams, H / s, W / s), -1 where no point; the nearest point wins."""
    height, width = img_hw
    out = [[] for _ in strides]
    xyz = points[:, :3].astype(np.float64)
    for mat in lidar2img:
        proj = xyz @ mat[:3, :3].T + mat[:3, 3]
        depth = proj[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.round(proj[:, 0] / depth)
            v = np.round(proj[:, 1] / depth)
        keep = (depth >= 0.1) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
        u, v, depth = u[keep].astype(np.int64), v[keep].astype(np.int64), depth[keep]
        order = np.argsort(depth)[::-1]  # far first, so that the nearest is written last
        u, v, depth = u[order], v[order], np.clip(depth[order], 0.1, MAX_DEPTH).astype(np.float32)
        for level, stride in enumerate(strides):
            dmap = np.full((int(height / stride), int(width / stride)), -1.0, np.float32)
            dmap[v // stride, u // stride] = depth
            out[level].append(dmap)
    return [np.stack(level) for level in out]


# --------------------------------------------------------------------------------------- images


# --------------------------------------------------------------------------------------- dataset


class Sparse4DDataset(torch.utils.data.Dataset):
    """nuScenes info pkl -> model inputs, with the reference's augmentation and sequence flags.

    Args:
        info_pkl: path of `nuscenes_infos_{split}.pkl` (ours or the reference converter's).
        classes: detection classes; label = index, other names are dropped in training.
        data_aug_conf: data.aug: H, W (source image size), final_dim, resize_lim, bot_pct_lim,
            rot_lim, rand_flip, rot3d_range.
        test_mode: deterministic resize + centre crop, no boxes.
        with_seq_flag / sequences_split_num: `flag` numbers each scene (split into that many
            sub-sequences), for the group-in-batch sampler.
        keep_consistent_seq_aug: the sampler draws one augmentation per sequence.
        fast_images: reduced-scale decode + one resampling (see the module docstring), or the
            reference's chain (``False``).
        use_valid_flag: keep boxes by the converter's ``valid_flag`` (LiDAR or radar points)
            instead of the reference's ``num_lidar_pts > 0`` (``False``).
        class_range: objects farther than this (metres, in the x-y plane) are dropped in training.
        with_depth / photometric: depth targets and photometric distortion in training.
    """

    def __init__(
        self,
        info_pkl: str,
        classes: Sequence[str],
        *,
        data_aug_conf: dict,
        sequences_split_num: int,
        fast_images: bool,
        use_valid_flag: bool,
        photometric: bool,
        test_mode: bool = False,
        with_seq_flag: bool = True,
        keep_consistent_seq_aug: bool = True,
        class_range: float = 55.0,
        with_depth: bool = True,
    ):
        missing = sorted(set(AUG_KEYS) - set(data_aug_conf))
        if missing:
            raise ValueError(f"data_aug_conf lacks {missing} (data.aug has {list(AUG_KEYS)})")
        path = Path(info_pkl)
        if not path.is_file():
            raise DatasetError(f"{info_pkl}: info pkl not found (run the convert stage)")
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
            infos = data["infos"]
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as err:
            raise DatasetError(f"{info_pkl}: not a nuScenes info pkl ({err})") from err
        self.data_infos = sorted(infos, key=lambda info: info["timestamp"])
        self.metadata = data.get("metadata", {})
        self.classes = list(classes)
        self.aug_conf = dict(data_aug_conf)
        self.test_mode = test_mode
        self.keep_consistent_seq_aug = keep_consistent_seq_aug
        self.fast_images = fast_images
        self.use_valid_flag = use_valid_flag
        self.class_range = float(class_range)
        self.with_depth = with_depth
        self.photometric = photometric
        self.flag = self._sequence_flags(int(sequences_split_num)) if with_seq_flag else np.zeros(len(self), np.int64)

    def __len__(self) -> int:
        return len(self.data_infos)

    def _sequence_flags(self, split_num: int) -> np.ndarray:
        """One flag per scene (as the reference: a frame without sweeps starts a new scene), each
        scene cut into `split_num` consecutive parts of ceil(len / split_num) frames."""
        scene_of, current = [], 0
        for i, info in enumerate(self.data_infos):
            if i > 0 and len(info["sweeps"]) == 0:
                current += 1
            scene_of.append(current)
        scene_of = np.asarray(scene_of, np.int64)
        if split_num <= 1:
            return scene_of
        flags, next_flag = [], 0
        for count in np.bincount(scene_of):
            step = math.ceil(count / split_num)
            bounds = list(range(0, count, step)) + [count]
            for length in np.diff(bounds):
                flags.extend([next_flag] * int(length))
                next_flag += 1
        return np.asarray(flags, np.int64)

    # ----------------------------------------------------------------------------- augmentation
    def get_augmentation(self) -> dict:
        """Draws (train) or fixes (test) resize, crop, flip, image rotation and 3D rotation."""
        conf = self.aug_conf
        height, width = conf["H"], conf["W"]
        final_h, final_w = conf["final_dim"]
        if not self.test_mode:
            resize = float(np.random.uniform(*conf["resize_lim"]))
            new_w, new_h = int(width * resize), int(height * resize)
            crop_h = int((1 - np.random.uniform(*conf["bot_pct_lim"])) * new_h) - final_h
            crop_w = int(np.random.uniform(0, max(0, new_w - final_w)))
            flip = bool(conf["rand_flip"] and np.random.choice([0, 1]))
            rotate = float(np.random.uniform(*conf["rot_lim"]))
            rotate_3d = float(np.random.uniform(*conf["rot3d_range"]))
        else:
            resize = max(final_h / height, final_w / width)
            new_w, new_h = int(width * resize), int(height * resize)
            crop_h = int((1 - np.mean(conf["bot_pct_lim"])) * new_h) - final_h
            crop_w = int(max(0, new_w - final_w) / 2)
            flip, rotate, rotate_3d = False, 0.0, 0.0
        crop = (crop_w, crop_h, crop_w + final_w, crop_h + final_h)
        return {
            "resize": resize,
            "resize_dims": (new_w, new_h),
            "crop": crop,
            "flip": flip,
            "rotate": rotate,
            "rotate_3d": rotate_3d,
        }

    # ----------------------------------------------------------------------------- loading
    def annotations(self, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(n, 9) boxes with velocity (NaN -> 0), labels (-1: not a detection class), instance ids."""
        key = "valid_flag" if self.use_valid_flag else "num_lidar_pts"
        if key not in info:
            raise DatasetError(f"info of sample {info.get('token')}: no {key!r} (an annotated split's info pkl?)")
        mask = np.asarray(info["valid_flag"], bool) if self.use_valid_flag else np.asarray(info["num_lidar_pts"]) > 0
        boxes = np.asarray(info["gt_boxes"], np.float64).reshape(-1, 7)[mask]
        names = np.asarray(info["gt_names"])[mask]
        velocity = np.asarray(info["gt_velocity"], np.float64).reshape(-1, 2)[mask].copy()
        velocity[np.isnan(velocity[:, 0])] = 0.0
        labels = np.array([self.classes.index(n) if n in self.classes else -1 for n in names], np.int64)
        ids = np.asarray(info["instance_inds"], np.int64)[mask] if "instance_inds" in info else None
        return np.concatenate([boxes, velocity], axis=1), labels, ids

    def load_images(self, info: dict, aug: dict) -> list[np.ndarray]:
        """The six camera images of an info, augmented: (H, W, 3) uint8 RGB each, in info order."""
        final_h, final_w = self.aug_conf["final_dim"]
        size = (self.aug_conf["W"], self.aug_conf["H"])
        if self.fast_images:
            return [load_image_fast(cam["data_path"], aug, (final_w, final_h), size) for cam in info["cams"].values()]
        return [load_image_chain(cam["data_path"], aug, size) for cam in info["cams"].values()]

    def training_targets(
        self, info: dict, aug: dict, lidar2img: list[np.ndarray], lidar2global: np.ndarray
    ) -> tuple[dict[str, Any], list[np.ndarray], np.ndarray]:
        """Depth maps, then the 3D rotation of the LiDAR frame (boxes, projections, pose), boxes in
        range of the detection classes; returns the targets and the rotated projections and pose."""
        final_h, final_w = self.aug_conf["final_dim"]
        targets: dict[str, Any] = {}
        if self.with_depth:
            points = load_points(info["lidar_path"])
            targets["gt_depth"] = depth_maps(points, lidar2img, (final_h, final_w))
        angle = aug.get("rotate_3d", 0.0)
        cos, sin = np.cos(angle), np.sin(angle)
        rot = np.eye(4)
        rot[:2, :2] = [[cos, -sin], [sin, cos]]
        rot_inv = np.linalg.inv(rot)
        lidar2img = [m @ rot_inv for m in lidar2img]
        lidar2global = lidar2global @ rot_inv
        boxes, labels, ids = self.annotations(info)
        boxes = rotate_boxes(boxes, angle)
        keep = (labels >= 0) & (np.linalg.norm(boxes[:, :2], axis=1) <= self.class_range)
        boxes, labels = boxes[keep], labels[keep]
        boxes[:, YAW] = limit_period(boxes[:, YAW])
        targets["gt_bboxes_3d"] = torch.from_numpy(boxes).float()
        targets["gt_labels_3d"] = torch.from_numpy(labels)
        if ids is not None:
            targets["instance_id"] = ids[keep]
        return targets, lidar2img, lidar2global

    def __getitem__(self, index: int | dict) -> dict:
        if isinstance(index, dict):
            aug, index = index["aug_config"], int(index["idx"])
        else:
            aug = self.get_augmentation()
        info = self.data_infos[index]
        lidar2img, intrinsics = lidar2img_matrices(info)
        lidar2global = pose_matrix(info["ego2global_rotation"], info["ego2global_translation"]) @ pose_matrix(
            info["lidar2ego_rotation"], info["lidar2ego_translation"]
        )
        imgs = self.load_images(info, aug)
        transform = np.eye(4)
        transform[:3, :3] = image_transform(aug)
        lidar2img = [transform @ m for m in lidar2img]
        focal = np.array([k[0, 0] * aug["resize"] for k in intrinsics], np.float32)

        sample: dict[str, Any] = {}
        if not self.test_mode:
            targets, lidar2img, lidar2global = self.training_targets(info, aug, lidar2img, lidar2global)
            sample.update(targets)
            if self.photometric:
                rng = np.random.RandomState(np.random.randint(2**31))
                imgs = [photometric_distortion(img, rng) for img in imgs]
        final_h, final_w = self.aug_conf["final_dim"]
        sample.update(
            img=torch.from_numpy(normalise(imgs)),
            projection_mat=torch.from_numpy(np.stack(lidar2img).astype(np.float32)),
            image_wh=torch.tensor([[final_w, final_h]] * len(imgs), dtype=torch.float32),
            focal=torch.from_numpy(focal),
            timestamp=info["timestamp"] / 1e6,
            T_global=lidar2global,
            T_global_inv=np.linalg.inv(lidar2global),
            index=index,
            token=info["token"],
        )
        return sample


def dataset_from_params(params: dict, infos: str, training: bool, fast_images: bool | None = None) -> Sparse4DDataset:
    """The dataset every stage, benchmark and test reads, built from params' `model.classes` and
    `data` section: for training (the group sampler's sequences, augmentation as data.aug,
    photometric distortion as data.photometric, depth targets) or for evaluation and validation
    (test mode: one sequence per scene, the deterministic resize and crop). `fast_images`
    defaults to data.fast_images (the evaluate stage passes False for a checkpoint from
    elsewhere)."""
    dp = params["data"]
    common = dict(
        data_aug_conf=dict(dp["aug"]),
        with_seq_flag=True,
        use_valid_flag=bool(dp["use_valid_flag"]),
        fast_images=bool(dp["fast_images"]) if fast_images is None else fast_images,
        photometric=bool(dp["photometric"]),  # training only
    )
    classes = list(params["model"]["classes"])
    if training:
        return Sparse4DDataset(
            infos,
            classes,
            test_mode=False,
            sequences_split_num=int(dp["sequences_split_num"]),
            keep_consistent_seq_aug=True,
            **common,
        )
    return Sparse4DDataset(
        infos, classes, test_mode=True, sequences_split_num=1, keep_consistent_seq_aug=False, **common
    )


def collate(samples: list[dict]) -> dict:
    """A list of samples -> the model's batch: stacked tensors, per-sample lists, img_metas."""
    batch: dict[str, Any] = {
        "img": torch.stack([s["img"] for s in samples]),
        "projection_mat": torch.stack([s["projection_mat"] for s in samples]),
        "image_wh": torch.stack([s["image_wh"] for s in samples]),
        "focal": torch.stack([s["focal"] for s in samples]),
        "timestamp": torch.tensor([s["timestamp"] for s in samples], dtype=torch.float64),
        "img_metas": [],
        "index": [s["index"] for s in samples],
    }
    for s in samples:
        meta = {
            "T_global": s["T_global"],
            "T_global_inv": s["T_global_inv"],
            "timestamp": s["timestamp"],
            "token": s["token"],
        }
        if "instance_id" in s:
            meta["instance_id"] = s["instance_id"]
        batch["img_metas"].append(meta)
    if "gt_bboxes_3d" in samples[0]:
        batch["gt_bboxes_3d"] = [s["gt_bboxes_3d"] for s in samples]
        batch["gt_labels_3d"] = [s["gt_labels_3d"] for s in samples]
    if "gt_depth" in samples[0]:
        levels = len(samples[0]["gt_depth"])
        batch["gt_depth"] = [
            torch.from_numpy(np.concatenate([s["gt_depth"][lvl] for s in samples])) for lvl in range(levels)
        ]
    return batch
