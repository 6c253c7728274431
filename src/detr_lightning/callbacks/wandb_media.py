"""Weights & Biases media: validation images with predicted and ground-truth boxes, and the COCO tables.

The callback is inert unless a `WandbLogger` is among the trainer's loggers, so it can sit in the default
callbacks: ``logger=wandb`` alone turns it on. Boxes are drawn by W&B itself (its box overlay, one layer
for predictions and one for ground truth, both toggleable, with class names and a score filter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from detr_lightning.callbacks.coco_evaluator import CocoEvaluator
from detr_lightning.metrics import COCO_MAX_DETECTIONS, coco_summary_lines

IMAGES_KEY = "val/predictions"
#: The result keys of the 12 lines of ``COCOeval.summarize()``, in its order (see `coco_summary_lines`).
COCO_SUMMARY_KEYS = [
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    *(f"mar_{max_detections}" for max_detections in COCO_MAX_DETECTIONS),
    "mar_small",
    "mar_medium",
    "mar_large",
]
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
        self._image_ids: list[int] | None = None  # the images to log, lowest ids of the val file
        # This rank's detections of those images in the running epoch, already thresholded, on the CPU.
        self._epoch_detections: dict[int, dict[str, Tensor]] = {}
        # Rank 0's cache of the images as (H, W, 3) uint8 arrays and of their ground truth.
        self._pixels: dict[int, np.ndarray] = {}
        self._ground_truth: dict[int, dict[str, Tensor]] = {}

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
        self._epoch_detections = {}
        if self._wandb is not None and self._image_ids is None:
            self._image_ids = sorted(trainer.datamodule.coco_gt("val").imgs)[: self.num_images]

    def on_validation_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._wandb is None or trainer.sanity_checking or not self._image_ids:
            return
        wanted = set(self._image_ids)
        for image_id, detection in zip(outputs["image_ids"], outputs["detections"], strict=True):
            if int(image_id) in wanted:
                self._epoch_detections[int(image_id)] = confident_detections(detection, self.score_threshold)

    def on_validation_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        if self._wandb is None or trainer.sanity_checking or not self._image_ids:
            return
        detections = _gather_on_every_rank(trainer, self._epoch_detections)
        self._epoch_detections = {}
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

        assert self._wandb is not None and self._image_ids is not None
        datamodule = trainer.datamodule
        image_ids = [image_id for image_id in self._image_ids if image_id in detections]
        for image_id in image_ids:
            if image_id not in self._pixels:
                self._pixels[image_id] = _read_val_image(datamodule, image_id)
                self._ground_truth[image_id] = ground_truth_boxes(
                    datamodule.coco_gt("val"), image_id, datamodule.label_to_category_id
                )
        used_labels = {
            int(label)
            for image_id in image_ids
            for boxes in (detections[image_id], self._ground_truth[image_id])
            for label in boxes["labels"].tolist()
        }
        class_labels = wandb_class_labels(datamodule.class_names, used_labels)
        classes = [{"id": label, "name": name} for label, name in class_labels.items()]
        images = {
            f"{IMAGES_KEY}/{image_id}": wandb.Image(
                self._pixels[image_id],
                caption=f"image id {image_id}, epoch {trainer.current_epoch}",
                boxes=wandb_box_layers(detections[image_id], self._ground_truth[image_id], class_labels),
                classes=classes,
            )
            for image_id in image_ids
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
def confident_detections(detection: Mapping[str, Tensor], score_threshold: float) -> dict[str, Tensor]:
    """The detections of one image scoring at least ``score_threshold``, detached, on the CPU.

    Args:
        detection: ``boxes (Q, 4)`` xyxy pixels, ``scores (Q,)``, ``labels (Q,)``.

    Returns:
        ``boxes (P, 4)``, ``scores (P,)``, ``labels (P,)`` with ``P <= Q``, in the input's order.
    """
    keep = detection["scores"] >= score_threshold
    return {key: detection[key][keep].detach().cpu() for key in ("boxes", "scores", "labels")}


def ground_truth_boxes(
    coco_gt: Any, image_id: int, label_to_category_id: Mapping[int, int]
) -> dict[str, Tensor]:
    """One image's ground truth from the annotation file, as model labels and xyxy pixels.

    Args:
        coco_gt: the ``COCO`` index of the annotation file.
        image_id: the image.
        label_to_category_id: model label -> category id; annotations of other categories are left out.

    Returns:
        ``boxes (G, 4)`` float64 xyxy in original-image pixels, ``labels (G,)`` int64, ``iscrowd (G,)``
        int64, in file order (crowd boxes included).
    """
    category_to_label = {int(category_id): int(label) for label, category_id in label_to_category_id.items()}
    annotations = [a for a in coco_gt.imgToAnns.get(image_id, []) if a["category_id"] in category_to_label]
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return {
        "boxes": boxes,
        "labels": torch.tensor([category_to_label[a["category_id"]] for a in annotations], dtype=torch.int64),
        "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in annotations], dtype=torch.int64),
    }


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


def _read_val_image(datamodule: Any, image_id: int) -> np.ndarray:
    """The validation image ``image_id`` decoded as for training (EXIF handled): ``(H, W, 3)`` uint8."""
    dataset = datamodule.dataset("val")
    pixels = dataset.read_image(dataset.image_ids.index(image_id))  # (3, H, W) uint8
    return pixels.permute(1, 2, 0).numpy()


def _gather_on_every_rank(
    trainer: lightning.Trainer, detections: dict[int, dict[str, Tensor]]
) -> dict[int, dict[str, Tensor]]:
    """Every rank's detections of the chosen images, merged (pickled, so CPU tensors cross any backend)."""
    if trainer.world_size == 1 or not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        return detections
    per_rank: list[dict[int, dict[str, Tensor]] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(per_rank, detections)
    return {
        image_id: found for rank_detections in per_rank for image_id, found in (rank_detections or {}).items()
    }
