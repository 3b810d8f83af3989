"""Converter speed: pipeline.convert against a straightforward per-annotation devkit walk.

The baseline does what the reference converter does: load the devkit, then for every sample ask
`get_sample_data` for its boxes, `get` every annotation, `box_velocity` every box and walk the
sweeps, and file samples outside the train scenes under val, as it does. (tests/test_parity_data.py
checks our output against the reference converter itself.) Both run on the same synthetic twin scaled to 100+ scenes (v1.0-trainval names), and
their outputs are compared before the times are printed.

Run: python -m benchmarks.convert_speed [--scenes 120] [--samples 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.convert import CAMERA_TYPES, NAME_MAPPING, convert, split_scenes
from pipeline.twin.writer import TwinConfig, write_twin


def devkit_walk(root: str, version: str, max_sweeps: int = 10) -> dict[str, list[dict]]:
    """The per-object devkit walk (baseline): same outputs, one devkit call per thing."""
    from nuscenes.nuscenes import NuScenes
    from pyquaternion import Quaternion

    nusc = NuScenes(version=version, dataroot=root, verbose=False)
    train_names, _ = split_scenes(version)
    train = {s["token"] for s in nusc.scene if s["name"] in train_names}
    out: dict[str, list[dict]] = {"train": [], "val": []}
    for sample in nusc.sample:
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        lidar_path, boxes, _ = nusc.get_sample_data(sd["token"])
        l2e_r = Quaternion(cs["rotation"]).rotation_matrix
        e2g_r = Quaternion(pose["rotation"]).rotation_matrix
        l2e_t, e2g_t = np.array(cs["translation"]), np.array(pose["translation"])

        def sensor2lidar(
            token: str, l2e_r=l2e_r, l2e_t=l2e_t, e2g_r=e2g_r, e2g_t=e2g_t
        ) -> tuple[np.ndarray, np.ndarray]:
            rec = nusc.get("sample_data", token)
            c = nusc.get("calibrated_sensor", rec["calibrated_sensor_token"])
            p = nusc.get("ego_pose", rec["ego_pose_token"])
            s2e = Quaternion(c["rotation"]).rotation_matrix
            e2g_s = Quaternion(p["rotation"]).rotation_matrix
            r = np.linalg.inv(l2e_r) @ np.linalg.inv(e2g_r) @ e2g_s @ s2e
            t = np.linalg.inv(l2e_r) @ (
                np.linalg.inv(e2g_r) @ (e2g_s @ np.array(c["translation"]) + np.array(p["translation"]) - e2g_t) - l2e_t
            )
            return r, t

        cams = {}
        for cam in CAMERA_TYPES:
            path, _, intrinsic = nusc.get_sample_data(sample["data"][cam])
            r, t = sensor2lidar(sample["data"][cam])
            cams[cam] = {
                "data_path": path,
                "cam_intrinsic": intrinsic,
                "sensor2lidar_rotation": r,
                "sensor2lidar_translation": t,
            }
        sweeps = []
        rec = sd
        while len(sweeps) < max_sweeps and rec["prev"]:
            r, t = sensor2lidar(rec["prev"])
            sweeps.append({"sensor2lidar_rotation": r, "sensor2lidar_translation": t})
            rec = nusc.get("sample_data", rec["prev"])
        anns = [nusc.get("sample_annotation", tok) for tok in sample["anns"]]
        gt_boxes = np.array(
            [[*b.center, b.wlh[1], b.wlh[0], b.wlh[2], b.orientation.yaw_pitch_roll[0]] for b in boxes]
        ).reshape(-1, 7)
        velocity = []
        for tok in sample["anns"]:
            v = np.array([*nusc.box_velocity(tok)[:2], 0.0])
            velocity.append((v @ np.linalg.inv(e2g_r).T @ np.linalg.inv(l2e_r).T)[:2])
        names = np.array([NAME_MAPPING.get(b.name, b.name) for b in boxes])
        info = {
            "lidar_path": lidar_path,
            "token": sample["token"],
            "cams": cams,
            "sweeps": sweeps,
            "gt_boxes": gt_boxes,
            "gt_velocity": np.array(velocity).reshape(-1, 2),
            "gt_names": names,
            "num_lidar_pts": np.array([a["num_lidar_pts"] for a in anns]),
            "valid_flag": np.array([a["num_lidar_pts"] + a["num_radar_pts"] > 0 for a in anns], dtype=bool),
            "instance_inds": np.array([nusc.getind("instance", a["instance_token"]) for a in anns]),
        }
        out["train" if sample["scene_token"] in train else "val"].append(info)
    return out


def assert_same(ours: dict, base: dict) -> None:
    for split in ("train", "val"):
        a, b = ours[split]["infos"], base[split]
        assert len(a) == len(b), split
        for x, y in zip(a, b):
            assert x["token"] == y["token"] and x["lidar_path"] == y["lidar_path"]
            for key in ("gt_boxes", "gt_velocity", "num_lidar_pts", "valid_flag", "instance_inds"):
                assert np.allclose(x[key], y[key], atol=1e-6, equal_nan=True), key
            assert list(x["gt_names"]) == list(y["gt_names"])
            assert len(x["sweeps"]) == len(y["sweeps"])
            for s, t in zip(x["sweeps"], y["sweeps"]):
                assert np.allclose(s["sensor2lidar_rotation"], t["sensor2lidar_rotation"], atol=1e-9)
                assert np.allclose(s["sensor2lidar_translation"], t["sensor2lidar_translation"], atol=1e-6)
            for cam in CAMERA_TYPES:
                assert x["cams"][cam]["data_path"] == y["cams"][cam]["data_path"]
                assert np.allclose(
                    x["cams"][cam]["sensor2lidar_rotation"], y["cams"][cam]["sensor2lidar_rotation"], atol=1e-9
                )
                assert np.allclose(
                    x["cams"][cam]["sensor2lidar_translation"], y["cams"][cam]["sensor2lidar_translation"], atol=1e-6
                )
                assert np.allclose(x["cams"][cam]["cam_intrinsic"], y["cams"][cam]["cam_intrinsic"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=120)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--objects", type=int, default=40)
    parser.add_argument("--keep", help="reuse/keep the generated dataset in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "nuscenes"
        if not (root / "v1.0-trainval").is_dir():
            cfg = TwinConfig(
                version="v1.0-trainval",
                num_scenes=args.scenes,
                samples_per_scene=args.samples,
                objects_per_scene=args.objects,
                image_width=160,
                image_height=90,
                jpeg_quality=50,
                lidar_azimuth_steps=36,
            )
            start = time.perf_counter()
            write_twin(cfg, root)
            print(f"generated {args.scenes} scenes x {args.samples} samples in {time.perf_counter() - start:.0f} s")
        cwd = os.getcwd()
        os.chdir(root.parent)
        try:
            start = time.perf_counter()
            base = devkit_walk(root.name, "v1.0-trainval")
            t_base = time.perf_counter() - start
            start = time.perf_counter()
            ours = convert(root.name, "v1.0-trainval")
            t_ours = time.perf_counter() - start
        finally:
            os.chdir(cwd)
        assert_same(ours, base)
        samples = sum(len(v["infos"]) for v in ours.values())
        boxes = sum(len(i["gt_boxes"]) for v in ours.values() for i in v["infos"])
        print(f"{samples} samples, {boxes} boxes; outputs identical")
        print(f"devkit walk (baseline): {t_base:.2f} s")
        print(f"pipeline.convert:       {t_ours:.2f} s")
        print(f"speed-up: {t_base / t_ours:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
