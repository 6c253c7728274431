"""Turn DETR outputs into per-image detections in pixels."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Class scores, labels and boxes scaled to each image's size; no threshold, no NMS.

    Two scorings, following the classification loss the model was trained with:

    - ``softmax`` (official, ``class_loss=ce``): softmax over all classes, drop "no object"; every query
      gives one detection with its best real class, as the official evaluation does.
    - ``sigmoid`` (``focal`` / ``varifocal``): a sigmoid score per real class ("no object" unused); the
      ``top_k`` best (query, class) pairs of the ``Q x C`` scores are the detections, as in Deformable
      DETR, so a query may give several. ``top_k`` None: the number of queries.
    """

    def __init__(self, score: str = "softmax", top_k: int | None = None) -> None:
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"PostProcess: score={score!r}; choose softmax or sigmoid")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"PostProcess: top_k={top_k} must be positive (or None for the query count)")
        self.score = score
        self.top_k = top_k

    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``pred_logits (B, Q, C + 1)`` and ``pred_boxes (B, Q, 4)`` (normalized cxcywh), scaled to
        ``target_sizes (B, 2)`` ``(height, width)`` -> ``B`` dicts with ``scores (N,)``, ``labels (N,)``,
        ``boxes (N, 4)`` absolute xyxy and ``queries (N,)``, the query of each detection. ``N = Q`` in
        query order for ``softmax``; ``N = min(top_k, Q x C)`` best first for ``sigmoid``."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"{len(logits)} outputs but {len(target_sizes)} target sizes")
        batch, num_queries, num_slots = logits.shape
        if self.score == "sigmoid":
            num_classes = num_slots - 1  # the "no object" logit is unused
            prob = logits[..., :num_classes].sigmoid().flatten(1)  # (B, Q * C), query-major
            k = min(self.top_k or num_queries, prob.shape[1])
            scores, flat = prob.topk(k, dim=1)  # (B, k), best first
            queries = torch.div(flat, num_classes, rounding_mode="floor")
            labels = flat % num_classes
            boxes = boxes.gather(1, queries[..., None].expand(-1, -1, 4))  # (B, k, 4)
        else:
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)
            queries = torch.arange(num_queries, device=logits.device).expand(batch, -1)
        heights, widths = target_sizes.unbind(1)
        scale = torch.stack([widths, heights, widths, heights], dim=1).to(boxes.dtype)  # (B, 4)
        boxes = box_convert(boxes, "cxcywh", "xyxy") * scale[:, None, :]
        return [
            {"scores": s, "labels": lab, "boxes": b, "queries": q}
            for s, lab, b, q in zip(scores, labels, boxes, queries, strict=True)
        ]
