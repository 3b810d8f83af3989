"""Shared fixtures: one small synthetic twin per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.twin.writer import TwinConfig, write_twin

ROOT = Path(__file__).resolve().parents[1]
SMALL = TwinConfig(num_scenes=3, samples_per_scene=3, objects_per_scene=30, image_width=640, image_height=360)


@pytest.fixture(scope="session")
def small_twin(tmp_path_factory) -> Path:
    """A 3-scene twin (2 mini_train scenes, 1 mini_val) at <tmp>/data/nuscenes."""
    root = tmp_path_factory.mktemp("twin") / "data" / "nuscenes"
    write_twin(SMALL, root, workers=2)
    return root
