"""Weights & Biases media: validation images with predicted and ground-truth boxes, and the COCO tables.

The callback is inert unless a `WandbLogger` is among the trainer's loggers, so it can sit in the default
callbacks: ``logger=wandb`` alone turns it on. Boxes are drawn by W&B itself (its box overlay, one layer
for predictions and one for ground truth, both toggleable, with class names and a score filter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from detr_lightning.callbacks.coco_evaluator import CocoEvaluator
from detr_lightning.callbacks.val_samples import (
    ValidationSamples,
    confident_detections,
    ground_truth_boxes,
    labels_of,
)
from detr_lightning.coco_summary import COCO_MAX_DETECTIONS, COCO_SUMMARY_KEYS, coco_summary_lines

__all__ = [
    "WandbPredictionImages",
    "coco_per_class_rows",
    "coco_summary_rows",
    "confident_detections",  # from val_samples, shared with TrainingPlots
    "ground_truth_boxes",  # from val_samples, shared with TrainingPlots
    "wandb_box_layers",
    "wandb_class_labels",
]

IMAGES_KEY = "val/predictions"
_REQUIRED_DATAMODULE = ("coco_gt", "dataset", "class_names", "label_to_category_id")


class WandbPredictionImages(lightning.Callback):
    """Log validation images with boxes after every validation epoch, and the COCO tables at the end.

    - After each validation epoch: ``val/predictions/<image id>``, the first ``num_images`` images of the
      validation annotation file (lowest image ids, the same images every epoch), read from disk at their
      original size, with the predictions scoring at least ``score_threshold`` and the ground truth as
      W&B boxes.
    - After fit, stand-alone validate and test: ``<split>/coco_per_class`` (class, category id, AP, AR@100)
      and ``<split>/coco_summary`` (the 12 COCO figures) as W&B tables, from the `CocoEvaluator`'s last
      results.

    Does nothing without a `WandbLogger` (or under ``fast_dev_run``, which swaps loggers out); logs on
    global rank 0 only, after gathering the chosen images' detections from every rank. Needs the
    project's datamodule (``coco_gt``, ``dataset``, ``class_names``, ``label_to_category_id``).

    Args:
        num_images: how many validation images to log each epoch.
        score_threshold: predictions scoring below it are not drawn.
        log_tables: log the per-class and summary COCO tables.
    """

    def __init__(self, num_images: int = 8, score_threshold: float = 0.5, log_tables: bool = True) -> None:
        super().__init__()
        if num_images < 0 or not 0.0 <= score_threshold <= 1.0:
            raise ValueError(
                f"WandbPredictionImages(num_images={num_images}, score_threshold={score_threshold}): "
                "num_images must be >= 0 and score_threshold in [0, 1]"
            )
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.log_tables = log_tables
        self._wandb: WandbLogger | None = None
        self._samples = ValidationSamples(num_images, score_threshold)  # the images to log

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        self._wandb = next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
        missing = [name for name in _REQUIRED_DATAMODULE if not hasattr(trainer.datamodule, name)]
        if self._wandb is not None and missing:
            rank_zero_warn(
                f"WandbPredictionImages logs nothing: the datamodule {type(trainer.datamodule).__name__} has "
                f"no {', '.join(missing)}. Fix: pass the project's CocoDataModule as `datamodule=`."
            )
            self._wandb = None

    def on_validation_epoch_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self._samples.start_epoch()
        if self._wandb is not None:
            self._samples.choose(trainer.datamodule)

    def on_validation_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._wandb is not None and not trainer.sanity_checking:
            self._samples.collect(outputs)

    def on_validation_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        if self._wandb is None or trainer.sanity_checking or not self._samples.image_ids:
            return
        detections = self._samples.gather(trainer)  # a collective: every rank
        if trainer.is_global_zero and detections:
            self._log_images(trainer, detections)

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # stand-alone trainer.validate(); fit ends in on_fit_end
            self._log_coco_tables("val", trainer)

    def on_fit_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._log_coco_tables("val", trainer)

    def on_test_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._log_coco_tables("test", trainer)

    # ------------------------------------------------------------------ logging (global rank 0)
    def _log_images(self, trainer: lightning.Trainer, detections: Mapping[int, Mapping[str, Tensor]]) -> None:
        """Log the chosen images validated this epoch, each under its own key (their sizes differ, and one
        panel per image shows how its predictions change from epoch to epoch)."""
        import wandb

        assert self._wandb is not None
        samples = self._samples.samples(trainer.datamodule, detections)
        class_labels = wandb_class_labels(trainer.datamodule.class_names, labels_of(samples))
        classes = [{"id": label, "name": name} for label, name in class_labels.items()]
        images = {
            f"{IMAGES_KEY}/{sample.image_id}": wandb.Image(
                sample.pixels,
                caption=f"image id {sample.image_id}, epoch {trainer.current_epoch}",
                boxes=wandb_box_layers(sample.predictions, sample.ground_truth, class_labels),
                classes=classes,
            )
            for sample in samples
        }
        self._wandb.log_metrics(images, step=trainer.global_step)

    def _log_coco_tables(self, split: str, trainer: lightning.Trainer) -> None:
        """Log the per-class and summary tables of the evaluator's last ``split`` result, if there is one."""
        if self._wandb is None or not self.log_tables or not trainer.is_global_zero:
            return
        evaluator = next((c for c in trainer.callbacks if isinstance(c, CocoEvaluator)), None)
        result = evaluator.results.get(split) if evaluator is not None else None
        if result is None:
            return
        category_names = {
            category_id: str(category["name"])
            for category_id, category in trainer.datamodule.coco_gt(split).cats.items()
        }
        per_class = coco_per_class_rows(result, category_names)
        if per_class:
            self._wandb.log_table(
                key=f"{split}/coco_per_class",
                columns=["class", "id", "AP", f"AR@{COCO_MAX_DETECTIONS[-1]}"],
                data=per_class,
                step=trainer.global_step,
            )
        self._wandb.log_table(
            key=f"{split}/coco_summary",
            columns=["metric", "key", "value"],
            data=coco_summary_rows(result, split),
            step=trainer.global_step,
        )


