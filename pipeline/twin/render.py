"""Camera images and LiDAR sweeps of the twin's world, through the written calibration.

Images: a z-buffer over a textured ground plane (z = 0), a sky, and shaded box faces whose hue
names the class. LiDAR: rays of a 32-beam spinning sensor cast against the ground and the boxes.

Objects show their front (the box's +x axis, the heading written in the annotations): a dark
"windscreen" of the class hue covers the upper half of the front face and of the front 40 % of the
sides and top, so a front view, a rear view and the two side views all differ even at a fifth of
the resolution. LiDAR hits on that band return a weak (glass) intensity. Barriers and traffic
cones have no front.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.exact import dot, norm, sin_cos, transform
from pipeline.twin.world import CLASS_SPECS, LIDAR_ELEVATIONS_DEG, LIDAR_MAX_RANGE, class_rgb

# Box faces as (corner indices, outward normal in the box frame); corners are ordered as
# itertools.product over (x, y, z) signs. The bottom face lies on the ground and is never seen.
_SIGNS = np.array([[sx, sy, sz] for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)], dtype=np.float64)
_FACES = (
    ((0, 1, 3, 2), (1.0, 0.0, 0.0)),
    ((4, 6, 7, 5), (-1.0, 0.0, 0.0)),
    ((0, 4, 5, 1), (0.0, 1.0, 0.0)),
    ((2, 3, 7, 6), (0.0, -1.0, 0.0)),
    ((0, 2, 6, 4), (0.0, 0.0, 1.0)),
)
_LIGHT = np.array([0.45, 0.3, 0.84]) / norm(np.array([0.45, 0.3, 0.84]))
# Classes without a front: nuScenes scores a barrier's orientation modulo 180 deg, a cone's not at all.
DIRECTION_FREE = ("barrier", "traffic_cone")
# The front band, in the box frame: x > FRONT_X * length (the front 40 %) and z > FRONT_Z * height
# (the upper half). Its shading range (0.25..0.35) lies well below the body's (0.55..1.0), so a
# lit front never looks like a body face in shadow.
FRONT_X, FRONT_Z = 0.1, 0.0
_BODY_SHADE = (0.55, 0.45)  # ambient, diffuse
_FRONT_SHADE = (0.25, 0.1)
_FRONT_INTENSITY = 2.0  # LiDAR intensity of a hit on the front band (glass returns weakly)
_SKY_TOP = np.array([90.0, 140.0, 215.0])
_SKY_HORIZON = np.array([200.0, 215.0, 230.0])
_NEAR = 0.1  # m, camera near plane


def box_corners(box: np.ndarray) -> np.ndarray:
    """(8, 3) global corners of one (7,) box x, y, z, w, l, h, yaw (see _SIGNS for the order)."""
    w, length, h, yaw = box[3], box[4], box[5], box[6]
    local = _SIGNS * np.array([length / 2, w / 2, h / 2])
    return transform(local, box_rotation(yaw), box[:3])


def box_rotation(yaw: float) -> np.ndarray:
    s, c = (float(v) for v in sin_cos(yaw))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def in_front_band(local: np.ndarray, size: np.ndarray) -> np.ndarray:
    """(m,) whether (m, 3) box-frame surface points lie on the front band of a (w, l, h) box."""
    return (local[:, 0] > FRONT_X * size[1]) & (local[:, 2] > FRONT_Z * size[2])


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Clip a (k, 3) camera-frame polygon to z >= _NEAR (Sutherland-Hodgman, one plane)."""
    out = []
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        a_in, b_in = a[2] >= _NEAR, b[2] >= _NEAR
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (_NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out)


