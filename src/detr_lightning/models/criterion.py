"""DETR's set criterion: Hungarian matching, then classification (softmax cross-entropy, or a sigmoid
focal / varifocal loss) and box losses per decoder layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from detr_lightning.models.matcher import HungarianMatcher, Matching

#: Classification losses and the class scores they train: ``softmax`` over the ``C + 1`` logits, or an
#: independent ``sigmoid`` per real class (the "no object" logit is then unused). The matcher's class
#: cost and the post-processing follow the score.
CLASS_LOSS_SCORES = {"ce": "softmax", "focal": "sigmoid", "varifocal": "sigmoid"}


def class_score(class_loss: str) -> str:
    """``softmax`` or ``sigmoid``: how ``class_loss`` turns logits into class scores."""
    if class_loss not in CLASS_LOSS_SCORES:
        raise ValueError(
            f"loss.class_loss={class_loss!r} is not a classification loss; choose one of "
            f"{', '.join(CLASS_LOSS_SCORES)}"
        )
    return CLASS_LOSS_SCORES[class_loss]


def prior_class_bias(prior_prob: float) -> float:
    """The class-logit bias that makes every sigmoid score start at ``prior_prob`` (focal-loss init)."""
    return -math.log((1 - prior_prob) / prior_prob)


def paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` (``(N, 4)`` xyxy each) -> ``(N,)``."""
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(1)
    return intersection / (area1 + area2 - intersection).clamp(min=1e-12)


def build_weight_dict(
    num_decoder_layers: int,
    aux_loss: bool = True,
    ce_loss_coef: float = 1.0,
    bbox_loss_coef: float = 5.0,
    giou_loss_coef: float = 2.0,
) -> dict[str, float]:
    """The official weight dict: the three weighted losses, repeated with ``_i`` for each aux layer."""
    base = {"loss_ce": ce_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    aux_layers = range(num_decoder_layers - 1) if aux_loss else ()
    return base | {f"{key}_{layer}": value for layer in aux_layers for key, value in base.items()}


def count_target_boxes(
    targets: Sequence[dict[str, Tensor]], device: torch.device, across_processes: bool = True
) -> Tensor:
    """Average number of target boxes per process, at least 1: the box losses' normalizer, a 0-dim tensor
    (no host sync). Summed over all processes when torch.distributed runs and ``across_processes``: every
    GPU counts, one loss scale. Evaluation passes False: its shards may differ in their number of batches
    (every image evaluated once), and a collective that some rank never reaches would hang them all.
    """
    num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    world_size = 1
    if across_processes and dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        world_size = dist.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1)


def split_query_groups(stacked: Tensor, num_groups: int) -> Tensor:
    """``(L, B, K * Q, X)`` -> ``(L * K, B, Q, X)``, ordered layer-major (index ``layer * K + group``)."""
    if num_groups == 1:
        return stacked
    layers, batch, queries, features = stacked.shape
    grouped = stacked.view(layers, batch, num_groups, queries // num_groups, features).transpose(1, 2)
    return grouped.reshape(layers * num_groups, batch, queries // num_groups, features)


def matched_indices(matching: Matching, image_offsets: Tensor, problem: int = 0) -> Tensor:
    """``(4, M)`` int64 on the CPU: ``problem``, image, query and batch-wide target index of every matched
    pair (``image_offsets[i]``: where image ``i``'s targets start); one tensor, so one host-to-device copy."""
    image = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(matching)])
    query = torch.cat([query for query, _ in matching])
    target = torch.cat([target + image_offsets[i] for i, (_, target) in enumerate(matching)])
    return torch.stack([torch.full_like(image, problem), image, query, target])


