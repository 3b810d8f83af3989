"""Rigid transforms as nuScenes writes them: a translation and a [w, x, y, z] quaternion."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pyquaternion import Quaternion


def pose_matrix(rotation: Sequence[float], translation: Sequence[float]) -> np.ndarray:
    """(4, 4) homogeneous transform from a [w, x, y, z] rotation and an (x, y, z) translation."""
    mat = np.eye(4)
    mat[:3, :3] = Quaternion(list(rotation)).rotation_matrix
    mat[:3, 3] = translation
    return mat