class CameraRenderer:
    """Renders one camera's view.

    The ego stays on the ground plane and only turns about z, so everything about the ground
    and sky that does not depend on where the car is — which pixels see ground, their depth,
    where they hit the ground in the ego frame, the sky and haze — is computed once per camera.
    """

    def __init__(self, intrinsic: np.ndarray, cam_to_ego: np.ndarray, width: int, height: int):
        self.width, self.height = width, height
        self.intrinsic = intrinsic
        u, v = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        # (H, W, 3) camera-frame rays with z = 1: a pixel's depth along z is its ray parameter.
        self.rays = np.stack(
            [(u - intrinsic[0, 2]) / intrinsic[0, 0], (v - intrinsic[1, 2]) / intrinsic[1, 1], np.ones_like(u)], -1
        )
        rot, origin = cam_to_ego[:3, :3].astype(np.float32), cam_to_ego[:3, 3]
        dirs = transform(self.rays, rot)  # (H, W, 3) ego-frame directions
        dz = dirs[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.where(dz < -1e-6, -origin[2] / dz, np.inf).astype(np.float32)
        depth[depth > 400.0] = np.inf
        self.ground = np.isfinite(depth)
        self.depth = depth
        self.ground_xy = (origin[:2] + dirs[self.ground][:, :2] * depth[self.ground][:, None]).astype(np.float32)
        haze = np.clip(depth[self.ground] / 250.0, 0.0, 1.0)[:, None].astype(np.float32)
        self.ground_haze = haze
        self.ground_haze_rgb = (_SKY_HORIZON * haze).astype(np.float32)
        elevation = np.clip(dz / norm(dirs) * 3.0, 0.0, 1.0)[..., None]
        self.background = np.rint(_SKY_HORIZON * (1 - elevation) + _SKY_TOP * elevation).astype(np.uint8)
        # A fixed random 0.5 m texture, tiled every 128 m.
        self.texture = np.random.default_rng(7).integers(0, 23, size=(256, 256)).astype(np.float32)

    def _pixels(self, poly: np.ndarray) -> np.ndarray | None:
        """(k, 2) pixel coordinates of a (4, 3) camera-frame polygon clipped to the near plane."""
        poly = _clip_near(poly)
        if len(poly) < 3:
            return None
        return poly[:, :2] / poly[:, 2:3] * np.diag(self.intrinsic)[:2] + self.intrinsic[:2, 2]

    def ground_image(self, ego_to_global: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8: the sky, and the ground as a 2 m checkerboard with a fine 0.5 m
        texture (fixed in the global frame), hazing towards the horizon."""
        ego_rot = ego_to_global[:2, :2].astype(np.float32)
        g = transform(self.ground_xy, ego_rot, ego_to_global[:2, 3].astype(np.float32))  # (m, 2) global
        checker = (np.floor(g[:, 0] / 2.0) + np.floor(g[:, 1] / 2.0)) % 2
        cells = np.floor(g * 2.0).astype(np.int64) & 255
        gray = 88.0 + 26.0 * checker + self.texture[cells[:, 0], cells[:, 1]]
        image = self.background.copy()
        image[self.ground] = np.rint(gray[:, None] * (1 - self.ground_haze) + self.ground_haze_rgb).astype(np.uint8)
        return image

    def render(
        self, ego_to_global: np.ndarray, cam_to_global: np.ndarray, boxes: np.ndarray, names: list[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image (H, W, 3) uint8, per-object visible pixels (n,) and unoccluded pixels (n,).

        ego_to_global, cam_to_global: (4, 4) transforms; boxes: (n, 7) global boxes.
        """
        rot, origin = cam_to_global[:3, :3], cam_to_global[:3, 3]
        image = self.ground_image(ego_to_global)
        depth = self.depth.copy()
        ids = np.full((self.height, self.width), -1, dtype=np.int32)
        area = np.zeros(len(boxes), dtype=np.int64)
        world_to_cam = rot.T
        for k, box in enumerate(boxes):
            corners = transform(box_corners(box) - origin, world_to_cam)  # (8, 3) camera frame
            if (corners[:, 2] < _NEAR).all():
                continue
            for face in _FACES:
                area[k] += self._paint_face((image, depth, ids), k, box, names[k], corners, face, origin, world_to_cam)
        visible = np.bincount(ids[ids >= 0], minlength=len(boxes))
        return image, visible, area

    def _raster(
        self, uv: np.ndarray, band_uv: np.ndarray | None
    ) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
        """A face's (k, 2) pixel polygon rasterised in its bounding window (u0, v0, u1, v1) on the
        image: (h, w) paint, 0 outside the face, 1 the body, 2 the front band (polygon band_uv,
        if any); None when no pixel of it is on the image."""
        u0, v0 = np.floor(uv.min(0)).astype(int)
        u1, v1 = np.ceil(uv.max(0)).astype(int)
        u0, v0 = max(u0, 0), max(v0, 0)
        u1, v1 = min(u1, self.width - 1), min(v1, self.height - 1)
        if u1 < u0 or v1 < v0:
            return None
        mask_img = Image.new("L", (u1 - u0 + 1, v1 - v0 + 1), 0)
        draw = ImageDraw.Draw(mask_img)
        draw.polygon([(float(a - u0), float(b - v0)) for a, b in uv], fill=1)
        if band_uv is not None:
            draw.polygon([(float(a - u0), float(b - v0)) for a, b in band_uv], fill=2)
        paint = np.asarray(mask_img)
        if not (paint > 0).any():
            return None
        return (u0, v0, u1, v1), paint

    def _paint_face(
        self,
        canvas: tuple[np.ndarray, np.ndarray, np.ndarray],
        k: int,
        box: np.ndarray,
        name: str,
        corners: np.ndarray,
        face: tuple,
        origin: np.ndarray,
        world_to_cam: np.ndarray,
    ) -> int:
        """Z-buffers one face of box k (global (7,), (8, 3) camera-frame corners) into the canvas
        (image, depth, object ids), its front band in a darker shade; returns the face's pixels
        in front of the camera (occluded or not), 0 for a back face or one out of sight."""
        image, depth, ids = canvas
        idx, normal = face
        box_rot = box_rotation(box[6])
        half = np.array([box[4], box[3], box[5]]) / 2  # box-frame half extents (x, y, z)
        normal_g = transform(np.array(normal), box_rot)
        centre_g = box[:3] + transform(np.array(normal) * half, box_rot)
        if dot(normal_g, origin - centre_g) <= 0:
            return 0  # back face
        uv = self._pixels(corners[list(idx)])
        if uv is None:
            return 0
        band_uv = None
        if name not in DIRECTION_FREE and normal[0] >= 0:
            # The band's lower bounds in the box frame; a face's part on the band is the face with
            # its corners' x and z raised to them (for every face but the back one).
            band_low = np.array([FRONT_X * box[4], -np.inf, FRONT_Z * box[5]])
            band_local = np.maximum(_SIGNS[list(idx)] * half, band_low)  # (4, 3)
            band_uv = self._pixels(transform(transform(band_local, box_rot, box[:3]) - origin, world_to_cam))
        raster = self._raster(uv, band_uv)
        if raster is None:
            return 0
        (u0, v0, u1, v1), paint = raster
        mask = paint > 0
        normal_c = transform(normal_g, world_to_cam)
        point_c = transform(centre_g - origin, world_to_cam)
        rays = self.rays[v0 : v1 + 1, u0 : u1 + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            z = dot(normal_c, point_c) / dot(rays, normal_c.astype(np.float32))
        region = depth[v0 : v1 + 1, u0 : u1 + 1]
        mask &= (z > 0) & np.isfinite(z)
        front = mask & (z < region)
        region[front] = z[front]
        lit = max(0.0, float(dot(normal_g, _LIGHT)))
        pixels = image[v0 : v1 + 1, u0 : u1 + 1]
        pixels[front] = np.rint(class_rgb(name, _BODY_SHADE[0] + _BODY_SHADE[1] * lit)).astype(np.uint8)
        if band_uv is not None:
            band_rgb = class_rgb(name, _FRONT_SHADE[0] + _FRONT_SHADE[1] * lit)
            pixels[front & (paint == 2)] = np.rint(band_rgb).astype(np.uint8)
        ids[v0 : v1 + 1, u0 : u1 + 1][front] = k
        return int(mask.sum())


def lidar_rays(azimuth_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) unit ray directions in the LiDAR frame and (n,) beam (ring) index of each."""
    elev = np.radians(LIDAR_ELEVATIONS_DEG)
    azim = np.linspace(-np.pi, np.pi, azimuth_steps, endpoint=False)
    e, a = np.meshgrid(elev, azim, indexing="ij")
    (sin_e, cos_e), (sin_a, cos_a) = sin_cos(e), sin_cos(a)
    dirs = np.stack([cos_e * cos_a, cos_e * sin_a, sin_e], -1).reshape(-1, 3)
    ring = np.repeat(np.arange(len(elev)), azimuth_steps)
    return dirs, ring


_INTENSITY = {name: 20.0 + 9.0 * i for i, name in enumerate(CLASS_SPECS)}


def _box_columns(
    box: np.ndarray, origin: np.ndarray, rel_centre: np.ndarray, sensor_yaw: float, azimuth_steps: int
) -> np.ndarray:
    """The azimuth columns (indices into 0..azimuth_steps-1) whose rays can hit a (7,) global box:
    those within the box's angular extent seen from the sensor `origin`, one column of margin
    (a superset: the hits do not depend on which extra columns are tried, so np.arctan2's
    CPU-dependent last bit cannot change them)."""
    rot = box_rotation(box[6])[:2, :2]
    corners = transform(np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]]) * np.array([box[4], box[3]]) / 2, rot, box[:2]).T
    corner_ang = np.arctan2(corners[1] - origin[1], corners[0] - origin[0])
    centre_ang = np.arctan2(rel_centre[1], rel_centre[0])
    rel_ang = (corner_ang - centre_ang + np.pi) % (2 * np.pi) - np.pi
    if np.ptp(rel_ang) > np.pi - 0.1:
        return np.arange(azimuth_steps)
    lo = centre_ang + rel_ang.min() - sensor_yaw
    hi = centre_ang + rel_ang.max() - sensor_yaw
    step = 2 * np.pi / azimuth_steps
    first = int(np.floor((lo + np.pi) / step)) - 1
    last = int(np.ceil((hi + np.pi) / step)) + 1
    return np.arange(first, last + 1) % azimuth_steps


def _box_hits(box: np.ndarray, origin: np.ndarray, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where (m, 3) global ray directions from `origin` enter a (7,) box (slab test in the box
    frame): the ray parameter of the point placed just inside, (m, 3) that point in the box frame,
    and (m,) whether the ray hits at all with the point at least 1 mm inside every face (grazing
    rays pass), so a point's inside-or-outside never hangs on float rounding."""
    s, c = (float(v) for v in sin_cos(box[6]))
    rel = origin - box[:3]
    o_l = np.array([c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]])
    d_l = np.stack([c * rays[:, 0] + s * rays[:, 1], -s * rays[:, 0] + c * rays[:, 1], rays[:, 2]], 1)
    half = np.array([box[4], box[3], box[5]]) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - o_l) / d_l
        t2 = (half - o_l) / d_l
    t_in = np.nanmax(np.minimum(t1, t2), axis=1)
    t_out = np.nanmin(np.maximum(t1, t2), axis=1)
    t_hit = t_in + np.minimum(0.02, (t_out - t_in) / 2)
    with np.errstate(invalid="ignore"):
        local = o_l + d_l * t_hit[:, None]  # (m, 3) box frame
        inner = (half - np.abs(local)).min(axis=1)
        hits = (t_out > t_in) & (t_in > 0) & (inner > 1e-3)
    return t_hit, local, hits


def cast_lidar(
    sensor_to_global: np.ndarray, dirs: np.ndarray, ring: np.ndarray, boxes: np.ndarray, names: list[str]
) -> np.ndarray:
    """(m, 5) float32 points x, y, z, intensity, ring in the sensor frame, from the first hits.

    A box hit is placed just inside the box (up to 2 cm past its surface, at most half the
    chord) so that counting points inside boxes is exact despite rounding to float32.
    """
    rot, origin = sensor_to_global[:3, :3], sensor_to_global[:3, 3]
    d_g = transform(dirs, rot)  # (n, 3)
    n = len(dirs)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_best = np.where(d_g[:, 2] < -1e-9, -origin[2] / d_g[:, 2], np.inf)
    hit = np.full(n, -1, dtype=np.int64)
    on_band = np.zeros(n, dtype=bool)
    if len(boxes):
        rel_centre = boxes[:, :2] - origin[:2]
        near = norm(rel_centre) < LIDAR_MAX_RANGE + 10.0
        sensor_yaw = np.arctan2(rot[1, 0], rot[0, 0])
        azimuth_steps = n // len(LIDAR_ELEVATIONS_DEG)
        for k in np.flatnonzero(near):
            cols = _box_columns(boxes[k], origin, rel_centre[k], sensor_yaw, azimuth_steps)
            idx = (np.arange(len(LIDAR_ELEVATIONS_DEG))[:, None] * azimuth_steps + cols[None, :]).ravel()
            t_hit, local, hits = _box_hits(boxes[k], origin, d_g[idx])
            with np.errstate(invalid="ignore"):
                ok = hits & (t_hit < t_best[idx])
            t_best[idx[ok]] = t_hit[ok]
            hit[idx[ok]] = k
            on_band[idx[ok]] = in_front_band(local[ok], boxes[k][3:6]) & (names[k] not in DIRECTION_FREE)
    keep = (t_best < LIDAR_MAX_RANGE) & (t_best > 1.0)
    t = t_best[keep]
    points = dirs[keep] * t[:, None]
    intensity = np.where(hit[keep] >= 0, 0.0, 8.0 + (ring[keep] % 5))
    for k in np.unique(hit[keep][hit[keep] >= 0]):
        intensity[hit[keep] == k] = _INTENSITY[names[k]]
    intensity[on_band[keep]] = _FRONT_INTENSITY
    return np.column_stack([points, intensity, ring[keep]]).astype(np.float32)
