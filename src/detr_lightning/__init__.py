"""DETR (DEtection TRansformer) with PyTorch Lightning and Hydra."""

from detr_lightning.checkpoints import OFFICIAL_DETR_URLS, load_official_detr
from detr_lightning.models import DETR, HungarianMatcher, PostProcess, SetCriterion, build_detr

__all__ = [
    "DETR",
    "OFFICIAL_DETR_URLS",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "build_detr",
    "load_official_detr",
]
