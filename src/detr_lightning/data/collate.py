"""Batching dataset items: images padded bottom/right to the largest one (or to its shape bucket), plus the
padding mask."""

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


def collate_detection(
    samples: Sequence[tuple[Tensor, dict[str, Tensor]]], pad_to_multiple: int | None = None
) -> Batch:
    """Collate ``(image (3, H_i, W_i), target)`` pairs into a `Batch`.

    ``pad_to_multiple``: round the batch's ``(H, W)`` up to multiples of it (shape buckets, see
    `detr_lightning.batching.pad_images_to_batch`); ``None`` pads to the largest image only.
    """
    images, mask = pad_images_to_batch([image for image, _ in samples], size_multiple=pad_to_multiple)
    return Batch(images=images, mask=mask, targets=[target for _, target in samples])
