"""The synthetic twin: nuScenes-loadable, geometrically consistent, deterministic, strict on params."""

from __future__ import annotations

import colorsys
import hashlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml
from PIL import Image

matplotlib.use("Agg")

from nuscenes.nuscenes import NuScenes  # noqa: E402
from nuscenes.utils import splits  # noqa: E402
from nuscenes.utils.data_classes import LidarPointCloud  # noqa: E402
from nuscenes.utils.geometry_utils import points_in_box, view_points  # noqa: E402

from pipeline.twin.render import DIRECTION_FREE, CameraRenderer, box_rotation  # noqa: E402
from pipeline.twin.world import (  # noqa: E402
    BOX_LIFT,
    CAMERAS,
    CLASS_SPECS,
    CLASSES,
    camera_intrinsic,
    camera_rotation,
)
from pipeline.twin.writer import TwinConfig, TwinConfigError, write_twin  # noqa: E402
from tests.conftest import ROOT, SMALL, launch_stage  # noqa: E402

# nuScenes category -> detection class, for the checks below.
CATEGORY_CLASS = {cat: name for name, spec in CLASS_SPECS.items() for cat in spec.categories}


@pytest.fixture(scope="module")
def twin(small_twin) -> tuple[Path, NuScenes]:
    return small_twin, NuScenes(version="v1.0-mini", dataroot=str(small_twin), verbose=False)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_devkit_loads_twin_and_its_api_works(twin, tmp_path):
    root, nusc = twin
    assert {f.name for f in (root / "v1.0-mini").iterdir()} == {
        f"{t}.json"
        for t in (
            "attribute calibrated_sensor category ego_pose instance log map sample sample_annotation "
            "sample_data scene sensor visibility"
        ).split()
    }
    assert len(nusc.scene) == 3
    names = [s["name"] for s in nusc.scene]
    assert set(names) <= set(splits.mini_train + splits.mini_val)
    assert any(n in splits.mini_val for n in names) and any(n in splits.mini_train for n in names)
    sample = nusc.sample[1]
    cams = [c for c in sample["data"] if c.startswith("CAM")]
    assert cams and len(cams) == 6
    path, boxes, intrinsic = nusc.get_sample_data(sample["data"]["CAM_FRONT"])
    assert Path(path).is_file() and intrinsic.shape == (3, 3)
    assert nusc.get_boxes(sample["data"]["LIDAR_TOP"])
    ann = nusc.get("sample_annotation", sample["anns"][0])
    assert np.isfinite(nusc.box_velocity(ann["token"])[:2]).all()
    out = tmp_path / "render.png"
    nusc.render_sample_data(sample["data"]["CAM_FRONT"], out_path=str(out), verbose=False)
    nusc.render_sample_data(sample["data"]["LIDAR_TOP"], out_path=str(tmp_path / "lidar.png"), verbose=False)
    assert out.stat().st_size > 0


def test_timing_sensors_and_motion(twin):
    root, nusc = twin
    scene = nusc.scene[0]
    samples = [nusc.get("sample", scene["first_sample_token"])]
    while samples[-1]["next"]:
        samples.append(nusc.get("sample", samples[-1]["next"]))
    assert len(samples) == SMALL.samples_per_scene
    assert np.allclose(np.diff([s["timestamp"] for s in samples]), 500_000)  # 2 Hz key frames
    ego = [nusc.get("ego_pose", nusc.get("sample_data", s["data"]["LIDAR_TOP"])["ego_pose_token"]) for s in samples]
    # LiDAR sweeps between key frames, each with its own ego pose, read back as 5 float32 values.
    sd = nusc.get("sample_data", samples[-1]["data"]["LIDAR_TOP"])
    sweeps = []
    while sd["prev"]:
        sd = nusc.get("sample_data", sd["prev"])
        if sd["is_key_frame"]:
            break
        sweeps.append(sd)
    assert len(sweeps) == SMALL.sweeps_per_sample
    assert all(s["filename"].startswith("sweeps/LIDAR_TOP/") for s in sweeps)
    raw = np.fromfile(root / sweeps[0]["filename"], dtype=np.float32).reshape(-1, 5)
    assert len(raw) > 1000 and set(np.unique(raw[:, 4])) <= set(range(32))
    poses = [nusc.get("ego_pose", s["ego_pose_token"])["translation"] for s in sweeps]
    if any(np.linalg.norm(np.subtract(e["translation"], ego[0]["translation"])) > 0 for e in ego):
        assert len({tuple(p) for p in poses}) == len(poses)  # a moving ego has a new pose every sweep
    channels = [
        nusc.get("calibrated_sensor", nusc.get("sample_data", t)["calibrated_sensor_token"])
        for t in samples[0]["data"].values()
    ]
    assert len(channels) == 7


