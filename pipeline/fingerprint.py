"""A cheap, honest fingerprint of the nuScenes sensor files that training and evaluation read.

As a DVC dependency, the dataset root would be hashed file by file: on v1.0-trainval that is
over a million files and 300+ GB before any stage runs. What the stages consume is less: the
version's tables (a DVC dependency, hashed: about a gigabyte in 13 files) and, of the sensor
files, the key frames' six camera images and LiDAR sweep under samples/ (the infos point there;
sweeps/, radar and maps are not read). Those folders are fingerprinted here by each file's name
and size, folder by folder, in seconds: a file added, removed, truncated or replaced by one of
another size changes the fingerprint. Not the modification time, which a copy, a `dvc checkout`
or an rsync changes without changing a byte; a rewrite to the very same size is not seen (rerun
with `dvc repro -f`), and nuScenes releases do not change in place.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.convert import CAMERA_TYPES

SENSORS = (*CAMERA_TYPES, "LIDAR_TOP")


class FingerprintError(ValueError):
    """The dataset root or one of its sensor folders is missing; the message names it."""


def folder_fingerprint(folder: str | os.PathLike) -> dict[str, Any]:
    """Number of files, their total size and a digest of the sorted (name, size) pairs."""
    with os.scandir(folder) as it:
        entries = sorted((e.name, e.stat().st_size) for e in it if e.is_file())
    digest = hashlib.sha256()
    for name, size in entries:
        digest.update(f"{name}\0{size}\n".encode())
    return {"files": len(entries), "bytes": sum(s for _, s in entries), "sha256": digest.hexdigest()}


def dataset_fingerprint(root: str | os.PathLike, sensors: tuple[str, ...] = SENSORS, workers: int = 8) -> dict:
    """{"samples/<sensor>": folder_fingerprint} for the sensor folders the stages read.

    The folders are listed in parallel threads (listing and stat release the GIL)."""
    root = Path(root)
    if not root.is_dir():
        raise FingerprintError(f"convert.data_root: nuScenes root {root} does not exist")
    folders = {f"samples/{s}": root / "samples" / s for s in sensors}
    missing = [name for name, path in folders.items() if not path.is_dir()]
    if missing:
        raise FingerprintError(f"{root}: no {', '.join(missing)} (is the dataset complete?)")
    with ThreadPoolExecutor(max(1, min(workers, len(folders)))) as pool:
        return dict(zip(folders, pool.map(folder_fingerprint, folders.values())))
