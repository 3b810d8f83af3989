"""Sparse4Dv3 (the reference's modules, maths and parameter names), usable on CPU, CUDA and NPU.

`from model import build_model` imports the network lazily, so that light users of the box
layout (`model.box3d`) do not pay for torch and mmdet.
"""

from __future__ import annotations

from typing import Any


def build_model(cfg: dict[str, Any], anchor):
    """The detector from a complete `model` section of a params file and (num_anchor, 11) anchors
    (see model.detector.build_model)."""
    from model.detector import build_model as _build

    return _build(cfg, anchor)
