"""`ValidationImagesCallback`, the base of `TrainingPlots` (a PNG grid) and `WandbPredictionImages` (W&B
images): a few validation images with their detections and ground truth, after every validation epoch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from lightning import Callback, LightningModule, Trainer
from torch import Tensor
from torchvision.ops import box_convert

from detr_lightning.callbacks.coco_evaluator import gather_from_ranks
from detr_lightning.metrics import coco_ground_truth, map_labels


@dataclass
class ValidationSample:
    """One validation image with its detections and ground truth, at its original size.

    Attributes:
        image_id: its id in the annotation file.
        pixels: ``(H, W, 3)`` uint8 RGB, original size.
        predictions: ``boxes (P, 4)`` xyxy pixels, ``scores (P,)``, ``labels (P,)`` (already thresholded).
        ground_truth: ``boxes (G, 4)`` xyxy pixels, ``labels (G,)``, optional ``iscrowd (G,)``.
    """

    image_id: int
    pixels: np.ndarray
    predictions: Mapping[str, Tensor]
    ground_truth: Mapping[str, Tensor]


class ValidationImagesCallback(Callback, ABC):
    """Follows the first ``num_images`` validation images (lowest ids of the validation annotation file,
    the same every epoch) and, after every validation epoch but the sanity check, hands them to `show` on
    global rank 0 with the detections scoring at least ``score_threshold``, gathered from every rank.

    Needs the project's datamodule (``coco_gt``, ``dataset``, ``class_names``, ``label_to_category_id``).
    Subclasses implement `show` and may override `choose_images`.
    """

    def __init__(self, num_images: int, score_threshold: float) -> None:
        super().__init__()
        if num_images < 0 or not 0.0 <= score_threshold <= 1.0:
            raise ValueError(
                f"{type(self).__name__}(num_images={num_images}, score_threshold={score_threshold}): "
                "num_images must be >= 0 and score_threshold in [0, 1]"
            )
        self.num_images = num_images
        self.score_threshold = score_threshold
        self._image_ids: list[int] | None = None  # None until chosen; [] shows nothing
        self._epoch_detections: dict[int, dict[str, Tensor]] = {}  # this rank's, of the running epoch
        # Rank 0's cache of the images and their ground truth.
        self._pixels: dict[int, np.ndarray] = {}
        self._ground_truth: dict[int, dict[str, Tensor]] = {}

    def choose_images(self, trainer: Trainer) -> list[int]:
        """The images to follow ([] shows nothing); every rank reads the same file, so chooses the same."""
        return sorted(trainer.datamodule.coco_gt("val").imgs)[: self.num_images]

    @abstractmethod
    def show(self, trainer: Trainer, samples: list[ValidationSample], names: dict[int, str]) -> None:
        """Show the followed images that have detections, in id order; ``names``: see `class_labels`."""

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_detections = {}
        if self._image_ids is None and not trainer.sanity_checking:
            self._image_ids = self.choose_images(trainer)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *_: Any
    ) -> None:
        """Keep the detections of the followed images from the step's ``{"image_ids", "detections"}``."""
        if trainer.sanity_checking or not self._image_ids or not isinstance(outputs, Mapping):
            return
        found = zip(outputs.get("image_ids", []), outputs.get("detections", []), strict=True)
        for image_id, detection in found:
            if int(image_id) in self._image_ids:
                self._epoch_detections[int(image_id)] = confident_detections(detection, self.score_threshold)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._image_ids:
            return
        per_rank = gather_from_ranks(trainer, self._epoch_detections)  # a collective: every rank calls it
        detections = {image_id: found for rank in per_rank for image_id, found in rank.items()}
        self._epoch_detections = {}
        if trainer.is_global_zero and detections:
            datamodule = trainer.datamodule
            samples = [self._sample(datamodule, i, detections[i]) for i in self._image_ids if i in detections]
            labels = {
                int(label)
                for sample in samples
                for boxes in (sample.predictions, sample.ground_truth)
                for label in boxes["labels"].tolist()
            }
            self.show(trainer, samples, class_labels(datamodule.class_names, labels))

    def _sample(self, datamodule: Any, image_id: int, detections: Mapping[str, Tensor]) -> ValidationSample:
        """The image with its pixels and ground truth, read from disk on first use, then cached."""
        if image_id not in self._pixels:
            dataset = datamodule.dataset("val")  # decoded as for training (EXIF orientation handled)
            pixels = dataset.read_image(dataset.image_ids.index(image_id))  # (3, H, W) uint8
            self._pixels[image_id] = pixels.permute(1, 2, 0).numpy()
            self._ground_truth[image_id] = ground_truth_boxes(
                datamodule.coco_gt("val"), image_id, datamodule.label_to_category_id
            )
        return ValidationSample(image_id, self._pixels[image_id], detections, self._ground_truth[image_id])


def class_labels(class_names: Mapping[int, str], labels: set[int]) -> dict[int, str]:
    """Label -> name: every named class, plus ``label <n>`` for the ``labels`` without a name (e.g. an
    unused id the model can still predict under ``label_mapping=raw``)."""
    names = {int(label): str(name) for label, name in class_names.items()}
    names.update({label: f"label {label}" for label in labels - set(names)})
    return dict(sorted(names.items()))


def box_captions(boxes: Mapping[str, Tensor], names: Mapping[int, str]) -> list[str]:
    """A caption per box: ``<name> <score>`` for detections (with ``scores``), else ``<name>``, or
    ``<name> (crowd)`` for a crowd box (``iscrowd``); a label without a name is ``label <n>``."""
    labels = [names.get(label, f"label {label}") for label in boxes["labels"].tolist()]
    if "scores" in boxes:
        return [f"{name} {score:.2f}" for name, score in zip(labels, boxes["scores"].tolist(), strict=True)]
    crowd = boxes["iscrowd"].tolist() if "iscrowd" in boxes else [0] * len(labels)
    return [name + (" (crowd)" if is_crowd else "") for name, is_crowd in zip(labels, crowd, strict=True)]


def confident_detections(detection: Mapping[str, Tensor], score_threshold: float) -> dict[str, Tensor]:
    """One image's ``boxes (Q, 4)``, ``scores (Q,)``, ``labels (Q,)`` scoring at least ``score_threshold``
    (``P <= Q`` of them, in order), detached, on the CPU."""
    keep = detection["scores"] >= score_threshold
    return {key: detection[key][keep].detach().cpu() for key in ("boxes", "scores", "labels")}


def ground_truth_boxes(
    coco_gt: Any, image_id: int, label_to_category_id: Mapping[int, int]
) -> dict[str, Tensor]:
    """One image's ground truth from the annotation file's ``COCO`` index, as model labels and pixels:
    ``boxes (G, 4)`` float64 xyxy, ``labels (G,)`` and ``iscrowd (G,)`` int64, in file order, crowd
    boxes included; annotations of categories without a label are left out."""
    category_to_label = {int(category_id): int(label) for label, category_id in label_to_category_id.items()}
    (truth,) = coco_ground_truth(coco_gt, [image_id])
    keep, labels = map_labels(truth["labels"], category_to_label)
    return {
        "boxes": box_convert(truth["boxes"][keep], "xywh", "xyxy"),
        "labels": labels,
        "iscrowd": truth["iscrowd"][keep],
    }
