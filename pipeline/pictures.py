"""Pictures of the evaluate stage, for a person to look at.

A frame: the six cameras in their physical arrangement (front-left, front, front-right over
back-left, back, back-right) with the predicted boxes (a colour per track id, labelled
"#id class score") and the ground truth (white), beside a bird's-eye view in the ego frame
(forward up) where every box carries a heading mark. A scene: the bird's-eye paths of its
ground-truth tracks beside those of the predicted tracks, in the global frame.

Boxes arrive in the LiDAR frame as the model writes them: x, y, z (centre), l, w, h, yaw, ...
(l along the heading). Drawing uses OpenCV on reduced-size JPEG decodes, so a frame costs a
fraction of a second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from pyquaternion import Quaternion

from pipeline.files import write_bytes_atomic
from pipeline.sensors import REDUCED_READ
from pipeline.submission import DETECTION_CONFIG, TRACKING_CONFIG, boxes_to_global

CAMERA_GRID = (
    ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
    ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"),
)
GT_RGB = (255, 255, 255)
BACKGROUND = "#1e1e1e"
LINE_GREY, EGO_GREY, TICK_GREY, TEXT_GREY = "#555555", "#bbbbbb", "#aaaaaa", "#dddddd"  # matplotlib pictures
# tab20 without its two greys (too close to the ground truth's white): one colour per track id
PALETTE = [
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
    (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
    (227, 119, 194), (247, 182, 210), (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
]  # fmt: skip
# corners 0-3: the front face (+l/2 along the heading), 4-7: the back face
EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
FRONT_CROSS = ((0, 2), (1, 3))
TILE_WIDTH = 640  # pixels per camera in the mosaic
PIXELS_PER_LINE_WIDTH = 640  # predicted boxes get 1 px of line per this many decoded image pixels
MIN_DEPTH = 0.5  # m: a box with a corner nearer to (or behind) the camera is not drawn
OFF_IMAGE = 2.0  # a box is drawn while a corner lies within this many image sizes off the image
LABEL_FONT, LABEL_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.4  # "#id class score" labels
LABEL_PLATE = (20, 20, 20)  # the dark plate under a label
LABEL_PAD = 2  # pixels around a label's text
LABEL_LIFT = 3  # pixels between a box's top corner and its label
CAMERA_NAME_SCALE, CAMERA_NAME_RGB, CAMERA_NAME_AT = 0.5, (240, 240, 240), (4, 16)
GAP = 4  # pixels between the camera rows, and between the cameras and the bird's-eye view
HEADER_HEIGHT, HEADER_GREY, HEADER_RGB, HEADER_TEXT_AT, HEADER_SCALE = 26, 30, (235, 235, 235), (6, 18), 0.5
BEV_EXTENT = 55.0  # m from the ego car to the bird's-eye view's edges
BEV_RINGS = (20, 40)  # m, dotted distance rings
EGO_FOOTPRINT = (1.9, 4.6)  # m, the ego car's width and length in the bird's-eye view
GT_LINE, PRED_LINE = 0.9, 1.4  # bird's-eye line widths (points)
DPI = 100  # matplotlib dots per inch for the bird's-eye view
TRACKS_FIGSIZE, TRACKS_DPI = (14, 7.4), 90  # the tracks picture: inches, dots per inch
TRACKS_MIN_HALF, TRACKS_MARGIN = 20.0, 6  # m: the smallest half width of a tracks panel, room around the tracks


def color_of(key: int) -> tuple[int, int, int]:
    return PALETTE[int(key) % len(PALETTE)]


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(n, >=7) x, y, z, l, w, h, yaw -> (n, 8, 3) corners in the same frame."""
    signs = np.array(
        [[1, 1, 1], [1, -1, 1], [1, -1, -1], [1, 1, -1], [-1, 1, 1], [-1, -1, 1], [-1, -1, -1], [-1, 1, -1]], float
    )
    local = signs[None] * boxes[:, None, 3:6] / 2  # (n, 8, 3)
    cos, sin = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = cos * local[..., 0] - sin * local[..., 1]
    y = sin * local[..., 0] + cos * local[..., 1]
    return np.stack([x, y, local[..., 2]], axis=-1) + boxes[:, None, :3]


