"""Turn DETR outputs into per-image detections in pixels."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Softmax over all classes, drop "no object", scale boxes to each image's size.

    No threshold and no NMS: every query gives one detection with its best real class, as the
    official evaluation does; filter by score for display.
    """

    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Convert a batch of outputs.

        Args:
            outputs: ``pred_logits (B, Q, C + 1)`` and ``pred_boxes (B, Q, 4)`` normalized cxcywh.
            target_sizes: ``(B, 2)`` image ``(height, width)`` to scale to (the original size for evaluation).

        Returns:
            ``B`` dicts with ``scores (Q,)``, ``labels (Q,)`` int64 and ``boxes (Q, 4)`` absolute xyxy.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"{len(logits)} outputs but {len(target_sizes)} target sizes")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        heights, widths = target_sizes.unbind(1)
        scale = torch.stack([widths, heights, widths, heights], dim=1).to(boxes.dtype)  # (B, 4)
        boxes = box_convert(boxes, "cxcywh", "xyxy") * scale[:, None, :]
        return [
            {"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes, strict=True)
        ]
