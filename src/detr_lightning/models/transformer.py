"""The DETR encoder-decoder transformer (sequence-first layout, as the official code).

Shapes in this file: ``S = h * w`` memory tokens, ``Q`` object queries, ``B`` images, ``D`` model width.
Positional encodings are added to queries and keys at every layer, never to values.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The official code also lists GLU, which cannot run there: it halves the width that ``linear2`` expects.
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}

# Attention modules are called with ``need_weights`` False, so PyTorch takes its scaled-dot-product kernel,
# unless a layer's ``need_weights`` asks for the explicit path that also returns head-averaged weights
# (forward hooks on the module then see them: ``attention.capture_attention``).


def _with_pos(tensor: Tensor, pos: Tensor | None) -> Tensor:
    return tensor if pos is None else tensor + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention + feed-forward block; post-norm by default, pre-norm with ``normalize_before``."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.normalize_before = normalize_before
        #: Set to True (e.g. by an attention-map tool) to make ``self_attn`` also return its weights.
        self.need_weights = False

    def _self_attention(self, x: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        q = k = _with_pos(x, pos)
        attended = self.self_attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=self.need_weights)
        return self.dropout1(attended[0])

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, src_key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        """``src (S, B, D)``, ``src_key_padding_mask (B, S)`` (True = padding), ``pos (S, B, D)`` ->
        ``(S, B, D)``."""
        if self.normalize_before:
            src = src + self._self_attention(self.norm1(src), src_key_padding_mask, pos)
            return src + self._feed_forward(self.norm2(src))
        src = self.norm1(src + self._self_attention(src, src_key_padding_mask, pos))
        return self.norm2(src + self._feed_forward(src))


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the image memory, feed-forward."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.normalize_before = normalize_before
        #: Set to True to make ``multihead_attn`` (cross-attention) also return its weights.
        self.need_weights = False

    def _self_attention(self, x: Tensor, query_pos: Tensor | None, attn_mask: Tensor | None) -> Tensor:
        q = k = _with_pos(x, query_pos)
        return self.dropout1(self.self_attn(q, k, x, attn_mask=attn_mask, need_weights=False)[0])

    def _cross_attention(
        self,
        x: Tensor,
        memory: Tensor,
        key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
        attn_bias: Tensor | None,
    ) -> Tensor:
        attended = self.multihead_attn(
            _with_pos(x, query_pos),
            _with_pos(memory, pos),
            memory,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_bias,
            # torch.export (2.14) mis-strides the fused path given a float mask and a symbolic batch.
            need_weights=self.need_weights or (attn_bias is not None and torch.compiler.is_exporting()),
        )
        return self.dropout2(attended[0])

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
        self_attn_mask: Tensor | None = None,
        cross_attn_bias: Tensor | None = None,
    ) -> Tensor:
        """``tgt (Q, B, D)``, ``memory (S, B, D)``, ``memory_key_padding_mask (B, S)``, ``pos (S, B, D)``,
        ``query_pos (Q, B, D)``, optional ``self_attn_mask (Q, Q)`` (True = blocked) and
        ``cross_attn_bias (B * nhead, Q, S)`` (float, added to the cross-attention logits)
        -> ``(Q, B, D)``."""
        cross = (memory, memory_key_padding_mask, pos, query_pos, cross_attn_bias)
        if self.normalize_before:
            tgt = tgt + self._self_attention(self.norm1(tgt), query_pos, self_attn_mask)
            tgt = tgt + self._cross_attention(self.norm2(tgt), *cross)
            return tgt + self._feed_forward(self.norm3(tgt))
        tgt = self.norm1(tgt + self._self_attention(tgt, query_pos, self_attn_mask))
        tgt = self.norm2(tgt + self._cross_attention(tgt, *cross))
        return self.norm3(tgt + self._feed_forward(tgt))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, with a final LayerNorm only in the pre-norm variant."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src: Tensor, src_key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        """``(S, B, D)`` -> ``(S, B, D)``."""
        for layer in self.layers:
            src = layer(src, src_key_padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers; every layer's output goes through the shared final ``norm``."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
        self_attn_mask: Tensor | None = None,
        cross_attn_bias: Tensor | None = None,
    ) -> Tensor:
        """Returns the normed output of every layer, ``(L, Q, B, D)``.

        A ``cross_attn_bias`` holds ``-inf`` on padding itself, so it replaces
        ``memory_key_padding_mask``; it is cast to the memory's dtype once for all layers."""
        if cross_attn_bias is not None:
            cross_attn_bias = cross_attn_bias.to(memory.dtype)
            memory_key_padding_mask = None
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, self_attn_mask, cross_attn_bias)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """Encoder-decoder of DETR. Every size is a constructor argument, so tiny test models exist."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        layer = (d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(TransformerEncoderLayer(*layer), num_encoder_layers, encoder_norm)
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(*layer), num_decoder_layers, nn.LayerNorm(d_model)
        )
        self.d_model = d_model
        self.nhead = nhead
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)

    def forward(
        self,
        src: Tensor,
        mask: Tensor,
        query_embed: Tensor,
        pos_embed: Tensor,
        self_attn_mask: Tensor | None = None,
        cross_attn_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode the feature map and decode the object queries.

        Args:
            src: projected features ``(B, D, h, w)``.
            mask: ``(B, h, w)`` bool, True on padding.
            query_embed: ``(Q, D)`` learned query positions.
            pos_embed: ``(B, D, h, w)``.
            self_attn_mask: optional ``(Q, Q)`` bool mask for the decoder self-attention (True = blocked).
            cross_attn_bias: optional ``(B * nhead, Q, h * w)`` float bias of the decoder cross-attention
                logits, ``-inf`` on padding (a spatial prior: see ``spatial_prior.py``).

        Returns:
            ``hs (L, B, Q, D)``, the decoder output of every layer, and ``memory (B, D, h, w)``.
        """
        batch, channels, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # (S, B, D)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)  # (S, B, D)
        query_pos = query_embed.unsqueeze(1).expand(-1, batch, -1)  # (Q, B, D)
        mask = mask.flatten(1)  # (B, S)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        tgt = torch.zeros_like(query_pos)  # (Q, B, D); the decoder returns (L, Q, B, D)
        hs = self.decoder(tgt, memory, mask, pos_embed, query_pos, self_attn_mask, cross_attn_bias)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(batch, channels, h, w)
