"""Reading the sensor files of a nuScenes info: camera images (checked, decoded, resized,
cropped, flipped and rotated as the reference, by its exact chain or the fast path; see
pipeline/dataset.py's docstring), the photometric distortion and normalisation, and LiDAR points.
A missing, empty, cut or undecodable file is a DatasetError naming it."""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

IMG_MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # RGB
IMG_STD = np.array([58.395, 57.12, 57.375], np.float32)


class DatasetError(RuntimeError):
    """Unreadable or inconsistent data; the message names the file."""


# OpenCV's decode flags for a JPEG at full, 1/2, 1/4 and 1/8 scale (the DCT scaling of libjpeg).
REDUCED_READ = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


# A JPEG may end in a few padding bytes (0x00 or 0xFF fill, as some cameras write) after its
# end-of-image marker FF D9; more than this many is taken for a cut or damaged file.
JPEG_TAIL_WINDOW = 256


def _jpeg_is_whole(buf: np.ndarray) -> bool:
    """Whether the (n,) uint8 bytes of a JPEG end with the end-of-image marker FF D9, followed only
    by padding within the last ``JPEG_TAIL_WINDOW`` bytes. (FF D9 cannot occur inside the
    entropy-coded data, where an FF byte is always followed by 00 or a restart marker.)"""
    tail = buf[-JPEG_TAIL_WINDOW:]
    content = np.flatnonzero((tail != 0x00) & (tail != 0xFF))
    if content.size == 0:
        return False
    last = int(content[-1])
    return last >= 1 and tail[last] == 0xD9 and tail[last - 1] == 0xFF


def read_image(path: str, flags: int) -> np.ndarray:
    """``cv2.imread(path, flags)``'s pixels, bit for bit, but a missing, empty or cut file, or one
    OpenCV cannot decode, is a :class:`DatasetError` naming it (libjpeg decodes a cut JPEG with its
    lower part grey, and only warns on stderr).

    The file is read once; a JPEG must end with its end-of-image marker, then the same bytes are
    decoded with the same flags."""
    try:
        buf = np.fromfile(path, np.uint8)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the image ({err})") from err
    if buf.size == 0:
        raise DatasetError(f"{path}: empty image file (0 bytes); re-download or re-copy the file")
    if buf[0] == 0xFF and buf.size > 1 and buf[1] == 0xD8 and not _jpeg_is_whole(buf):
        raise DatasetError(
            f"{path}: truncated or corrupt JPEG (no end-of-image marker; {buf.size} bytes); "
            "re-download or re-copy the file"
        )
    try:
        pixels = cv2.imdecode(buf, flags)
    except cv2.error as err:
        raise DatasetError(f"{path}: cannot decode the image ({err})") from err
    if pixels is None:
        raise DatasetError(
            f"{path}: cannot decode the image (corrupt or not an image); re-download or re-copy the file"
        )
    return pixels


def _rotate_as_reference(img: np.ndarray, angle: float) -> np.ndarray:
    """PIL's ``Image.rotate(angle)`` (nearest, about the centre, black corners), as the reference."""
    if angle == 0:
        return img
    return np.asarray(Image.fromarray(img).rotate(angle))


