"""Labelled image data behind one entry point, :func:`load_dataset`, and flagged-id files.

A split is decoded once into a compact ``uint8`` tensor ``[N, C, H, W]`` (resized to the model's
input size) and normalized per batch, so audits index examples by row without a data loader.
"""

from memaudit.data._dataset import (
    ImageDataset,
    complement,
    preprocess_origin,
    resolve_preprocess,
    sample,
    validate_rows,
)
from memaudit.data._ids import read_ids, write_ids
from memaudit.data._sources import IMAGE_COLUMNS, LABEL_COLUMNS, check_compatible, load_dataset

__all__ = [
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "ImageDataset",
    "check_compatible",
    "complement",
    "load_dataset",
    "preprocess_origin",
    "read_ids",
    "resolve_preprocess",
    "sample",
    "validate_rows",
    "write_ids",
]
