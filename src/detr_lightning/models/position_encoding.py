"""Position encodings of the backbone feature map: fixed sine (all released models) or learned."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """The official 2-D sine encoding: ``num_pos_feats`` channels for y, then as many for x.

    Channel ``2k`` holds the sine and ``2k + 1`` the cosine of the same frequency
    ``temperature ** (2k / num_pos_feats)``; positions are 1-based cumulative counts of valid pixels,
    normalized to ``(0, 2 pi]`` by the last valid row/column (the official ``normalize=True``).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature

    def forward(self, mask: Tensor) -> Tensor:
        """``mask (B, h, w)`` bool, True on padding -> encoding ``(B, 2 * num_pos_feats, h, w)`` float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * (2 * math.pi)  # in (0, 2 pi]
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * (2 * math.pi)
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t  # (B, h, w, F)
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: a row and a column table of ``max_size`` entries each.

    Channels are x (column) first, then y, as in the official code; the mask is ignored, and feature
    maps larger than ``max_size`` in either direction are an error.
    """

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """``mask (B, h, w)`` -> encoding ``(B, 2 * num_pos_feats, h, w)``."""
        batch, h, w = mask.shape
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(
                f"learned position encoding holds {max_size}x{max_size} positions but the feature map is "
                f"{h}x{w}; use smaller images or the sine encoding"
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # (w, F)
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # (h, F)
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1)


PositionEncoding = PositionEmbeddingSine | PositionEmbeddingLearned


def build_position_encoding(kind: str, hidden_dim: int) -> PositionEncoding:
    """``kind`` is ``"sine"`` or ``"learned"``; the encoding has ``hidden_dim`` channels."""
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"unknown position encoding {kind!r}; choose 'sine' or 'learned'")
