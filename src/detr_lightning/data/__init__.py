"""COCO-format detection data: layouts, checks, datasets, DETR transforms, the DataModule and a demo set.

The names below are imported lazily, so that ``python -m detr_lightning.data.check`` / ``.demo`` run
without the package having imported them first.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "collate",
    "CocoDataModule": "datamodule",
    "CocoDetection": "coco",
    "DataError": "errors",
    "DetectionTransform": "transforms",
    "LabelMap": "categories",
    "collate_detection": "collate",
    "ensure_demo_dataset": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
