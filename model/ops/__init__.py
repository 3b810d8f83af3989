"""Custom ops of the Sparse4Dv3 model."""

from .deformable_aggregation import (
    BACKENDS,
    FlattenedFeatures,
    deformable_aggregation,
    deformable_aggregation_exportable,
    deformable_aggregation_grid_sample,
    flatten_feature_maps,
    select_backend,
)

__all__ = [
    "BACKENDS",
    "FlattenedFeatures",
    "deformable_aggregation",
    "deformable_aggregation_exportable",
    "deformable_aggregation_grid_sample",
    "flatten_feature_maps",
    "select_backend",
]