def load_image_fast(path: str, aug: dict, out_wh: tuple[int, int], size_wh: tuple[int, int]) -> np.ndarray:
    """Decode at reduced scale where possible, resample once into the crop -> (H, W, 3) uint8 RGB.

    size_wh: the source image's (width, height). A JPEG is decoded at 1/2, 1/4 or 1/8 scale (the
    largest that keeps it at least the resized size), straight into an array; what is still at
    least twice too large is shrunk by an integer box filter against aliasing. The bilinear
    resampling maps pixel centres as the reference's resize to whole pixels
    ``(int(W * resize), int(H * resize))`` does; crop borders, flip and rotation are the
    reference's."""
    width, height = size_wh
    resize = float(aug["resize"])
    step = 1
    while step < 8 and resize * step * 2 <= 1.0:
        step *= 2
    pixels = read_image(path, REDUCED_READ[step])
    if pixels.shape[:2] != (math.ceil(height / step), math.ceil(width / step)):
        raise DatasetError(
            f"{path}: the image is {pixels.shape[1] * step}x{pixels.shape[0] * step} (at 1/{step} scale "
            f"{pixels.shape[1]}x{pixels.shape[0]}), but data.aug says W x H = {width}x{height}"
        )
    new_w, new_h = int(width * resize), int(height * resize)
    factor = int(min(pixels.shape[1] / new_w, pixels.shape[0] / new_h) // 2 * 2)
    if factor >= 2:
        pixels = cv2.resize(pixels, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
    # Output pixel (x, y) of the crop is pixel (x + crop_x, y + crop_y) of the resized image, whose
    # centre lies at (x + crop_x + 0.5) * W / new_w in source pixels (as PIL's resize maps them).
    crop_x, crop_y = aug["crop"][:2]
    sx, sy = pixels.shape[1] / new_w, pixels.shape[0] / new_h  # decoded pixels per resized pixel
    inverse = np.array([[sx, 0.0, (crop_x + 0.5) * sx - 0.5], [0.0, sy, (crop_y + 0.5) * sy - 0.5]])
    out_w, out_h = out_wh
    out = cv2.warpAffine(
        pixels,
        inverse,
        (out_w, out_h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    # Black where the crop leaves the resized image, as PIL's crop pads.
    out[: max(0, -crop_y)] = 0
    out[max(0, new_h - crop_y) :] = 0
    out[:, : max(0, -crop_x)] = 0
    out[:, max(0, new_w - crop_x) :] = 0
    out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    if aug["flip"]:
        out = np.ascontiguousarray(out[:, ::-1])
    return _rotate_as_reference(out, float(aug["rotate"]))


def load_image_chain(path: str, aug: dict, size_wh: tuple[int, int]) -> np.ndarray:
    """The reference's chain -> (H, W, 3) uint8 RGB: OpenCV decode (``mmcv.imread``), PIL resize
    to ``(int(W * resize), int(H * resize))``, crop, flip, rotate. size_wh: the (width, height)
    that data.aug expects (the augmentation's crop is drawn for it)."""
    pixels = read_image(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    height, width = pixels.shape[:2]
    if (width, height) != tuple(size_wh):
        raise DatasetError(
            f"{path}: the image is {width}x{height}, but data.aug says W x H = {size_wh[0]}x{size_wh[1]}"
        )
    img = Image.fromarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB))
    resize = aug["resize"]
    img = img.resize((int(width * resize), int(height * resize))).crop(tuple(aug["crop"]))
    if aug["flip"]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _rotate_as_reference(np.asarray(img), float(aug["rotate"]))


def photometric_distortion(img: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """mmdet's PhotoMetricDistortion as the reference applies it per view (float32 RGB in, out).

    The reference distorts BGR images; HSV conversions are the same either way, and the channel
    swap is mirrored so that one draw of ``rng`` gives the reference's result."""
    img = img.astype(np.float32)
    if rng.randint(2):
        img += rng.uniform(-32, 32)
    contrast_first = rng.randint(2)
    if contrast_first and rng.randint(2):
        img *= rng.uniform(0.5, 1.5)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    if rng.randint(2):
        hsv[..., 1] *= rng.uniform(0.5, 1.5)
    if rng.randint(2):
        hsv[..., 0] += rng.uniform(-18, 18)
        hsv[..., 0][hsv[..., 0] > 360] -= 360
        hsv[..., 0][hsv[..., 0] < 0] += 360
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.randint(2):
        img *= rng.uniform(0.5, 1.5)
    if rng.randint(2):
        img = img[..., 2 - rng.permutation(3)[::-1]]  # the reference's permutation of B, G, R
    return img


def normalise(imgs: Sequence[np.ndarray]) -> np.ndarray:
    """(H, W, 3) RGB images -> (N, 3, H, W) float32, (x - mean) / std, written in one pass per image."""
    height, width = imgs[0].shape[:2]
    out = np.empty((len(imgs), 3, height, width), np.float32)
    scale = (1.0 / IMG_STD)[:, None, None]
    for i, img in enumerate(imgs):
        np.subtract(img.transpose(2, 0, 1), IMG_MEAN[:, None, None], out=out[i], dtype=np.float32)
        out[i] *= scale
    return out


POINT_BYTES = 5 * 4  # float32 x, y, z, intensity, ring


def load_points(path: str) -> np.ndarray:
    """A LiDAR file -> (n, 5) float32 points; an empty file or one cut mid-point is a
    :class:`DatasetError` naming it and its size."""
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the LiDAR points ({err})") from err
    if raw.size == 0 or raw.size % POINT_BYTES:
        raise DatasetError(
            f"{path}: {raw.size} bytes, not a non-zero whole number of LiDAR points ({POINT_BYTES} bytes each: "
            "float32 x, y, z, intensity, ring); re-download or re-copy the file"
        )
    return raw.view(np.float32).reshape(-1, 5)
