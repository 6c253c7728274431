"""DETR (DEtection TRansformer) with PyTorch Lightning and Hydra.

The package-level names are imported on first use, so importing a submodule (a tool, the data
check) does not load the model.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DETR": "detr_lightning.models",
    "HungarianMatcher": "detr_lightning.models",
    "PostProcess": "detr_lightning.models",
    "SetCriterion": "detr_lightning.models",
    "build_detr": "detr_lightning.models",
    "OFFICIAL_DETR_URLS": "detr_lightning.models.weight_files",
    "load_detr": "detr_lightning.checkpoints",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detr_lightning' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
