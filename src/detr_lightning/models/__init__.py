"""Plain-PyTorch DETR: no Lightning or Hydra in here."""

from detr_lightning.models.backbone import BackboneWithPosition, ResNetBackbone
from detr_lightning.models.criterion import SetCriterion, build_weight_dict
from detr_lightning.models.detr import DETR, MLP, build_detr
from detr_lightning.models.matcher import HungarianMatcher
from detr_lightning.models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from detr_lightning.models.postprocess import PostProcess
from detr_lightning.models.transformer import Transformer

__all__ = [
    "DETR",
    "MLP",
    "BackboneWithPosition",
    "HungarianMatcher",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "PostProcess",
    "ResNetBackbone",
    "SetCriterion",
    "Transformer",
    "build_detr",
    "build_weight_dict",
]
