"""Weights & Biases media: validation images with predicted and ground-truth boxes, and the COCO tables.

Inert without a `WandbLogger`, so it sits in the default callbacks: ``logger=wandb`` alone turns it on.
Boxes are drawn by W&B itself (toggleable layers for predictions and ground truth, with a score filter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from detr_lightning.callbacks.coco_evaluator import CocoEvaluator, EvaluationEndCallback, Split
from detr_lightning.callbacks.val_samples import ValidationImagesCallback, ValidationSample, box_captions
from detr_lightning.coco_summary import COCO_MAX_DETECTIONS, COCO_SUMMARY_KEYS, coco_summary_lines
from detr_lightning.metrics import category_names, per_class_values

IMAGES_KEY = "val/predictions"
_REQUIRED_DATAMODULE = ("coco_gt", "dataset", "class_names", "label_to_category_id")


class WandbPredictionImages(ValidationImagesCallback, EvaluationEndCallback):
    """Log validation images with boxes after every validation epoch, and the COCO tables at the end.

    After each validation epoch, ``val/predictions/<image id>``: the first ``num_images`` images of the
    validation file at their original size, with the predictions scoring at least ``score_threshold`` and
    the ground truth as W&B boxes. After fit, stand-alone validate and test (``log_tables``), the
    `CocoEvaluator`'s last results as ``<split>/coco_per_class`` (class, category id, AP, AR@100) and
    ``<split>/coco_summary`` (the 12 COCO figures). Does nothing without a `WandbLogger` (or under
    ``fast_dev_run``, which swaps loggers out); logs on global rank 0 only. Needs the project's datamodule.
    """

    def __init__(self, num_images: int = 8, score_threshold: float = 0.5, log_tables: bool = True) -> None:
        super().__init__(num_images, score_threshold)
        self.log_tables = log_tables
        self._wandb: WandbLogger | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._wandb = next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
        missing = [name for name in _REQUIRED_DATAMODULE if not hasattr(trainer.datamodule, name)]
        if self._wandb is not None and missing:
            rank_zero_warn(
                f"WandbPredictionImages logs nothing: the datamodule {type(trainer.datamodule).__name__} has "
                f"no {', '.join(missing)}. Fix: pass the project's CocoDataModule as `datamodule=`."
            )
            self._wandb = None

    def choose_images(self, trainer: Trainer) -> list[int]:
        return super().choose_images(trainer) if self._wandb is not None else []

    def show(self, trainer: Trainer, samples: list[ValidationSample], names: dict[int, str]) -> None:
        """Log each image under its own key: their sizes differ, and one panel per image shows how its
        predictions change from epoch to epoch."""
        import wandb

        classes = [{"id": label, "name": name} for label, name in names.items()]
        images = {
            f"{IMAGES_KEY}/{sample.image_id}": wandb.Image(
                sample.pixels,
                caption=f"image id {sample.image_id}, epoch {trainer.current_epoch}",
                boxes=wandb_box_layers(sample.predictions, sample.ground_truth, names),
                classes=classes,
            )
            for sample in samples
        }
        self._wandb.log_metrics(images, step=trainer.global_step)

    def on_evaluation_end(self, split: Split, trainer: Trainer) -> None:
        """Log the per-class and summary tables of the evaluator's last ``split`` result, if there is one."""
        if self._wandb is None or not self.log_tables or not trainer.is_global_zero:
            return
        evaluator = next((c for c in trainer.callbacks if isinstance(c, CocoEvaluator)), None)
        result = evaluator.results.get(split) if evaluator is not None else None
        if result is None:
            return
        per_class = coco_per_class_rows(result, category_names(trainer.datamodule.coco_gt(split)))
        tables = {
            "coco_per_class": (["class", "id", "AP", f"AR@{COCO_MAX_DETECTIONS[-1]}"], per_class),
            "coco_summary": (["metric", "key", "value"], coco_summary_rows(result, split)),
        }
        for name, (columns, rows) in tables.items():
            if rows:  # no per-class rows without class_metrics
                self._wandb.log_table(f"{split}/{name}", columns=columns, data=rows, step=trainer.global_step)


def wandb_box_layers(
    predictions: Mapping[str, Tensor], ground_truth: Mapping[str, Tensor], class_labels: Mapping[int, str]
) -> dict[str, dict[str, Any]]:
    """The ``boxes=`` argument of ``wandb.Image`` for one image: a predictions and a ground-truth layer.

    Takes ``predictions`` ``boxes (P, 4)`` xyxy original-image pixels, ``scores (P,)``, ``labels (P,)``;
    ``ground_truth`` ``boxes (G, 4)``, ``labels (G,)``, optional ``iscrowd (G,)``; and a name for every
    label present. Each box is ``{"position": {"minX", "minY", "maxX", "maxY"}, "domain": "pixel",
    "class_id", "box_caption"}`` (the captions of `box_captions`); predictions also carry
    ``"scores": {"score": s}``, which the W&B UI filters on.
    """
    names = {int(label): str(name) for label, name in class_labels.items()}

    def box(xyxy: list[float], label: int, caption: str) -> dict[str, Any]:
        x0, y0, x1, y1 = (float(value) for value in xyxy)
        position = {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1}
        return {"position": position, "domain": "pixel", "class_id": int(label), "box_caption": caption}

    def layer(boxes: Mapping[str, Tensor]) -> list[dict[str, Any]]:
        captions = box_captions(boxes, names)
        return [
            box(*row) for row in zip(boxes["boxes"].tolist(), boxes["labels"].tolist(), captions, strict=True)
        ]

    predicted = layer(predictions)
    for box_data, score in zip(predicted, predictions["scores"].tolist(), strict=True):
        box_data["scores"] = {"score": float(score)}
    return {
        "predictions": {"box_data": predicted, "class_labels": names},
        "ground_truth": {"box_data": layer(ground_truth), "class_labels": names},
    }


def coco_per_class_rows(result: Mapping[str, Tensor], names: Mapping[int, str]) -> list[list[Any]]:
    """``[name, category id, AP@[.50:.95], AR@100]`` per class of a metric result computed with
    ``class_metrics=True`` (empty otherwise); COCOeval's -1 (no ground truth) becomes ``None``."""
    return [
        [names.get(int(category_id), str(category_id)), int(category_id), _defined(ap), _defined(ar)]
        for category_id, ap, ar in per_class_values(result)
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
