"""Matcher, criterion and post-processing behaviour beyond the official fixture."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.ops import box_convert, generalized_box_iou

from detr_lightning.models import HungarianMatcher, PostProcess, SetCriterion, build_weight_dict
from detr_lightning.models.criterion import count_target_boxes


def random_outputs(batch=2, queries=6, classes=3, layers=0, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def one():
        return {
            "pred_logits": torch.randn(batch, queries, classes + 1, generator=generator),
            "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.25,
        }

    out = one()
    if layers:
        out["aux_outputs"] = [one() for _ in range(layers)]
    return out


def target(labels, boxes):
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
    }


def test_matching_is_optimal_by_brute_force():
    outputs = random_outputs(batch=1, queries=5)
    targets = [target([0, 2, 1], [[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.5, 0.1, 0.1]])]
    matcher = HungarianMatcher(1, 5, 2)
    query_idx, target_idx = matcher(outputs, targets)[0]
    cost = matcher.cost_matrix(outputs["pred_logits"][None], outputs["pred_boxes"][None], targets)[0, 0]
    best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert torch.isclose(cost[query_idx, target_idx].sum(), torch.as_tensor(best))
    assert torch.equal(query_idx, query_idx.sort().values)  # ascending query order, as scipy returns
    assert sorted(target_idx.tolist()) == [0, 1, 2]


def test_cost_terms_follow_their_definitions():
    outputs = random_outputs(batch=1, queries=3)
    targets = [target([1], [[0.4, 0.4, 0.2, 0.3]])]
    logits, boxes = outputs["pred_logits"][None], outputs["pred_boxes"][None]
    tb = targets[0]["boxes"]
    expected_l1 = (boxes[0, 0] - tb).abs().sum(-1)
    expected_class = -logits[0, 0].softmax(-1)[:, 1]
    expected_giou = -generalized_box_iou(
        box_convert(boxes[0, 0], "cxcywh", "xyxy"), box_convert(tb, "cxcywh", "xyxy")
    )[:, 0]
    cost = HungarianMatcher(cost_class=2, cost_bbox=3, cost_giou=7).cost_matrix(logits, boxes, targets)[
        0, 0, :, 0
    ]
    torch.testing.assert_close(cost, 3 * expected_l1 + 2 * expected_class + 7 * expected_giou)


def test_more_targets_than_queries_matches_every_query():
    outputs = random_outputs(batch=1, queries=2)
    targets = [target([0, 1, 2], [[0.3, 0.3, 0.2, 0.2]] * 3)]
    query_idx, target_idx = HungarianMatcher()(outputs, targets)[0]
    assert query_idx.tolist() == [0, 1] and len(set(target_idx.tolist())) == 2


def test_non_finite_predictions_do_not_crash_the_matcher():
    outputs = random_outputs(batch=1, queries=3)
    outputs["pred_boxes"][0, 1] = float("nan")
    query_idx, _ = HungarianMatcher()(outputs, [target([0], [[0.5, 0.5, 0.2, 0.2]])])[0]
    assert query_idx.tolist() != [1]


def test_all_matchers_need_a_weight():
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(0, 0, 0)


def make_criterion(eos_coef=0.1, layers=1):
    return SetCriterion(
        3, HungarianMatcher(), build_weight_dict(num_decoder_layers=layers + 1), eos_coef=eos_coef
    )


def test_batch_without_objects():
    outputs = random_outputs(layers=2)
    empty = target([], [])
    empty["boxes"] = empty["boxes"].reshape(0, 4)
    losses = make_criterion(layers=2)(outputs, [empty, empty])
    assert losses["class_error"] == 100
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    # Every query's target is "no object": the loss is the plain mean cross-entropy against it.
    expected_ce = torch.nn.functional.cross_entropy(
        outputs["pred_logits"].flatten(0, 1), torch.full((12,), 3)
    )
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    assert set(losses) >= {"loss_ce_1", "loss_bbox_1", "loss_giou_1", "cardinality_error_1"}


def test_perfect_predictions_have_zero_box_loss_and_class_error():
    outputs = random_outputs(batch=1, queries=4)
    boxes = [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]
    outputs["pred_boxes"][0, :2] = torch.tensor(boxes)
    outputs["pred_logits"][0] = torch.tensor([[9.0, 0, 0, 0], [0, 0, 9.0, 0], [0, 0, 0, 9.0], [0, 0, 0, 9.0]])
    losses = make_criterion()(outputs, [target([0, 2], boxes)])
    assert losses["loss_bbox"] == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"] == pytest.approx(0, abs=1e-5)
    assert losses["class_error"] == 0 and losses["cardinality_error"] == 0


def test_eos_coef_down_weights_no_object():
    outputs = random_outputs()
    targets = [target([1], [[0.5, 0.5, 0.2, 0.2]]), target([2], [[0.4, 0.4, 0.3, 0.3]])]
    heavy = make_criterion(eos_coef=1.0)(outputs, targets)["loss_ce"]
    light = make_criterion(eos_coef=0.1)(outputs, targets)["loss_ce"]
    assert heavy != light


def test_weighted_total_uses_the_weight_dict():
    outputs = random_outputs(layers=1)
    targets = [
        target([1], [[0.5, 0.5, 0.2, 0.2]]),
        target([0, 2], [[0.4, 0.4, 0.3, 0.3], [0.6, 0.6, 0.1, 0.2]]),
    ]
    criterion = make_criterion(layers=1)
    losses = criterion(outputs, targets)
    expected = sum(
        losses[k] * w
        for k, w in {
            "loss_ce": 1,
            "loss_bbox": 5,
            "loss_giou": 2,
            "loss_ce_0": 1,
            "loss_bbox_0": 5,
            "loss_giou_0": 2,
        }.items()
    )
    torch.testing.assert_close(criterion.weighted_total(losses), expected)
    outputs["pred_boxes"].requires_grad_(True)
    criterion.weighted_total(criterion(outputs, targets)).backward()
    assert outputs["pred_boxes"].grad.abs().sum() > 0


def test_postprocess_scales_to_each_image():
    logits = torch.tensor([[[0.0, 5.0, 0.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25]]])
    result = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 400]]))[0]
    assert result["labels"].tolist() == [1]
    torch.testing.assert_close(result["scores"], logits[0, :, :].softmax(-1)[:, 1])
    torch.testing.assert_close(result["boxes"], torch.tensor([[100.0, 75.0, 300.0, 125.0]]))


def _count_boxes_in_process(rank, world_size, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        boxes_per_rank = [3, 0]  # rank 0 has 3 boxes, rank 1 none
        targets = [{"labels": torch.zeros(boxes_per_rank[rank], dtype=torch.int64)}]
        results[rank] = float(count_target_boxes(targets, torch.device("cpu")))
        # Evaluation: rank 1 runs one batch more than rank 0 (uneven shards). Without a collective per
        # step, each rank counts its own boxes and none waits for a peer that never comes.
        extra_batches = 1 if rank == 1 else 0
        for _ in range(1 + extra_batches):
            local = float(count_target_boxes(targets, torch.device("cpu"), across_processes=False))
        results[f"eval{rank}"] = local
    finally:
        dist.destroy_process_group()


def test_box_normalizer_counts_all_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_count_boxes_in_process, args=(2, port, results), nprocs=2)
    # Training: (3 + 0) / 2 on both ranks; evaluation: each its own.
    assert dict(results) == {0: 1.5, 1: 1.5, "eval0": 3.0, "eval1": 1.0}
    assert float(count_target_boxes([{"labels": torch.zeros(0)}], torch.device("cpu"))) == 1.0  # clamped
