"""Hungarian matching of predictions to ground-truth boxes (one query per object)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

#: Per image: (matched query indices ascending, matched target indices), both int64.
Matching = list[tuple[Tensor, Tensor]]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment between queries and targets, per image.

    The cost of assigning query ``q`` to target ``t`` is
    ``cost_bbox * L1(box_q, box_t) + cost_class * class_cost(q, t) + cost_giou * -GIoU(box_q, box_t)``.
    The class cost follows the classification loss:

    - ``softmax`` (official, for ``class_loss=ce``): ``-p_q(class_t)``, the probability from a softmax over
      all classes including "no object".
    - ``focal`` (Deformable DETR, for ``focal`` / ``varifocal``): with ``p = sigmoid(logit_q[class_t])``,
      ``alpha * (1 - p) ** gamma * -log(p + eps) - (1 - alpha) * p ** gamma * -log(1 - p + eps)``,
      the focal loss of calling ``q`` positive minus that of calling it negative. The "no object" logit
      is not used.

    Args:
        cost_class: weight of the classification term.
        cost_bbox: weight of the L1 distance between normalized cxcywh boxes.
        cost_giou: weight of the generalized-IoU term.
        class_cost: ``softmax`` | ``focal``.
        focal_alpha, focal_gamma: the focal cost's ``alpha`` and ``gamma``.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError(
                "HungarianMatcher: at least one of cost_class, cost_bbox, cost_giou must be non-zero"
            )
        if class_cost not in ("softmax", "focal"):
            raise ValueError(f"HungarianMatcher: class_cost={class_cost!r}; choose softmax or focal")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_cost = class_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: Sequence[dict[str, Tensor]]
    ) -> Tensor:
        """Costs of every query against every target of the batch: ``pred_logits (..., B, Q, C + 1)``,
        ``pred_boxes (..., B, Q, 4)`` normalized cxcywh (leading dims, e.g. decoder layers, are independent)
        and ``B`` targets with ``labels (T_i,)``, ``boxes (T_i, 4)`` -> ``(..., B, Q, T)`` with
        ``T = sum(T_i)``: image ``i``'s own block is its slice of ``T``."""
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(pred_boxes.dtype)
        if self.class_cost == "focal":
            cost_class = self.focal_class_cost(pred_logits[..., target_labels])  # (..., B, Q, T)
        else:
            prob = pred_logits.softmax(-1)  # (..., B, Q, C + 1)
            cost_class = -prob[..., target_labels]  # (..., B, Q, T)
        cost_bbox = torch.cdist(pred_boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
        )
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        # Non-finite predictions (a diverging run) must not crash the solver; they just match last.
        return torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)

    def focal_class_cost(self, logits: Tensor) -> Tensor:
        """Deformable DETR's focal class cost of each logit (elementwise)."""
        alpha, gamma, eps = self.focal_alpha, self.focal_gamma, 1e-8
        prob = logits.sigmoid()
        positive = alpha * (1 - prob) ** gamma * -(prob + eps).log()
        negative = (1 - alpha) * prob**gamma * -(1 - prob + eps).log()
        return positive - negative

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> Matching:
        """Match one set of predictions (``pred_logits (B, Q, C+1)``, ``pred_boxes (B, Q, 4)``)."""
        return self.match_layers(outputs["pred_logits"][None], outputs["pred_boxes"][None], targets)[0]

    @torch.no_grad()
    def match_layers(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: Sequence[dict[str, Tensor]]
    ) -> list[Matching]:
        """Match ``L`` layers' predictions, ``pred_logits (L, B, Q, C + 1)`` and ``pred_boxes (L, B, Q, 4)``,
        at once (one device-to-host copy for all of them): ``L`` matchings."""
        num_layers, batch = pred_logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [[(empty, empty) for _ in range(batch)] for _ in range(num_layers)]
        # Costs in float32 even under mixed precision: half-precision GIoU/softmax can give NaN or ties.
        with torch.autocast(pred_logits.device.type, enabled=False):
            cost = self.cost_matrix(pred_logits.float(), pred_boxes.float(), targets)
        cost = cost.cpu()  # (L, B, Q, T): one device-to-host copy for every layer
        return [
            [_assign(block[image]) for image, block in enumerate(layer_cost.split(sizes, dim=-1))]
            for layer_cost in cost
        ]


def _assign(cost: Tensor) -> tuple[Tensor, Tensor]:
    """The optimal assignment of one image's ``(Q, T_i)`` costs: ``(query_idx ascending, target_idx)``."""
    query_idx, target_idx = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64)
