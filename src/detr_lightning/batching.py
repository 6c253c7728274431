"""Batching of differently sized images: zero padding at the bottom/right plus a padding mask.

Shared by the data pipeline (collate) and the model (which also accepts a plain list of images),
so it lives below both of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_images_to_batch(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad a list of ``(C, H_i, W_i)`` images into one batch, as the official DETR does.

    Args:
        images: ``B`` tensors of shape ``(C, H_i, W_i)``, same ``C``, dtype and device.

    Returns:
        ``images``: ``(B, C, H_max, W_max)``, each image copied to the top-left corner, zeros elsewhere
        (zero *after* normalization, as in the official code).
        ``mask``: ``(B, H_max, W_max)`` bool, ``True`` on padded pixels.
    """
    if len(images) == 0:
        raise ValueError("pad_images_to_batch needs at least one image")
    channels = images[0].shape[0]
    max_h = max(int(img.shape[-2]) for img in images)
    max_w = max(int(img.shape[-1]) for img in images)
    batch = images[0].new_zeros((len(images), channels, max_h, max_w))
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != channels:
            raise ValueError(
                f"image {i} has shape {tuple(img.shape)}; every image must be (C={channels}, H, W)"
            )
        h, w = img.shape[-2:]
        batch[i, :, :h, :w].copy_(img)
        mask[i, :h, :w] = False
    return batch, mask
