"""Batching of differently sized images: zero padding at the bottom/right plus a padding mask.

Shared by the data pipeline (collate) and the model (which also accepts a plain list of images),
so it lives below both of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def padded_size(height: int, width: int, multiple: int | None) -> tuple[int, int]:
    """``(height, width)`` rounded up to multiples of ``multiple`` (unchanged for ``None``): a shape bucket.

    Example: ``(800, 1066)`` with ``multiple=128`` gives ``(896, 1152)``.
    """
    if multiple is None:
        return height, width
    if multiple <= 0:
        raise ValueError(f"the padding multiple must be positive (got {multiple})")
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_images_to_batch(images: Sequence[Tensor], size_multiple: int | None = None) -> tuple[Tensor, Tensor]:
    """Pad a list of ``(C, H_i, W_i)`` images into one batch, as the official DETR does.

    Args:
        images: ``B`` tensors of shape ``(C, H_i, W_i)``, same ``C``, dtype and device.
        size_multiple: if set, the batch's height and width are rounded up to multiples of it (shape
            buckets: a bounded set of batch shapes for ``torch.compile`` and CUDA graphs); the extra
            pixels are padding like any other. ``None``: the largest image's size, as officially.

    Returns:
        ``images``: ``(B, C, H_pad, W_pad)``, each image copied to the top-left corner, zeros elsewhere
        (zero *after* normalization, as in the official code); ``H_pad, W_pad`` are the largest image's
        height and width, rounded up to ``size_multiple`` when it is set.
        ``mask``: ``(B, H_pad, W_pad)`` bool, ``True`` on padded pixels.
    """
    if len(images) == 0:
        raise ValueError("pad_images_to_batch needs at least one image")
    channels = images[0].shape[0]
    max_h, max_w = padded_size(
        max(int(img.shape[-2]) for img in images), max(int(img.shape[-1]) for img in images), size_multiple
    )
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
