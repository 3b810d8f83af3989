"""The synthetic nuScenes twin's 3D world: sensors, classes, the ego path and object motion.

Frames follow nuScenes: global (map) frame with z up; ego frame x forward, y left, z up; camera
frame x right, y down, z forward; LiDAR frame rotated -90 deg about z from ego (x right). Boxes
are (w, l, h) with length along the box's own x axis, centred at half height above the ground.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

from pipeline.exact import dot, sin_cos
from pipeline.settings import CLASSES  # the 10 detection classes in Sparse4D's order


@dataclass(frozen=True)
class ClassSpec:
    categories: tuple[str, ...]  # nuScenes category names; the first is the usual one
    size: tuple[float, float, float]  # mean (w, l, h) in metres
    moving_share: float  # share of instances that move
    speed: tuple[float, float]  # m/s range when moving
    lanes: tuple[float, ...]  # lateral offsets (m, left positive) from the ego path
    weight: float  # share among objects beyond the first one of each class
    hue: float  # in [0, 1): the class's colour in the images


def _hue(i: int) -> float:
    return i / len(CLASSES)


# Sizes are the nuScenes class means; lanes keep moving traffic off the ego lane and static
# objects at the roadside.
CLASS_SPECS: dict[str, ClassSpec] = {
    "car": ClassSpec(("vehicle.car",), (1.95, 4.62, 1.73), 0.5, (3.0, 9.0), (-3.5, 3.5, -6.0, 6.0), 0.30, _hue(0)),
    "truck": ClassSpec(("vehicle.truck",), (2.51, 6.93, 2.84), 0.4, (3.0, 7.0), (-3.8, 3.8, -7.5, 7.5), 0.08, _hue(1)),
    "construction_vehicle": ClassSpec(
        ("vehicle.construction",), (2.83, 6.37, 3.19), 0.1, (1.0, 3.0), (-7.5, 7.5), 0.04, _hue(2)
    ),
    "bus": ClassSpec(
        ("vehicle.bus.rigid", "vehicle.bus.bendy"),
        (2.94, 11.19, 3.47),
        0.5,
        (3.0, 8.0),
        (-3.8, 3.8, -8.0, 8.0),
        0.04,
        _hue(3),
    ),
    "trailer": ClassSpec(
        ("vehicle.trailer",), (2.90, 12.28, 3.87), 0.2, (2.0, 6.0), (-4.0, 4.0, -8.5, 8.5), 0.04, _hue(4)
    ),
    "barrier": ClassSpec(
        ("movable_object.barrier",), (2.53, 0.50, 0.98), 0.0, (0.0, 0.0), (-5.0, 5.0, -6.5, 6.5), 0.10, _hue(5)
    ),
    "motorcycle": ClassSpec(
        ("vehicle.motorcycle",), (0.77, 2.11, 1.47), 0.5, (3.0, 8.0), (-3.0, 3.0, -6.0, 6.0), 0.06, _hue(6)
    ),
    "bicycle": ClassSpec(("vehicle.bicycle",), (0.60, 1.70, 1.28), 0.5, (2.0, 5.0), (-5.5, 5.5), 0.06, _hue(7)),
    "pedestrian": ClassSpec(
        ("human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker"),
        (0.67, 0.73, 1.77),
        0.6,
        (0.8, 1.8),
        (-7.0, 7.0, -8.5, 8.5, -10.0, 10.0),
        0.18,
        _hue(8),
    ),
    "traffic_cone": ClassSpec(
        ("movable_object.trafficcone",), (0.41, 0.41, 1.07), 0.0, (0.0, 0.0), (-4.5, 4.5, -5.5, 5.5), 0.10, _hue(9)
    ),
}

# nuScenes' 23 categories (all are written to category.json, as in the real tables).
ALL_CATEGORIES = (
    "animal",
    "human.pedestrian.adult",
    "human.pedestrian.child",
    "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer",
    "human.pedestrian.stroller",
    "human.pedestrian.wheelchair",
    "movable_object.barrier",
    "movable_object.debris",
    "movable_object.pushable_pullable",
    "movable_object.trafficcone",
    "static_object.bicycle_rack",
    "vehicle.bicycle",
    "vehicle.bus.bendy",
    "vehicle.bus.rigid",
    "vehicle.car",
    "vehicle.construction",
    "vehicle.emergency.ambulance",
    "vehicle.emergency.police",
    "vehicle.motorcycle",
    "vehicle.trailer",
    "vehicle.truck",
)

ATTRIBUTES = (
    "vehicle.moving",
    "vehicle.stopped",
    "vehicle.parked",
    "cycle.with_rider",
    "cycle.without_rider",
    "pedestrian.sitting_lying_down",
    "pedestrian.standing",
    "pedestrian.moving",
)

VISIBILITY_LEVELS = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))


def class_rgb(name: str, shade: float = 1.0) -> tuple[float, float, float]:
    """A class's surface colour (0..255) under a shading factor; hue identifies the class."""
    r, g, b = colorsys.hsv_to_rgb(CLASS_SPECS[name].hue, 0.85, 0.95 * shade)
    return 255.0 * r, 255.0 * g, 255.0 * b


