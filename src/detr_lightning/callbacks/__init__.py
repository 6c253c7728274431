"""Lightning callbacks: COCO evaluation of the validation and test epochs, the per-epoch CSV, W&B media."""

from detr_lightning.callbacks.coco_evaluator import CocoEvaluator
from detr_lightning.callbacks.epoch_csv import EpochMetricsCSV
from detr_lightning.callbacks.wandb_media import WandbPredictionImages

__all__ = ["CocoEvaluator", "EpochMetricsCSV", "WandbPredictionImages"]