# ---------------------------------------------------------------------- payloads (plain functions)
def wandb_class_labels(class_names: Mapping[int, str], labels: set[int]) -> dict[int, str]:
    """Label -> name for W&B: every named class, plus ``label <n>`` for the ``labels`` without a name
    (e.g. an unused id the model can still predict under ``label_mapping=raw``)."""
    class_labels = {int(label): str(name) for label, name in class_names.items()}
    for label in sorted(labels - set(class_labels)):
        class_labels[label] = f"label {label}"
    return dict(sorted(class_labels.items()))


def wandb_box_layers(
    predictions: Mapping[str, Tensor], ground_truth: Mapping[str, Tensor], class_labels: Mapping[int, str]
) -> dict[str, dict[str, Any]]:
    """The ``boxes=`` argument of ``wandb.Image`` for one image: a predictions and a ground-truth layer.

    Args:
        predictions: ``boxes (P, 4)`` xyxy original-image pixels, ``scores (P,)``, ``labels (P,)``.
        ground_truth: ``boxes (G, 4)`` xyxy original-image pixels, ``labels (G,)``, optional ``iscrowd (G,)``.
        class_labels: label -> name for every label present (see `wandb_class_labels`).

    Returns:
        ``{"predictions": {"box_data": [...], "class_labels": {...}}, "ground_truth": {...}}``; each box is
        ``{"position": {"minX", "minY", "maxX", "maxY"}, "domain": "pixel", "class_id", "box_caption"}``,
        predictions also carry ``"scores": {"score": s}`` (the W&B UI filters on it) and their caption
        shows the score; crowd ground-truth boxes are captioned ``"<name> (crowd)"``.
    """
    labels_by_id = {int(label): str(name) for label, name in class_labels.items()}
    predicted = [
        {
            **_box_position(box),
            "class_id": int(label),
            "box_caption": f"{labels_by_id[int(label)]} {score:.2f}",
            "scores": {"score": float(score)},
        }
        for box, score, label in zip(
            predictions["boxes"].tolist(),
            predictions["scores"].tolist(),
            predictions["labels"].tolist(),
            strict=True,
        )
    ]
    crowd = ground_truth.get("iscrowd", torch.zeros_like(ground_truth["labels"])).tolist()
    annotated = [
        {
            **_box_position(box),
            "class_id": int(label),
            "box_caption": labels_by_id[int(label)] + (" (crowd)" if is_crowd else ""),
        }
        for box, label, is_crowd in zip(
            ground_truth["boxes"].tolist(), ground_truth["labels"].tolist(), crowd, strict=True
        )
    ]
    return {
        "predictions": {"box_data": predicted, "class_labels": labels_by_id},
        "ground_truth": {"box_data": annotated, "class_labels": labels_by_id},
    }


def _box_position(box: list[float]) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(value) for value in box)
    return {"position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1}, "domain": "pixel"}


def coco_per_class_rows(result: Mapping[str, Tensor], category_names: Mapping[int, str]) -> list[list[Any]]:
    """``[name, category id, AP@[.50:.95], AR@100]`` per class of a metric result computed with
    ``class_metrics=True`` (empty otherwise); COCOeval's -1 (no ground truth) becomes ``None``."""
    recall_key = f"mar_{COCO_MAX_DETECTIONS[-1]}_per_class"
    if "classes" not in result or "map_per_class" not in result or recall_key not in result:
        return []
    category_ids = result["classes"].reshape(-1).tolist()
    precisions = result["map_per_class"].reshape(-1).tolist()
    recalls = result[recall_key].reshape(-1).tolist()
    if not len(category_ids) == len(precisions) == len(recalls):  # class_metrics=False: a single -1
        return []
    return [
        [category_names.get(int(category_id), str(category_id)), int(category_id), _defined(ap), _defined(ar)]
        for category_id, ap, ar in zip(category_ids, precisions, recalls, strict=True)
    ]


def coco_summary_rows(result: Mapping[str, Tensor], split: str) -> list[list[Any]]:
    """The 12 COCO figures as ``[COCOeval's description, logged key, value]``; -1 becomes ``None``."""
    descriptions = [" ".join(line.rsplit(" = ", 1)[0].split()) for line in coco_summary_lines(result)]
    return [
        [description, f"{split}/{key}", _defined(float(result[key]))]
        for description, key in zip(descriptions, COCO_SUMMARY_KEYS, strict=True)
    ]


def _defined(value: float) -> float | None:
    return None if value < 0 else float(value)