def test_classes_motion_and_instance_links(twin):
    _, nusc = twin
    names = {CATEGORY_CLASS[nusc.get("category", i["category_token"])["name"]] for i in nusc.instance}
    assert names == set(CLASSES)
    speeds = []
    for inst in nusc.instance:
        anns = nusc.field2token("sample_annotation", "instance_token", inst["token"])
        assert len(anns) == inst["nbr_annotations"]
        first = nusc.get("sample_annotation", inst["first_annotation_token"])
        assert first["prev"] == "" and nusc.get("sample_annotation", first["next"])["prev"] == first["token"]
        speeds.append(np.linalg.norm(nusc.box_velocity(first["token"])[:2]))
        assert first["visibility_token"] in {"1", "2", "3", "4"}
    speeds = np.array(speeds)
    assert (speeds < 0.1).any() and (speeds > 2.0).any()  # parked and moving objects


def _hue_sat(rgb: np.ndarray) -> tuple[float, float]:
    h, s, _ = colorsys.rgb_to_hsv(*(rgb / 255.0))
    return h, s


def test_projected_centres_land_on_their_objects(twin):
    """Calibration and rendering agree: a visible box's centre projects onto its class colour."""
    root, nusc = twin
    checked, matched = 0, 0
    for sample in nusc.sample:
        for channel in [c for c in sample["data"] if c.startswith("CAM")]:
            path, boxes, intrinsic = nusc.get_sample_data(sample["data"][channel])
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
            h, w = image.shape[:2]
            for box in boxes:
                ann = nusc.get("sample_annotation", box.token)
                if ann["visibility_token"] != "4" or box.center[2] < 1.0:
                    continue
                u, v = view_points(box.center[:, None], intrinsic, normalize=True)[:2, 0]
                u, v = int(round(u)), int(round(v))
                if not (2 <= u < w - 2 and 2 <= v < h - 2):
                    continue
                rgb = np.median(image[v - 1 : v + 2, u - 1 : u + 2].reshape(-1, 3), axis=0)
                hue, sat = _hue_sat(rgb)
                want = CLASS_SPECS[CATEGORY_CLASS[box.name]].hue
                checked += 1
                matched += sat > 0.5 and min(abs(hue - want), 1 - abs(hue - want)) < 0.04
    assert checked > 50
    # Rare misses: a small object in front of a large one's centre (it is >= 80 % visible).
    assert matched / checked > 0.95, (matched, checked)


def test_num_lidar_pts_equals_points_inside_each_box(twin):
    root, nusc = twin
    total = 0
    for sample in nusc.sample:
        lidar = sample["data"]["LIDAR_TOP"]
        path, boxes, _ = nusc.get_sample_data(lidar)
        points = LidarPointCloud.from_file(path).points[:3].astype(np.float64)
        for box in boxes:
            ann = nusc.get("sample_annotation", box.token)
            assert int(points_in_box(box, points).sum()) == ann["num_lidar_pts"], ann["token"]
            total += ann["num_lidar_pts"]
    assert total > 1000


# A pixel on an object's front band: the dark tint of its class hue (brightest channel <= 85 when
# rendered), while the body's brightest channel is >= 133 however it is lit.
BAND_MAX = 110


def _hue_of(pixels: np.ndarray) -> float:
    return _hue_sat(np.median(pixels.reshape(-1, 3).astype(np.float64), axis=0))[0]


def _hue_gap(a: float, b: float) -> float:
    return min(abs(a - b), 1 - abs(a - b))


