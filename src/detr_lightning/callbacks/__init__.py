"""Lightning callbacks: COCO evaluation of the validation and test epochs, and the per-epoch CSV."""

from detr_lightning.callbacks.coco_evaluator import CocoEvaluator
from detr_lightning.callbacks.epoch_csv import EpochMetricsCSV

__all__ = ["CocoEvaluator", "EpochMetricsCSV"]
