"""Batching dataset items: images padded bottom/right to the largest one, plus the padding mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from detr_lightning.batching import pad_images_to_batch


class Batch(NamedTuple):
    """A training/evaluation batch as the model and the LightningModule expect it.

    Attributes:
        images: ``(B, 3, H_max, W_max)`` float32, normalised, zero-padded at the bottom/right.
        mask: ``(B, H_max, W_max)`` bool, ``True`` on padding.
        targets: ``B`` target dicts (see `detr_lightning.data.coco.CocoDetection`); boxes are normalised
            by each image's unpadded size.
    """

    images: Tensor
    mask: Tensor
    targets: list[dict[str, Tensor]]


def collate_detection(samples: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> Batch:
    """Collate ``(image (3, H_i, W_i), target)`` pairs into a `Batch`."""
    images, mask = pad_images_to_batch([image for image, _ in samples])
    return Batch(images=images, mask=mask, targets=[target for _, target in samples])