def _look_at(name: str, box: np.ndarray, camera_xy: np.ndarray, size=(640, 360)):
    """CAM_FRONT of an ego placed so that the camera sits at camera_xy, looking at the box's centre.

    Returns the image, a mask of the object's pixels, the band pixels among them, and a function
    projecting global points into the image.
    """
    cam = CAMERAS[0]
    cam_to_ego = np.eye(4)
    cam_to_ego[:3, :3] = camera_rotation(cam.yaw_deg)
    cam_to_ego[:3, 3] = cam.translation
    intrinsic = camera_intrinsic(cam, *size)
    renderer = CameraRenderer(intrinsic, cam_to_ego, *size)
    yaw = np.arctan2(*(box[:2] - camera_xy)[::-1])
    ego = np.eye(4)
    ego[:3, :3] = box_rotation(yaw)
    ego[:2, 3] = camera_xy - ego[:2, :2] @ np.array(cam.translation[:2])
    cam_to_global = ego @ cam_to_ego
    image, _, _ = renderer.render(ego, cam_to_global, box[None], [name])
    empty, _, _ = renderer.render(ego, cam_to_global, np.zeros((0, 7)), [])
    mask = (image != empty).any(-1)
    band = mask & (image.max(-1) <= BAND_MAX)

    def project(points: np.ndarray) -> np.ndarray:
        cam_pts = (points - cam_to_global[:3, 3]) @ cam_to_global[:3, :3]
        return cam_pts[:, :2] / cam_pts[:, 2:3] * np.diag(intrinsic)[:2] + intrinsic[:2, 2]

    return image, mask, band, project


def _box(name: str, yaw: float) -> np.ndarray:
    w, length, h = CLASS_SPECS[name].size
    return np.array([120.0, -40.0, h / 2 + BOX_LIFT, w, length, h, yaw])


@pytest.mark.parametrize("name", CLASSES)
def test_the_same_object_seen_from_its_front_and_from_its_back(name):
    """The front end shows a dark band of the class hue on its upper half; the back end does not.

    Barriers and traffic cones have no front: both ends look the same.
    """
    box = _box(name, yaw=0.7)
    heading = np.array([np.cos(box[6]), np.sin(box[6])])
    distance = box[4] / 2 + 8.0
    views = {}
    for end, sign in (("front", 1.0), ("back", -1.0)):
        image, mask, band, _ = _look_at(name, box, box[:2] + sign * distance * heading)
        assert mask.sum() > 300, (end, mask.sum())
        # The class hue stays the class cue from either end, the band included.
        assert _hue_gap(_hue_of(image[mask & ~band]), CLASS_SPECS[name].hue) < 0.02
        if band.any():
            assert _hue_gap(_hue_of(image[band]), CLASS_SPECS[name].hue) < 0.02
        views[end] = (mask, band)
    (front_mask, front_band), (back_mask, back_band) = views["front"], views["back"]
    if name in DIRECTION_FREE:
        assert not front_band.any() and not back_band.any()
        return
    # From behind, at most the far end of the roof of an object lower than the camera shows it.
    assert back_band.sum() <= 0.05 * back_mask.sum()
    # From the front: the upper half of the end face is the band, its lower half the body.
    assert 0.3 < front_band.sum() / front_mask.sum() < 0.7, front_band.sum() / front_mask.sum()
    rows = np.nonzero(front_mask)[0]
    band_rows, body_rows = np.nonzero(front_band)[0], np.nonzero(front_mask & ~front_band)[0]
    assert band_rows.mean() < body_rows.mean()
    assert band_rows.max() <= np.percentile(rows, 65)  # the lower part is all body


@pytest.mark.parametrize("name", ["car", "bus", "bicycle", "pedestrian"])
@pytest.mark.parametrize("side", [1.0, -1.0])
def test_the_front_appears_where_the_yaw_points(name, side):
    """Seen from either side, the band sits at the end of the object the box's yaw points to."""
    box = _box(name, yaw=-2.2)
    heading = np.array([np.cos(box[6]), np.sin(box[6])])
    left = np.array([-heading[1], heading[0]])
    _, mask, band, project = _look_at(name, box, box[:2] + side * (box[3] / 2 + 7.0) * left)
    assert band.sum() > 30
    ends = np.array([[*(box[:2] + s * box[4] / 2 * heading), box[2]] for s in (1.0, -1.0)])
    front_u, back_u = project(ends)[:, 0]
    band_u = np.nonzero(band)[1].mean()
    assert abs(band_u - front_u) < abs(band_u - back_u), (band_u, front_u, back_u)
    # And the band is only at that end: its far edge stops short of the object's middle.
    body_u = np.nonzero(mask & ~band)[1]
    if front_u > back_u:
        assert np.nonzero(band)[1].min() > body_u.min()
    else:
        assert np.nonzero(band)[1].max() < body_u.max()