class SetCriterion(nn.Module):
    """The official DETR loss, with the official log keys.

    For the last decoder layer it returns ``loss_ce``, ``class_error``, ``loss_bbox``, ``loss_giou``,
    ``cardinality_error``; for each aux layer ``i`` the same without ``class_error``, suffixed ``_i``.
    Every aux layer is matched again on its own predictions. Values are unweighted; use
    :meth:`weighted_total` for the training loss.

    ``loss_ce`` is the classification loss, whichever ``class_loss`` computes it:

    - ``ce`` (official): softmax cross-entropy over the ``C + 1`` logits, unmatched queries labelled
      "no object" and down-weighted by ``eos_coef``; the weighted mean over all queries.
    - ``focal``: sigmoid focal loss over the ``C`` real classes, one-hot on a matched query's class and
      all zeros for an unmatched query; summed, divided by the number of target boxes (Deformable DETR).
    - ``varifocal`` (VarifocalNet / RT-DETR): binary cross-entropy towards the (detached) IoU of a matched
      query's box at its class and 0 elsewhere, weighted by ``varifocal_alpha * p ** focal_gamma`` on
      negatives (``p`` the detached score) and by the target IoU on positives; normalized as ``focal``.

    With a sigmoid loss the class head keeps its ``C + 1`` outputs, so checkpoints load either way; the
    "no object" logit (index ``num_classes``) gets no loss, no gradient and no score. ``class_error`` and
    ``cardinality_error`` describe group 0 of the last layer. ``matcher``'s ``class_cost`` should follow
    the loss; losses absent from ``weight_dict`` (see :func:`build_weight_dict`) are logs; ``focal_alpha``
    weights the positives of the focal loss (negatives get ``1 - focal_alpha``).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        class_loss: str = "ce",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        varifocal_alpha: float = 0.75,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.class_loss = class_loss
        self.score = class_score(class_loss)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.varifocal_alpha = varifocal_alpha
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(
        self, outputs: dict, targets: Sequence[dict[str, Tensor]], across_processes: bool = True
    ) -> dict[str, Tensor]:
        """The loss dict, 0-dim tensors in the official key order, of the model's ``outputs``
        (``pred_logits (B, Q, C+1)``, ``pred_boxes (B, Q, 4)``, optional ``aux_outputs``) against ``B``
        ``targets`` (``labels (T_i,)`` int64, ``boxes (T_i, 4)`` normalized cxcywh).

        With ``outputs["num_groups"] = K`` (Group DETR training) the query dimension holds ``K`` groups of
        ``Q / K`` queries, each matched on its own, their losses summed.
        """
        layers = [outputs] + list(outputs.get("aux_outputs", []))
        num_groups = int(outputs.get("num_groups", 1))
        # (L, B, K * Q, ...) -> (L * K, B, Q, ...): every (layer, query group) is its own matching problem.
        logits = split_query_groups(torch.stack([layer["pred_logits"] for layer in layers]), num_groups)
        boxes = split_query_groups(torch.stack([layer["pred_boxes"] for layer in layers]), num_groups)
        matchings = self.matcher.match_layers(logits, boxes, targets)
        device = outputs["pred_logits"].device
        num_boxes = count_target_boxes(targets, device, across_processes)
        sizes = [len(t["labels"]) for t in targets]
        all_labels = torch.cat([t["labels"] for t in targets]).to(device)  # (T,)
        all_boxes = torch.cat([t["boxes"] for t in targets]).to(device)  # (T, 4)
        image_offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        per_matching = [matched_indices(m, image_offsets, p) for p, m in enumerate(matchings)]
        pairs = torch.cat(per_matching, dim=1).to(device)  # (4, M), one host-to-device copy
        per_problem = self.problem_losses(logits, boxes, pairs, all_labels, all_boxes, num_boxes)
        # Group DETR: the weighted losses of a layer are summed over its K groups.
        num_layers = len(layers)
        summed = {key: value.view(num_layers, num_groups).sum(1) for key, value in per_problem.items()}
        target_counts = torch.tensor(sizes, dtype=torch.float32).to(device)
        # (L,), of group 0 of every layer: the logs describe it.
        cardinality = self._cardinality_error(logits[::num_groups], target_counts)
        first = pairs[:, pairs[0] == 0]  # the last decoder layer's group-0 matching
        class_error = self._class_error(logits[0][first[1], first[2]], all_labels[first[3]])
        # Official key order: loss_ce, class_error, loss_bbox, loss_giou, cardinality_error, then aux layers.
        losses: dict[str, Tensor] = {}
        for layer in range(num_layers):
            suffix = "" if layer == 0 else f"_{layer - 1}"
            losses[f"loss_ce{suffix}"] = summed["loss_ce"][layer]
            if layer == 0:
                losses["class_error"] = class_error
            losses[f"loss_bbox{suffix}"] = summed["loss_bbox"][layer]
            losses[f"loss_giou{suffix}"] = summed["loss_giou"][layer]
            losses[f"cardinality_error{suffix}"] = cardinality[layer]
        return losses

    def problem_losses(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        pairs: Tensor,
        all_labels: Tensor,
        all_boxes: Tensor,
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """``loss_ce``, ``loss_bbox`` and ``loss_giou``, each ``(P,)``, of every matching problem (decoder
        layer x query group) at once: predictions ``(P, B, Q, C + 1)`` and ``(P, B, Q, 4)``, ``pairs (4, M)``
        (problem, image, query and batch-wide target index of each matched pair), the batch's targets
        concatenated (``(T,)`` and ``(T, 4)``) and ``num_boxes``, the 0-dim normalizer of the box losses."""
        # At least float32 (the log-softmax and GIoU need the range); 64-true: float64, as are its targets.
        dtype = torch.promote_types(pred_boxes.dtype, torch.float32)
        logits, boxes, all_boxes = pred_logits.to(dtype), pred_boxes.to(dtype), all_boxes.to(dtype)
        problem, image, query, target = pairs
        # Boxes of matched queries only, normalized by the (all-process) number of target boxes.
        matched_pred = boxes[problem, image, query]  # (M, 4)
        matched_target = all_boxes[target]  # (M, 4)
        matched_pred_xyxy = box_convert(matched_pred, "cxcywh", "xyxy")
        matched_target_xyxy = box_convert(matched_target, "cxcywh", "xyxy")
        l1 = F.l1_loss(matched_pred, matched_target, reduction="none").sum(1)  # (M,)
        giou = generalized_box_iou_loss(matched_pred_xyxy, matched_target_xyxy, reduction="none")  # (M,)
        zeros = l1.new_zeros(logits.shape[0])  # (P,)
        if self.class_loss == "ce":
            loss_ce = self._cross_entropy(logits, pairs, all_labels)
        else:
            class_logits = logits[..., : self.num_classes]  # (P, B, Q, C): "no object" is unused
            matched = (problem, image, query, all_labels[target])
            onehot = torch.zeros_like(class_logits)
            onehot[matched] = 1.0
            if self.class_loss == "focal":
                loss = sigmoid_focal_loss(
                    class_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
                )
            else:
                iou = paired_iou(matched_pred_xyxy.detach(), matched_target_xyxy)  # (M,)
                loss = self._varifocal(class_logits, onehot, matched, iou)
            loss_ce = loss.sum((1, 2, 3)) / num_boxes
        return {
            "loss_ce": loss_ce,
            "loss_bbox": zeros.index_add(0, problem, l1) / num_boxes,
            "loss_giou": zeros.index_add(0, problem, giou) / num_boxes,
        }

    def _cross_entropy(self, logits: Tensor, pairs: Tensor, all_labels: Tensor) -> Tensor:
        """The official classification loss, ``(P,)``: unmatched queries are "no object" (``eos_coef``)."""
        problem, image, query, target = pairs
        target_classes = logits.new_full(logits.shape[:3], self.num_classes, dtype=torch.int64)
        target_classes[problem, image, query] = all_labels[target]
        weighted_nll = F.cross_entropy(
            logits.permute(0, 3, 1, 2), target_classes, weight=self.empty_weight, reduction="none"
        )  # (P, B, Q): weight[class] * -log p(class)
        # The official weighted mean: sum of weighted terms over the sum of weights, per problem.
        return weighted_nll.sum((1, 2)) / self.empty_weight[target_classes].sum((1, 2))

    def _varifocal(
        self, class_logits: Tensor, onehot: Tensor, matched: tuple[Tensor, ...], iou: Tensor
    ) -> Tensor:
        """Elementwise varifocal loss ``(P, B, Q, C)``: the target is the IoU at the ``matched``
        (problem, image, query, class) entries, 0 elsewhere."""
        quality = torch.zeros_like(class_logits)
        quality[matched] = iou.to(quality.dtype)
        score = class_logits.detach().sigmoid()
        weight = self.varifocal_alpha * score.pow(self.focal_gamma) * (1 - onehot) + quality
        return F.binary_cross_entropy_with_logits(class_logits, quality, weight=weight, reduction="none")

    @torch.no_grad()
    def _class_error(self, matched_logits: Tensor, matched_labels: Tensor) -> Tensor:
        """Top-1 error in percent of the matched queries (100 when the batch has no object)."""
        if matched_labels.numel() == 0:
            return torch.tensor(100.0, device=matched_logits.device)
        if self.score == "sigmoid":
            matched_logits = matched_logits[..., : self.num_classes]
        accuracy = (matched_logits.argmax(-1) == matched_labels).float().mean() * 100
        return 100 - accuracy

    @torch.no_grad()
    def _cardinality_error(self, logits: Tensor, target_counts: Tensor) -> Tensor:
        """``logits (L, B, Q, C + 1)``, ``target_counts (B,)`` -> ``(L,)``: per layer, the mean absolute
        difference between the number of objects and of queries predicting one (argmax not "no object"
        for ``ce``, best real-class sigmoid score above 0.5 for sigmoid losses)."""
        if self.score == "sigmoid":
            predicted = (logits[..., : self.num_classes].amax(-1) > 0).sum(-1).float()  # (L, B)
        else:
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(-1).float()  # (L, B)
        return (predicted - target_counts).abs().mean(-1)

    def weighted_total(self, losses: dict[str, Tensor]) -> Tensor:
        """Sum of ``weight * loss`` over the losses in ``weight_dict``, in the dict's key order."""
        terms = [losses[key] * self.weight_dict[key] for key in losses if key in self.weight_dict]
        return torch.stack(terms).sum() if terms else torch.zeros(())
