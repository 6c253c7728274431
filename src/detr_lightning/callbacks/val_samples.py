"""The validation images that callbacks show every epoch, with their detections and ground truth.

`TrainingPlots` (a PNG grid) and `WandbPredictionImages` (W&B images) follow the same few validation
images through training: `ValidationSamples` chooses them, collects their detections batch by batch,
gathers them from every rank, and reads their pixels and ground truth from disk (once, then cached).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning
import numpy as np
import torch
from torch import Tensor


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


class ValidationSamples:
    """The first ``num_images`` validation images (lowest image ids of the validation annotation file, the
    same images every epoch) and their detections scoring at least ``score_threshold``.

    A callback uses it from its hooks, in this order:

    1. `choose` when a validation epoch starts (every rank reads the same file, so every rank chooses the
       same images), then `start_epoch`;
    2. `collect` with each validation step's output;
    3. `gather` when the epoch ends: a collective, so every rank calls it, even one without detections;
    4. on global rank 0, `samples` of the gathered detections: the images to show.

    Needs the project's datamodule (``coco_gt``, ``dataset``, ``label_to_category_id``).

    Attributes:
        image_ids: the chosen images; ``None`` until `choose`, ``[]`` shows nothing.
        detections: this rank's detections of the chosen images in the running epoch, thresholded, on CPU.
    """

    def __init__(self, num_images: int, score_threshold: float) -> None:
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.image_ids: list[int] | None = None
        self.detections: dict[int, dict[str, Tensor]] = {}
        # Rank 0's cache of the images as (H, W, 3) uint8 arrays and of their ground truth.
        self._pixels: dict[int, np.ndarray] = {}
        self._ground_truth: dict[int, dict[str, Tensor]] = {}

    def choose(self, datamodule: Any) -> list[int]:
        """Choose the images on the first call (later calls keep them); errors of the datamodule propagate."""
        if self.image_ids is None:
            self.image_ids = sorted(datamodule.coco_gt("val").imgs)[: self.num_images]
        return self.image_ids

    def start_epoch(self) -> None:
        """Forget the detections of the previous epoch."""
        self.detections = {}

    def collect(self, outputs: Any) -> None:
        """Keep the detections of the chosen images from one validation step's output.

        Args:
            outputs: the step's ``{"image_ids": [...], "detections": [{"boxes", "scores", "labels"}, ...]}``;
                anything else is ignored.
        """
        if not self.image_ids or not isinstance(outputs, Mapping):
            return
        wanted = set(self.image_ids)
        for image_id, detection in zip(
            outputs.get("image_ids", []), outputs.get("detections", []), strict=True
        ):
            if int(image_id) in wanted:
                self.detections[int(image_id)] = confident_detections(detection, self.score_threshold)

    def gather(self, trainer: lightning.Trainer) -> dict[int, dict[str, Tensor]]:
        """Every rank's detections of this epoch, merged, and a fresh start for the next epoch.

        A collective under distributed training: every rank must call it.
        """
        detections = _gather_on_every_rank(trainer, self.detections)
        self.detections = {}
        return detections

    def samples(
        self, datamodule: Any, detections: Mapping[int, Mapping[str, Tensor]]
    ) -> list[ValidationSample]:
        """The chosen images that have ``detections``, in id order, with their pixels and ground truth
        (read from disk on first use, then cached)."""
        samples = []
        for image_id in self.image_ids or []:
            if image_id not in detections:
                continue
            if image_id not in self._pixels:
                self._pixels[image_id] = _read_val_image(datamodule, image_id)
                self._ground_truth[image_id] = ground_truth_boxes(
                    datamodule.coco_gt("val"), image_id, datamodule.label_to_category_id
                )
            samples.append(
                ValidationSample(
                    image_id, self._pixels[image_id], detections[image_id], self._ground_truth[image_id]
                )
            )
        return samples


def labels_of(samples: Iterable[ValidationSample]) -> set[int]:
    """Every label predicted or annotated in ``samples``."""
    return {
        int(label)
        for sample in samples
        for boxes in (sample.predictions, sample.ground_truth)
        for label in boxes["labels"].tolist()
    }


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
