"""DETR's attention maps, captured with forward hooks, as probability maps over the original image.

As in the paper's figures: the last decoder layer's cross-attention (where each object query looks) and
the last encoder layer's self-attention at one pixel (which regions that pixel's feature attends to).
Outside :func:`capture_attention` the model runs its usual fast path: no weights, no hooks.

Shapes: ``B`` images, ``Q`` queries, ``h x w`` feature map of the padded batch (``S = h * w``),
``(h', w')`` its valid (unpadded) part for one image, ``(H_in, W_in)`` the image as fed to the model
(resized, before padding), ``(H, W)`` the original image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from detr_lightning.models.detr import DETR

Size = Sequence[int]  # (height, width) in pixels


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
    decoder_layer, encoder_layer = model.transformer.decoder.layers[-1], model.transformer.encoder.layers[-1]
    # (capture field, module whose outputs[1] it is, layer that must compute weights): BackboneWithPosition
    # returns (features, mask, pos), nn.MultiheadAttention (output, weights).
    watched = [("feature_mask", model.backbone, None)]
    if decoder:
        watched.append(("decoder_cross", decoder_layer.multihead_attn, decoder_layer))
    if encoder:
        watched.append(("encoder_self", encoder_layer.self_attn, encoder_layer))
    with ExitStack() as restore:
        for name, module, layer in watched:
            restore.enter_context(module.register_forward_hook(partial(_keep_weights, capture, name)))
            if layer is not None:
                restore.callback(setattr, layer, "need_weights", layer.need_weights)
                layer.need_weights = True
        yield capture


def _keep_weights(capture, name, module, inputs, outputs) -> None:
    setattr(capture, name, outputs[1].detach())


def valid_feature_size(feature_mask: Tensor) -> tuple[int, int]:
    """``(h', w')`` of one image's ``(h, w)`` feature mask (padding is bottom/right only)."""
    valid = ~feature_mask
    return int(valid.any(1).sum()), int(valid.any(0).sum())


def feature_maps_to_image(
    maps: Tensor, feature_mask: Tensor, input_size: Size, image_size: Size, stride: int
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
    return on_image / on_image.sum(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(on_image.dtype).tiny)


def _captured(capture: AttentionCapture, name: str, image_index: int) -> tuple[Tensor, Tensor]:
    """Image ``image_index``'s ``(h, w)`` feature mask and its captured ``name`` weights."""
    weights = getattr(capture, name)
    if weights is None or capture.feature_mask is None:
        part = name.split("_")[0]
        raise RuntimeError(f"no {part} attention captured: run the model in capture_attention({part}=True)")
    return capture.feature_mask[image_index], weights[image_index]


def decoder_attention_maps(
    capture: AttentionCapture,
    image_index: int,
    query_indices: Sequence[int] | Tensor,
    input_size: Size,
    image_size: Size,
) -> Tensor:
    """``(K, H, W)``: where each of the ``K`` given queries of image ``image_index`` looked."""
    feature_mask, cross = _captured(capture, "decoder_cross", image_index)  # (h, w), (Q, S)
    queries = torch.as_tensor(query_indices, dtype=torch.long, device=cross.device)
    maps = cross[queries].reshape(len(queries), *feature_mask.shape)  # (K, h, w)
    return feature_maps_to_image(maps, feature_mask, input_size, image_size, capture.stride)


def encoder_attention_map(
    capture: AttentionCapture, image_index: int, pixel_xy: Sequence[float], input_size: Size, image_size: Size
) -> Tensor:
    """``(H, W)``: the encoder self-attention of the feature cell under original-image pixel ``(x, y)``."""
    feature_mask, self_attention = _captured(capture, "encoder_self", image_index)  # (h, w), (S, S)
    row, col = feature_cell(pixel_xy, input_size, image_size, capture.stride, feature_mask)
    keys = self_attention[row * feature_mask.shape[1] + col].reshape(1, *feature_mask.shape)  # (1, h, w)
    return feature_maps_to_image(keys, feature_mask, input_size, image_size, capture.stride)[0]


def feature_cell(
    pixel_xy: Sequence[float], input_size: Size, image_size: Size, stride: int, feature_mask: Tensor
) -> tuple[int, int]:
    """``(row, column)`` of the valid feature cell holding original-image pixel ``(x, y)`` (clamped)."""
    height, width = int(image_size[0]), int(image_size[1])
    x = min(max(float(pixel_xy[0]), 0.0), width - 1e-3)
    y = min(max(float(pixel_xy[1]), 0.0), height - 1e-3)
    valid_h, valid_w = valid_feature_size(feature_mask)
    row = int(y * int(input_size[0]) / height) // stride
    col = int(x * int(input_size[1]) / width) // stride
    return min(row, valid_h - 1), min(col, valid_w - 1)