def test_written_fronts_agree_with_the_annotated_yaw_in_images_and_lidar(twin):
    """Through the devkit: the end face the annotation's heading points to is the dark one in the
    JPEGs, and the weak-intensity (front band) LiDAR returns lie at the front of their box."""
    root, nusc = twin
    checked, matched = 0, 0
    for sample in nusc.sample:
        for channel in [c for c in sample["data"] if c.startswith("CAM")]:
            path, boxes, intrinsic = nusc.get_sample_data(sample["data"][channel])
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
            h, w = image.shape[:2]
            for box in boxes:
                ann = nusc.get("sample_annotation", box.token)
                name = CATEGORY_CLASS[box.name]
                if name in DIRECTION_FREE or ann["visibility_token"] != "4" or not 2.0 < box.center[2] < 40.0:
                    continue
                rot = box.orientation.rotation_matrix
                width, length, height = box.wlh
                for end in (1.0, -1.0):  # the front (+x, the heading) and the back end face
                    point = box.center + rot @ np.array([end * length / 2, 0.0, height / 4])
                    normal = rot @ np.array([end, 0.0, 0.0])
                    if normal @ -point < 0.5 * np.linalg.norm(point):
                        continue  # that end is not seen face-on
                    u, v = view_points(point[:, None], intrinsic, normalize=True)[:2, 0]
                    u, v = int(round(u)), int(round(v))
                    if not (2 <= u < w - 2 and 2 <= v < h - 2):
                        continue
                    dark = np.median(image[v - 1 : v + 2, u - 1 : u + 2].reshape(-1, 3), axis=0).max() <= BAND_MAX
                    checked += 1
                    matched += dark == (end > 0)
    assert checked > 20, checked
    assert matched / checked > 0.9, (matched, checked)

    band_points = 0
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        points = LidarPointCloud.from_file(path).points
        xyz, weak = points[:3].astype(np.float64), points[3] == 2.0
        for box in boxes:
            inside = points_in_box(box, xyz)
            local = box.orientation.rotation_matrix.T @ (xyz[:, inside] - box.center[:, None])
            width, length, height = box.wlh
            if CATEGORY_CLASS[box.name] in DIRECTION_FREE:
                assert not weak[inside].any()
                continue
            on_band = weak[inside]
            # Band returns only on the front 40 % and the upper half; every return well inside that is one.
            assert (local[0, on_band] > 0.05 * length).all() and (local[2, on_band] > -0.05 * height).all()
            well_inside = (local[0] > 0.15 * length) & (local[2] > 0.05 * height)
            assert on_band[well_inside].all()
            band_points += int(on_band.sum())
    assert band_points > 50, band_points


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    cfg = TwinConfig(
        num_scenes=2, samples_per_scene=2, objects_per_scene=12, image_width=320, image_height=180, sweeps_per_sample=2
    )
    write_twin(cfg, tmp_path / "a", workers=1)
    write_twin(cfg, tmp_path / "b", workers=2)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a == b and len(a) > 30
    write_twin(TwinConfig(**{**cfg.__dict__, "seed": 1}), tmp_path / "c", workers=1)
    assert tree_digest(tmp_path / "c") != a


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_scenes": 0}, "synthesize.num_scenes"),
        ({"image_width": 100, "image_height": 60}, "synthesize.image_width/image_height"),
        ({"classes": ["car", "spaceship"]}, "synthesize.classes"),
        ({"version": "v2.0"}, "synthesize.version"),
    ],
)
def test_bad_params_fail_cleanly(tmp_path, change, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synthesize"].update(change)
    out = tmp_path / "data" / "nuscenes"
    params["convert"]["data_root"] = str(out)  # the twin is written only where convert reads it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = launch_stage(
        "synthesize",
        "--params",
        str(tmp_path / "params.yaml"),
        "--out",
        str(out),
        "--metrics",
        str(tmp_path / "m.json"),
    )
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "m.json").exists()
    assert not (out.parent.exists() and any(out.parent.iterdir()))


def test_config_validation_names_the_parameter():
    with pytest.raises(TwinConfigError, match="samples_per_scene"):
        TwinConfig(samples_per_scene=1).validate()
