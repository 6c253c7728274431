"""DETR's attention maps, captured with forward hooks, as probability maps over the original image.

Two views, as in the paper's figures and the official attention notebook: the last decoder layer's
cross-attention (where each object query looks) and the last encoder layer's self-attention at one
pixel (which regions that pixel's feature attends to).

Capture is opt-in and leaves no trace: :func:`capture_attention` sets ``need_weights`` and hooks only
for the duration of a ``with`` block, so a model outside it runs its usual fast path.

Shapes: ``B`` images, ``Q`` queries, ``h x w`` feature map of the padded batch (``S = h * w``),
``(h', w')`` its valid (unpadded) part for one image, ``(H_in, W_in)`` the image as fed to the model
(resized, before padding), ``(H, W)`` the original image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from detr_lightning.models.detr import DETR


@dataclass
class AttentionCapture:
    """What one forward pass inside :func:`capture_attention` recorded (``None`` if not captured).

    Attributes:
        stride: input pixels per feature cell (32, or 16 for DC5 / layer3 backbones).
        feature_mask: ``(B, h, w)`` bool, True on padding, the mask the transformer saw.
        decoder_cross: ``(B, Q, S)`` last decoder layer's cross-attention, heads averaged; each row sums
            to one over the unpadded positions.
        encoder_self: ``(B, S, S)`` last encoder layer's self-attention, heads averaged (query, key).
    """

    stride: int
    feature_mask: Tensor | None = None
    decoder_cross: Tensor | None = None
    encoder_self: Tensor | None = None


@contextmanager
def capture_attention(model: DETR, decoder: bool = True, encoder: bool = True) -> Iterator[AttentionCapture]:
    """Record the attention weights of the next forward pass(es) of ``model`` (the last one wins).

    Only the last decoder layer (``decoder``) and the last encoder layer (``encoder``) compute weights;
    both they and the hooks are restored on exit, even on error. Weights stay on the model's device.
    """
    capture = AttentionCapture(stride=int(model.backbone[0].stride))
    decoder_layer = model.transformer.decoder.layers[-1]
    encoder_layer = model.transformer.encoder.layers[-1]
    layers = ([decoder_layer] if decoder else []) + ([encoder_layer] if encoder else [])
    previous = [layer.need_weights for layer in layers]

    def keep(name: str):
        # BackboneWithPosition returns (features, mask, pos), nn.MultiheadAttention (output, weights).
        def hook(module, inputs, outputs) -> None:
            setattr(capture, name, outputs[1].detach())

        return hook

    handles = [model.backbone.register_forward_hook(keep("feature_mask"))]
    try:
        if decoder:
            handles.append(decoder_layer.multihead_attn.register_forward_hook(keep("decoder_cross")))
        if encoder:
            handles.append(encoder_layer.self_attn.register_forward_hook(keep("encoder_self")))
        for layer in layers:
            layer.need_weights = True
        yield capture
    finally:
        for handle in handles:
            handle.remove()
        for layer, value in zip(layers, previous, strict=True):
            layer.need_weights = value


def valid_feature_size(feature_mask: Tensor) -> tuple[int, int]:
    """``(h', w')`` of one image's ``(h, w)`` feature mask (padding is bottom/right only)."""
    valid = ~feature_mask
    return int(valid.any(1).sum()), int(valid.any(0).sum())


def feature_maps_to_image(
    maps: Tensor, feature_mask: Tensor, input_size: Sequence[int], image_size: Sequence[int], stride: int
) -> Tensor:
    """``(K, h, w)`` attention over the padded feature grid -> ``(K, H, W)`` float32 maps summing to one.

    The valid ``(h', w')`` block is upsampled (bilinear, cell centres at ``(i + 0.5) * stride``) to input
    pixels, cut to ``input_size`` ``(H_in, W_in)``, then resized to ``image_size`` ``(H, W)``.
    """
    valid_h, valid_w = valid_feature_size(feature_mask)
    cells = maps[:, :valid_h, :valid_w].float()[None]  # (1, K, h', w')
    in_pixels = F.interpolate(cells, size=(valid_h * stride, valid_w * stride), mode="bilinear")
    in_pixels = in_pixels[..., : int(input_size[0]), : int(input_size[1])]
    on_image = F.interpolate(in_pixels, size=(int(image_size[0]), int(image_size[1])), mode="bilinear")[0]
    on_image = on_image.clamp_min(0)
    total = on_image.sum(dim=(1, 2), keepdim=True)
    return on_image / total.clamp_min(torch.finfo(on_image.dtype).tiny)


def decoder_attention_maps(
    capture: AttentionCapture,
    image_index: int,
    query_indices: Sequence[int] | Tensor,
    input_size: Sequence[int],
    image_size: Sequence[int],
) -> Tensor:
    """``(K, H, W)``: where each of the ``K`` given queries of image ``image_index`` looked."""
    if capture.decoder_cross is None or capture.feature_mask is None:
        raise RuntimeError("no decoder attention captured: run the model in capture_attention(decoder=True)")
    feature_mask = capture.feature_mask[image_index]  # (h, w)
    queries = torch.as_tensor(query_indices, dtype=torch.long, device=capture.decoder_cross.device)
    maps = capture.decoder_cross[image_index, queries].reshape(len(queries), *feature_mask.shape)  # (K, h, w)
    return feature_maps_to_image(maps, feature_mask, input_size, image_size, capture.stride)


def encoder_attention_map(
    capture: AttentionCapture,
    image_index: int,
    pixel_xy: Sequence[float],
    input_size: Sequence[int],
    image_size: Sequence[int],
) -> Tensor:
    """``(H, W)``: the encoder self-attention of the feature cell under original-image pixel ``(x, y)``."""
    if capture.encoder_self is None or capture.feature_mask is None:
        raise RuntimeError("no encoder attention captured: run the model in capture_attention(encoder=True)")
    feature_mask = capture.feature_mask[image_index]  # (h, w)
    row, col = feature_cell(pixel_xy, input_size, image_size, capture.stride, feature_mask)
    query = row * feature_mask.shape[1] + col
    keys = capture.encoder_self[image_index, query].reshape(1, *feature_mask.shape)  # (1, h, w)
    return feature_maps_to_image(keys, feature_mask, input_size, image_size, capture.stride)[0]


def feature_cell(
    pixel_xy: Sequence[float],
    input_size: Sequence[int],
    image_size: Sequence[int],
    stride: int,
    feature_mask: Tensor,
) -> tuple[int, int]:
    """``(row, column)`` of the valid feature cell holding original-image pixel ``(x, y)`` (clamped)."""
    height, width = int(image_size[0]), int(image_size[1])
    x = min(max(float(pixel_xy[0]), 0.0), width - 1e-3)
    y = min(max(float(pixel_xy[1]), 0.0), height - 1e-3)
    valid_h, valid_w = valid_feature_size(feature_mask)
    row = int(y * int(input_size[0]) / height) // stride
    col = int(x * int(input_size[1]) / width) // stride
    return min(row, valid_h - 1), min(col, valid_w - 1)
