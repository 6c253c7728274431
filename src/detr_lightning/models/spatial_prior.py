"""A Gaussian spatial prior per object query (``model.spatial_prior=gaussian``; not in the official model).

Each query owns a learned anchor ``(cx, cy)`` and spread ``(sx, sy)`` in image-relative units. As in SMCA
(Gao et al., ICCV 2021), the query's decoder cross-attention gets the additive bias
``-((x - cx)^2 / (2 sx^2) + (y - cy)^2 / (2 sy^2))`` over the feature-map positions of the unpadded image
(``-inf`` on padding), and its box centre is read relative to the anchor:
``box = sigmoid(bbox_embed(hs) + (logit(cx), logit(cy), 0, 0))``.

Why: vanilla DETR must first learn where to look before its box loss can reward looking there; trained
from scratch on a small set it stays on the plateau where every query predicts a fixed box (see
experiments/convergence). The anchors do not depend on the image, so inference costs what DETR's does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: ``model.spatial_prior`` choices: ``none`` is the official model.
SPATIAL_PRIORS = ("none", "gaussian")


class GaussianSpatialPrior(nn.Module):
    """Learned anchors and spreads of ``num_anchors`` queries (all query groups, group 0 first).

    Args:
        num_anchors: ``Q * K`` (queries times Group DETR groups).
        init_sigma: the starting spread, a fraction of the image side (0.2: about a fifth of the image).
    """

    def __init__(self, num_anchors: int, init_sigma: float = 0.2) -> None:
        super().__init__()
        if not 0 < init_sigma:
            raise ValueError(f"spatial_prior_sigma={init_sigma} must be positive")
        # Anchors start uniformly over the image (as DAB-DETR's random anchors), stored as logits.
        self.anchor_logits = nn.Parameter(torch.logit(torch.rand(num_anchors, 2), eps=1e-5))
        self.log_sigma = nn.Parameter(torch.full((num_anchors, 2), math.log(init_sigma)))

    def anchors(self, num_queries: int) -> Tensor:
        """``(num_queries, 2)`` anchor centres ``(cx, cy)`` in ``(0, 1)`` of the first ``num_queries``."""
        return self.anchor_logits[:num_queries].sigmoid()

    def box_offset(self, num_queries: int) -> Tensor:
        """``(num_queries, 4)``: what is added to the box logits (``logit`` of the anchor; 0 for w, h)."""
        centre_logits = self.anchor_logits[:num_queries]
        return torch.cat([centre_logits, torch.zeros_like(centre_logits)], dim=-1)

    def attention_bias(self, feature_mask: Tensor, num_queries: int, num_heads: int) -> Tensor:
        """The cross-attention bias of the first ``num_queries`` queries, the same for all ``num_heads``:
        ``feature_mask (B, h, w)`` True on padding (bottom and right, as the batching pads) ->
        ``(B * num_heads, Q, h * w)`` float, 0 at the anchor, ``-inf`` on padded positions."""
        batch, height, width = feature_mask.shape
        valid = ~feature_mask
        valid_rows = valid[:, :, 0].sum(dim=1).clamp(min=1).to(self.anchor_logits.dtype)  # (B,)
        valid_cols = valid[:, 0, :].sum(dim=1).clamp(min=1).to(self.anchor_logits.dtype)  # (B,)
        rows = torch.arange(height, device=feature_mask.device, dtype=self.anchor_logits.dtype)
        cols = torch.arange(width, device=feature_mask.device, dtype=self.anchor_logits.dtype)
        y = (rows[None, :] + 0.5) / valid_rows[:, None]  # (B, h) centres of the feature cells
        x = (cols[None, :] + 0.5) / valid_cols[:, None]  # (B, w)
        centre = self.anchors(num_queries)  # (Q, 2)
        sigma = self.log_sigma[:num_queries].exp()  # (Q, 2)
        dx = (x[:, None, None, :] - centre[None, :, 0, None, None]) / sigma[None, :, 0, None, None]
        dy = (y[:, None, :, None] - centre[None, :, 1, None, None]) / sigma[None, :, 1, None, None]
        bias = (-0.5 * (dx.square() + dy.square())).flatten(2)  # (B, Q, h * w)
        bias = bias.masked_fill(feature_mask.flatten(1)[:, None, :], float("-inf"))
        return bias.repeat_interleave(num_heads, dim=0)