def heading_segments(boxes: np.ndarray) -> np.ndarray:
    """(n, >=7) boxes -> (n, 2, 2): from the centre to the middle of the front face, x-y plane."""
    front = boxes[:, :2] + boxes[:, 3:4] / 2 * np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], axis=1)
    return np.stack([boxes[:, :2], front], axis=1)


def footprints(boxes: np.ndarray) -> np.ndarray:
    """(n, >=7) boxes -> (n, 5, 2) closed bottom outlines, x-y plane."""
    return box_corners(boxes)[:, [0, 1, 5, 4, 0], :2]


def to_frame(boxes: np.ndarray, rotation: Sequence[float], translation: Sequence[float]) -> np.ndarray:
    """(n, >=7) boxes moved by a rigid transform (quaternion, translation) about z (yaw only)."""
    q = Quaternion(list(rotation))
    out = boxes[:, :7].astype(np.float64).copy()
    out[:, :3] = boxes[:, :3] @ q.rotation_matrix.T + np.asarray(translation)
    out[:, 6] = boxes[:, 6] + q.yaw_pitch_roll[0]
    return out


def _label(
    img: np.ndarray, text: str, org: tuple[int, int], rgb: tuple[int, int, int], scale: float = LABEL_SCALE
) -> None:
    """Text on a dark plate, kept inside the image."""
    (tw, th), base = cv2.getTextSize(text, LABEL_FONT, scale, 1)
    x = int(np.clip(org[0], 0, max(0, img.shape[1] - tw - LABEL_PAD)))
    y = int(np.clip(org[1], th + LABEL_PAD, img.shape[0] - base))
    cv2.rectangle(img, (x, y - th - LABEL_PAD), (x + tw + LABEL_PAD, y + base), LABEL_PLATE, -1)
    cv2.putText(img, text, (x + LABEL_PAD // 2, y), LABEL_FONT, scale, rgb, 1, cv2.LINE_AA)


def read_reduced(path: str, width: int) -> tuple[np.ndarray, float]:
    """RGB image decoded at 1/2, 1/4 or 1/8 size when that still leaves >= `width` pixels
    (JPEG decodes that much faster); returns it and its scale to the full image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            full_width = im.width  # the header only
    except OSError as err:
        raise FileNotFoundError(f"{path}: camera image missing or unreadable ({err})") from err
    factor = max(f for f in REDUCED_READ if f == 1 or full_width / f >= width)
    img = cv2.imread(path, REDUCED_READ[factor])
    if img is None:
        raise FileNotFoundError(f"{path}: camera image unreadable")
    return np.ascontiguousarray(img[..., ::-1]), img.shape[1] / full_width


def project_boxes(
    boxes: np.ndarray, cam: dict, intrinsic: np.ndarray, image_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(n, >=7) LiDAR-frame boxes -> (n, 8, 2) pixel corners in a camera of the info and (n,)
    whether to draw each: every corner in front of the camera and one near enough to the image."""
    if len(boxes) == 0:
        return np.zeros((0, 8, 2)), np.zeros(0, bool)
    rot = np.asarray(cam["sensor2lidar_rotation"], np.float64)
    trans = np.asarray(cam["sensor2lidar_translation"], np.float64)
    cam_pts = (box_corners(boxes) - trans) @ rot  # (n, 8, 3): LiDAR -> camera
    depth = cam_pts[..., 2]
    uv = cam_pts @ intrinsic.T
    uv = uv[..., :2] / np.maximum(uv[..., 2:3], 1e-6)
    height, width = image_hw
    margin = OFF_IMAGE - 1
    inside = (uv[..., 0] > -margin * width) & (uv[..., 0] < OFF_IMAGE * width) & (uv[..., 1] < OFF_IMAGE * height)
    return uv, (depth > MIN_DEPTH).all(axis=1) & inside.any(axis=1)


def _draw_box(img: np.ndarray, uv: np.ndarray, rgb: tuple[int, int, int], thickness: int) -> None:
    """A projected box's 12 edges and the cross on its front face, from its (8, 2) pixel corners."""
    pts = np.round(uv).astype(np.int32)
    for a, b in EDGES + FRONT_CROSS:
        cv2.line(img, tuple(pts[a]), tuple(pts[b]), rgb, thickness, cv2.LINE_AA)


def camera_tile(
    cam: dict,
    gt_boxes: np.ndarray,
    pred_boxes: np.ndarray,
    pred_colors: list[tuple[int, int, int]],
    pred_labels: list[str],
    width: int = TILE_WIDTH,
) -> np.ndarray:
    """One camera image (RGB, `width` wide) with ground-truth and predicted boxes (LiDAR frame)
    projected through its calibration; boxes reaching behind the camera are left out."""
    img, scale = read_reduced(cam["data_path"], width)
    intrinsic = np.asarray(cam["cam_intrinsic"], np.float64).copy()
    intrinsic[:2] *= scale
    thickness = max(1, round(img.shape[1] / PIXELS_PER_LINE_WIDTH))
    gt_uv, gt_ok = project_boxes(gt_boxes, cam, intrinsic, img.shape[:2])
    for uv in gt_uv[gt_ok]:
        _draw_box(img, uv, GT_RGB, 1)
    pred_uv, pred_ok = project_boxes(pred_boxes, cam, intrinsic, img.shape[:2])
    for i in np.flatnonzero(pred_ok):
        _draw_box(img, pred_uv[i], pred_colors[i], thickness)
    for i in np.flatnonzero(pred_ok):
        top = pred_uv[i][np.argmin(pred_uv[i][:, 1])]
        if 0 <= top[0] < img.shape[1] and top[1] < img.shape[0]:
            _label(img, pred_labels[i], (int(top[0]), int(top[1]) - LABEL_LIFT), pred_colors[i])
    if img.shape[1] != width:
        img = cv2.resize(img, (width, round(img.shape[0] * width / img.shape[1])), interpolation=cv2.INTER_AREA)
    return img


def camera_mosaic(info: dict, gt_boxes: np.ndarray, pred_boxes: np.ndarray, colors: list, labels: list) -> np.ndarray:
    """The six cameras as they sit on the car: front row over back row, left to right."""
    rows = []
    for row in CAMERA_GRID:
        tiles = []
        for name in row:
            if name not in info["cams"]:
                raise KeyError(f"sample {info['token']}: no {name} in the info's cams")
            tile = camera_tile(info["cams"][name], gt_boxes, pred_boxes, colors, labels)
            _label(tile, name, CAMERA_NAME_AT, CAMERA_NAME_RGB, CAMERA_NAME_SCALE)
            tiles.append(tile)
        height = min(t.shape[0] for t in tiles)
        rows.append(np.concatenate([t[:height] for t in tiles], axis=1))
    gap = np.zeros((GAP, rows[0].shape[1], 3), np.uint8)
    return np.concatenate([rows[0], gap, rows[1]], axis=0)


def _dark_axes(ax) -> None:
    """Grey ticks and frame on the dark background."""
    ax.tick_params(colors=TICK_GREY, labelsize=7)
    for spine in ax.spines.values():
        spine.set_color(LINE_GREY)


def _figure_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def birds_eye(
    gt_boxes: np.ndarray, pred_boxes: np.ndarray, colors: list, size_px: int, extent: float = BEV_EXTENT
) -> np.ndarray:
    """Ego-frame boxes (forward up, left on the left) with heading marks, as an RGB array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    def view(xy: np.ndarray) -> np.ndarray:  # ego (x forward, y left) -> plot (right, up)
        return np.stack([-xy[..., 1], xy[..., 0]], axis=-1)

    fig, ax = plt.subplots(figsize=(size_px / DPI, size_px / DPI), dpi=DPI)
    fig.patch.set_facecolor(BACKGROUND)
    ax.set_facecolor(BACKGROUND)
    for radius in BEV_RINGS:
        ax.add_patch(plt.Circle((0, 0), radius, fill=False, color=LINE_GREY, linewidth=0.6, linestyle=":"))
    if len(gt_boxes):
        ax.add_collection(LineCollection(list(view(footprints(gt_boxes))), colors="white", linewidths=GT_LINE))
        ax.add_collection(LineCollection(list(view(heading_segments(gt_boxes))), colors="white", linewidths=GT_LINE))
    if len(pred_boxes):
        rgb = [tuple(c / 255 for c in color) for color in colors]
        ax.add_collection(LineCollection(list(view(footprints(pred_boxes))), colors=rgb, linewidths=PRED_LINE))
        ax.add_collection(LineCollection(list(view(heading_segments(pred_boxes))), colors=rgb, linewidths=PRED_LINE))
    ego_w, ego_l = EGO_FOOTPRINT
    ax.add_patch(plt.Rectangle((-ego_w / 2, -ego_l / 2), ego_w, ego_l, color=EGO_GREY))  # forward up
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    _dark_axes(ax)
    ax.set_title("bird's-eye view, ego frame (m), forward up", color=TEXT_GREY, fontsize=9)
    fig.tight_layout(pad=0.4)
    out = _figure_to_array(fig)
    plt.close(fig)
    return out


def prediction_styles(
    result: dict, classes: list[str], score_threshold: float
) -> tuple[np.ndarray, list[tuple[int, int, int]], list[str]]:
    """The boxes of one frame's result with score >= score_threshold, (n, >=7) LiDAR frame, their
    colours (per track id, or per class without ids) and labels "#id class score"."""
    keep = np.flatnonzero(np.asarray(result["scores_3d"]) >= score_threshold)
    pred = np.asarray(result["boxes_3d"], np.float64)[keep].reshape(-1, np.shape(result["boxes_3d"])[-1])
    labels = np.asarray(result["labels_3d"])[keep]
    scores = np.asarray(result["scores_3d"])[keep]
    ids = np.asarray(result["instance_ids"])[keep] if "instance_ids" in result else None
    colors = [color_of(ids[i] if ids is not None else labels[i]) for i in range(len(keep))]
    texts = [
        (f"#{int(ids[i])} " if ids is not None and ids[i] >= 0 else "") + f"{classes[int(labels[i])]} {scores[i]:.2f}"
        for i in range(len(keep))
    ]
    return pred, colors, texts


def _header(width: int, text: str) -> np.ndarray:
    """A dark strip with one line of text, to sit above a picture `width` pixels wide."""
    header = np.full((HEADER_HEIGHT, width, 3), HEADER_GREY, np.uint8)
    cv2.putText(header, text, HEADER_TEXT_AT, LABEL_FONT, HEADER_SCALE, HEADER_RGB, 1, cv2.LINE_AA)
    return header


def draw_frame(
    info: dict,
    result: dict,
    classes: list[str],
    score_threshold: float,
    path: str,
    title: str = "",
) -> None:
    """One frame as a PNG: the camera mosaic beside the bird's-eye view (see the module doc)."""
    pred, colors, texts = prediction_styles(result, classes, score_threshold)
    gt = np.asarray(info.get("gt_boxes", np.zeros((0, 7))), np.float64).reshape(-1, 7)
    mosaic = camera_mosaic(info, gt, pred, colors, texts)
    l2e = (info["lidar2ego_rotation"], info["lidar2ego_translation"])
    bev = birds_eye(to_frame(gt, *l2e), to_frame(pred, *l2e), colors, mosaic.shape[0])
    gap = np.zeros((mosaic.shape[0], GAP, 3), np.uint8)
    canvas = np.concatenate([mosaic, gap, bev[: mosaic.shape[0]]], axis=1)
    legend = (
        f"{title}   predictions (score >= {score_threshold:.2f}): a colour per track id, '#id class score'"
        "   ground truth: white   heading: the front face's cross / the line to the front"
    )
    write_png(path, np.concatenate([_header(canvas.shape[1], legend.strip()), canvas], axis=0))


def draw_tracks(scene_infos: list[dict], gt_tracks: dict, pred_tracks: dict, path: str, title: str = "") -> None:
    """The tracks of one scene, global frame: ground truth (left) beside prediction (right).
    `*_tracks`: track id -> list of (frame index, (>=7,) global box x, y, z, l, w, h, yaw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    ego = np.array([info["ego2global_translation"][:2] for info in scene_infos], np.float64)
    points = [ego] + [np.array([b[:2] for _, b in t]) for tracks in (gt_tracks, pred_tracks) for t in tracks.values()]
    allxy = np.concatenate(points, axis=0)
    centre = (allxy.min(axis=0) + allxy.max(axis=0)) / 2
    half = max(TRACKS_MIN_HALF, float((allxy.max(axis=0) - allxy.min(axis=0)).max()) / 2 + TRACKS_MARGIN)
    fig, axes = plt.subplots(1, 2, figsize=TRACKS_FIGSIZE, dpi=TRACKS_DPI)
    fig.patch.set_facecolor(BACKGROUND)
    for ax, tracks, name in ((axes[0], gt_tracks, "ground truth"), (axes[1], pred_tracks, "prediction")):
        ax.set_facecolor(BACKGROUND)
        ax.plot(ego[:, 0], ego[:, 1], color=EGO_GREY, linestyle="--", linewidth=1.2, label="ego path")
        ax.plot(ego[-1:, 0], ego[-1:, 1], marker="s", color=EGO_GREY, markersize=5)
        for track_id, track in sorted(tracks.items()):
            rgb = tuple(c / 255 for c in color_of(track_id))
            boxes = np.array([b for _, b in sorted(track, key=lambda fb: fb[0])], np.float64)
            ax.plot(boxes[:, 0], boxes[:, 1], color=rgb, linewidth=1.3, marker="o", markersize=2.5)
            last = boxes[-1:]
            ax.add_collection(LineCollection(list(footprints(last)) + list(heading_segments(last)), colors=[rgb]))
            ax.text(last[0, 0], last[0, 1], f" {track_id}", color=rgb, fontsize=7, va="bottom")
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_aspect("equal")
        _dark_axes(ax)
        ax.set_title(f"{name}: {len(tracks)} tracks over {len(scene_infos)} frames", color=TEXT_GREY, fontsize=10)
        ax.legend(loc="upper left", fontsize=7, facecolor=BACKGROUND, labelcolor=TEXT_GREY, edgecolor=LINE_GREY)
    fig.suptitle(
        f"{title}  (global frame, m; a colour and label per track id, dots per frame, box and heading at the last frame)",
        color=TEXT_GREY,
        fontsize=10,
    )
    fig.tight_layout()
    image = _figure_to_array(fig)
    plt.close(fig)
    write_png(path, image)


def write_png(path: str, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data.tobytes())


def global_box(translation: list, size_wlh: list, rotation: list) -> np.ndarray:
    """A devkit box (centre, w l h, quaternion) -> (7,) x, y, z, l, w, h, yaw."""
    w, length, h = size_wlh
    return np.array([*translation, length, w, h, Quaternion(rotation).yaw_pitch_roll[0]], np.float64)


def scene_tracks(infos: list[dict], track_results: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Ground-truth and predicted tracks of the frames `infos` (one scene), global frame:
    track id -> [(frame, (7,) box)]. Ground truth as the tracking evaluation sees it: tracking
    classes, inside their range, with LiDAR points."""
    from nuscenes.eval.common.config import config_factory

    class_range = config_factory(DETECTION_CONFIG).class_range
    names = list(config_factory(TRACKING_CONFIG).tracking_names)
    gt: dict[int, list] = {}
    pred: dict[str, list] = {}
    for frame, info in enumerate(infos):
        keep = np.array([n in names for n in info["gt_names"]], bool) & (info["num_lidar_pts"] > 0)
        labels = np.array([names.index(n) for n in info["gt_names"][keep]], np.int64)
        for row, _, nb in boxes_to_global(info, info["gt_boxes"][keep], labels, names, class_range):
            box = global_box(nb.center, nb.wlh, nb.orientation.elements)
            gt.setdefault(int(info["instance_inds"][keep][row]), []).append((frame, box))
        for t in track_results.get(info["token"], []):
            pred.setdefault(t["tracking_id"], []).append(
                (frame, global_box(t["translation"], t["size"], t["rotation"]))
            )
    return gt, pred


def draw_pictures(
    infos: list[dict],
    scene_flags: np.ndarray,
    results: dict[int, dict],
    track_sub: dict,
    classes: list[str],
    plots_dir: str,
    frames: int,
    score_threshold: float,
) -> None:
    """`frames` frames spread over the split (cameras + bird's-eye view), and the tracks of the
    first scene of the split (`scene_flags`: one scene number per info, temporal order)."""
    picks = sorted({int(i) for i in np.linspace(0, len(infos) - 1, frames)}) if frames > 0 and infos else []
    for n, idx in enumerate(i for i in picks if i in results):
        info = infos[idx]
        title = f"frame {idx + 1}/{len(infos)}, sample {info['token'][:8]}"
        draw_frame(info, results[idx], classes, score_threshold, os.path.join(plots_dir, f"frame_{n}.png"), title)
    if infos and "gt_boxes" in infos[0]:
        scene = [info for info, flag in zip(infos, scene_flags) if flag == scene_flags[0]]
        gt, pred = scene_tracks(scene, track_sub["results"])
        title = f"tracks of the first scene of the split (frames 1-{len(scene)} of {len(infos)})"
        draw_tracks(scene, gt, pred, os.path.join(plots_dir, "tracks.png"), title)