@dataclass(frozen=True)
class CameraSpec:
    channel: str
    translation: tuple[float, float, float]  # in the ego frame, metres
    yaw_deg: float  # viewing direction in the ego frame, 0 = forward, left positive
    focal: float  # pixels at 1600 x 900


# nuScenes' camera order, mounting positions and focal lengths (rounded from the real calibration).
CAMERAS = (
    CameraSpec("CAM_FRONT", (1.70, 0.02, 1.51), 0.0, 1266.0),
    CameraSpec("CAM_FRONT_RIGHT", (1.55, -0.49, 1.50), -55.0, 1260.0),
    CameraSpec("CAM_FRONT_LEFT", (1.52, 0.49, 1.51), 55.0, 1272.0),
    CameraSpec("CAM_BACK", (0.03, 0.00, 1.57), 180.0, 809.0),
    CameraSpec("CAM_BACK_LEFT", (1.04, 0.48, 1.56), 110.0, 1256.0),
    CameraSpec("CAM_BACK_RIGHT", (1.05, -0.48, 1.59), -110.0, 1259.0),
)
LIDAR_TRANSLATION = (0.94, 0.0, 1.84)
LIDAR_YAW_DEG = -90.0
# Velodyne HDL-32E as on the nuScenes car: 32 beams from -30.67 to +10.67 degrees.
LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
LIDAR_MAX_RANGE = 70.0
KEYFRAME_DT = 0.5  # s, 2 Hz key frames
# Boxes float 2 cm above the ground so that ground LiDAR points are never on a box's bottom face.
BOX_LIFT = 0.02
SWEEP_DT = 0.05  # s, 20 Hz LiDAR


def yaw_quaternion(yaw: float) -> list[float]:
    """[w, x, y, z] of a rotation about z, as nuScenes stores rotations.

    Not pyquaternion's axis-angle constructor: its sin and cos are the C library's, whose last
    bit depends on the CPU (pipeline/exact.py), and it gives -0.0 for x and y at negative angles;
    either would change the bytes of the twin's tables."""
    s, c = sin_cos(yaw / 2.0)
    return [float(c), 0.0, 0.0, float(s)]


def camera_rotation(yaw_deg: float) -> np.ndarray:
    """(3, 3) camera -> ego rotation: camera z forward along yaw, x right, y down."""
    s, c = (float(v) for v in sin_cos(math.radians(yaw_deg)))
    forward = np.array([c, s, 0.0])
    right = np.array([s, -c, 0.0])
    down = np.array([0.0, 0.0, -1.0])
    return np.stack([right, down, forward], axis=1)


def camera_intrinsic(spec: CameraSpec, width: int, height: int) -> np.ndarray:
    """(3, 3) pinhole intrinsics scaled from the 1600 x 900 calibration."""
    sx, sy = width / 1600.0, height / 900.0
    return np.array([[spec.focal * sx, 0.0, 816.0 * sx], [0.0, spec.focal * sy, 491.0 * sy], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Path:
    """A road centreline of constant curvature; the ego drives along it at d = 0."""

    origin: tuple[float, float]
    heading: float
    curvature: float  # 1/m, left positive

    def pose(self, s: np.ndarray | float, d: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, heading at arc length s and lateral offset d (left positive)."""
        s = np.asarray(s, dtype=np.float64)
        d = np.asarray(d, dtype=np.float64)
        h = self.heading + self.curvature * s
        sin_h, cos_h = sin_cos(h)
        sin_0, cos_0 = sin_cos(self.heading)
        if abs(self.curvature) < 1e-9:
            x = self.origin[0] + s * cos_0
            y = self.origin[1] + s * sin_0
        else:
            k = self.curvature
            x = self.origin[0] + (sin_h - sin_0) / k
            y = self.origin[1] - (cos_h - cos_0) / k
        return x - d * sin_h, y + d * cos_h, h


@dataclass(frozen=True)
class SceneObject:
    name: str  # detection class
    category: str  # nuScenes category
    size: tuple[float, float, float]  # w, l, h
    s0: float  # arc length at t = 0
    d: float  # lateral offset
    speed: float  # along the road, m/s (signed)
    yaw_offset: float  # 0 along the road, pi against it, or a jitter for static objects

    @property
    def moving(self) -> bool:
        return abs(self.speed) > 0.3


@dataclass(frozen=True)
class Scene:
    index: int
    name: str
    path: Path
    ego_speed: float
    objects: tuple[SceneObject, ...]

    def ego_pose(self, t: float) -> tuple[list[float], list[float]]:
        """Ego translation and [w, x, y, z] rotation at time t (s from the scene start)."""
        x, y, h = self.path.pose(self.ego_speed * t)
        return [float(x), float(y), 0.0], yaw_quaternion(float(h))

    def object_boxes(self, t: float) -> np.ndarray:
        """(num_objects, 7) boxes at time t: x, y, z, w, l, h, yaw in the global frame."""
        if not self.objects:
            return np.zeros((0, 7))
        s = np.array([o.s0 + o.speed * t for o in self.objects])
        d = np.array([o.d for o in self.objects])
        x, y, h = self.path.pose(s, d)
        size = np.array([o.size for o in self.objects])
        yaw = h + np.array([o.yaw_offset for o in self.objects])
        yaw = (yaw + np.pi) % (2 * np.pi) - np.pi
        return np.column_stack([x, y, size[:, 2] / 2.0 + BOX_LIFT, size, yaw])


def _rect_corners(boxes: np.ndarray) -> np.ndarray:
    """(n, 4, 2) BEV corners of (n, 7) boxes."""
    s, c = sin_cos(boxes[:, 6])
    hl, hw = boxes[:, 4] / 2, boxes[:, 3] / 2
    local = np.stack(
        [np.stack([hl, hw], 1), np.stack([-hl, hw], 1), np.stack([-hl, -hw], 1), np.stack([hl, -hw], 1)], 1
    )
    rot = np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)  # (n, 2, 2)
    return local[..., 0:1] * rot[:, None, :, 0] + local[..., 1:2] * rot[:, None, :, 1] + boxes[:, None, :2]


def _overlaps(box: np.ndarray, others: np.ndarray) -> bool:
    """Whether the BEV rectangle of one (7,) box intersects any of (n, 7) others (separating axes)."""
    if len(others) == 0:
        return False
    a = _rect_corners(box[None])[0]  # (4, 2)
    b = _rect_corners(others)  # (n, 4, 2)
    axes = [a[1] - a[0], a[3] - a[0]]
    separated = np.zeros(len(others), dtype=bool)
    for axis in axes:
        pa = dot(a, axis)
        pb = dot(b, axis)
        separated |= (pb.max(1) < pa.min()) | (pb.min(1) > pa.max())
    for k in (1, 3):
        axis = b[:, k] - b[:, 0]  # (n, 2)
        pa = dot(a[None], axis[:, None])
        pb = dot(b, axis[:, None])
        separated |= (pb.max(1) < pa.min(1)) | (pb.min(1) > pa.max(1))
    return bool((~separated).any())


EGO_SIZE = (1.73, 4.08, 1.56)


def _draw_object(rng: np.random.Generator, name: str, near: bool, ego_travel: float) -> SceneObject:
    """One candidate object of a class: category, size, lane, motion and where along the road.

    Somewhere the ego will pass within sight of during the scene (it travels `ego_travel` metres);
    `near`: close enough to be inside every class's evaluation range (30 m at least) in some key
    frames, so that every scene holds every class for the evaluation."""
    spec = CLASS_SPECS[name]
    cat = spec.categories[0] if rng.random() < 0.8 else spec.categories[int(rng.integers(len(spec.categories)))]
    size = tuple(float(v) for v in np.array(spec.size) * rng.uniform(0.9, 1.1, 3))
    moving = rng.random() < spec.moving_share
    d = float(rng.choice(spec.lanes))
    if moving:
        speed = float(rng.uniform(*spec.speed))
        # Traffic on the left half drives against the ego (right-hand traffic).
        yaw_offset = math.pi if d > 0 else 0.0
        speed = -speed if d > 0 else speed
    else:
        speed = 0.0
        # A normal draw in the tail takes numpy's log1p from the C library: rounded to 1e-9 rad,
        # its last bit (which may depend on the CPU) cannot reach the tables.
        yaw_offset = float(rng.choice([0.0, math.pi]) + round(float(rng.normal(0.0, 0.15)), 9))
        if name in ("traffic_cone", "pedestrian"):
            yaw_offset = float(rng.uniform(-math.pi, math.pi))
        d += float(rng.uniform(-0.4, 0.4))
    if near:
        s0 = float(rng.uniform(-12.0, ego_travel + 12.0))
    else:
        s0 = float(rng.uniform(-40.0, ego_travel + 45.0))
    return SceneObject(name, cat, size, s0, d, speed, yaw_offset)


def make_scene(index: int, name: str, num_samples: int, num_objects: int, classes: tuple[str, ...], seed: int) -> Scene:
    """Lay out one scene: an ego path and non-overlapping objects that stay clear of the ego."""
    rng = np.random.default_rng([seed, index])
    duration = (num_samples - 1) * KEYFRAME_DT
    turning = rng.random() < 0.4
    path = Path(
        origin=(float(300.0 + 500.0 * index + rng.uniform(-50, 50)), float(600.0 + rng.uniform(-50, 50))),
        heading=float(rng.uniform(-np.pi, np.pi)),
        curvature=float(rng.choice([-1, 1]) * rng.uniform(0.01, 0.03)) if turning else 0.0,
    )
    ego_speed = float(0.0 if rng.random() < 0.15 else rng.uniform(3.0, 10.0))
    times = np.linspace(0.0, duration, max(2, 2 * num_samples))
    inflate = np.array([0, 0, 0, 0.6, 0.6, 0, 0])
    ego = SceneObject("ego", "", EGO_SIZE, 0.0, 0.0, ego_speed, 0.0)
    placed: list[SceneObject] = []
    weights = np.array([CLASS_SPECS[c].weight for c in classes])
    weights = weights / weights.sum()
    for i in range(num_objects):
        name_i = classes[i] if i < len(classes) else classes[int(rng.choice(len(classes), p=weights))]
        # the first object of each class close to the ego path (see _draw_object)
        near = i < len(classes)
        for _ in range(50):
            obj = _draw_object(rng, name_i, near, ego_speed * duration)
            trial = Scene(index, name, path, ego_speed, (obj,))
            others = Scene(index, name, path, ego_speed, tuple(placed) + (ego,))
            if not any(_overlaps(trial.object_boxes(t)[0] + inflate, others.object_boxes(t) + inflate) for t in times):
                placed.append(obj)
                break
    return Scene(index, name, path, ego_speed, tuple(placed))
