"""Classification loss options (issue 7): ce (official), focal and varifocal, with the matcher and
post-processing that follow them."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from detr_lightning.checkpoints import saved_scoring
from detr_lightning.config import group_values
from detr_lightning.lit_module import DETRLitModule
from detr_lightning.models import HungarianMatcher, PostProcess, SetCriterion, build_detr, build_weight_dict
from detr_lightning.models.criterion import paired_iou, prior_class_bias
from tiny_detr import tiny_detr_kwargs

TINY_MODEL = tiny_detr_kwargs(num_queries=4, dropout=0.0)
IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
TARGETS = [
    {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])},
    {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]
NO_AUX = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def tiny_outputs():
    """One image, 3 queries, 2 real classes (+ the unused slot), 2 targets: query 1 overlaps target 0
    (IoU 0.6), query 2 sits exactly on target 1."""
    logits = torch.tensor([[[0.5, -1.0, 3.0], [2.0, -0.5, -2.0], [-1.5, 1.0, 0.0]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.55, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]])}
    ]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


MATCHED = {(1, 0): 0.6, (2, 1): 1.0}  # (query, class) of each matched pair -> IoU with its target


def criterion(class_loss: str, num_classes: int = 2, weights=NO_AUX, **kwargs) -> SetCriterion:
    matcher = HungarianMatcher(class_cost="softmax" if class_loss == "ce" else "focal")
    return SetCriterion(num_classes, matcher, weights, class_loss=class_loss, **kwargs)


def test_focal_loss_equals_a_hand_computation():
    outputs, targets = tiny_outputs()
    losses = criterion("focal", focal_alpha=0.25, focal_gamma=2.0)(outputs, targets)
    logits = outputs["pred_logits"][0].tolist()
    expected = 0.0
    for query, row in enumerate(logits):
        for cls in range(2):  # the third ("no object") logit takes no part
            p = sigmoid(row[cls])
            if (query, cls) in MATCHED:  # a matched query, its target's class
                expected += -0.25 * (1 - p) ** 2 * math.log(p)
            else:
                expected += -0.75 * p**2 * math.log(1 - p)
    expected /= 2  # two target boxes
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    # Boxes are untouched by the class loss choice.
    ce = criterion("ce")(outputs, targets)
    torch.testing.assert_close(losses["loss_bbox"], ce["loss_bbox"])
    torch.testing.assert_close(losses["loss_giou"], ce["loss_giou"])


def test_varifocal_target_is_the_iou_of_the_matched_query_and_zero_elsewhere():
    outputs, targets = tiny_outputs()
    iou = 0.6  # x: [0.45, 0.65] vs [0.4, 0.6], same y: 0.03 / (0.04 + 0.04 - 0.03)
    logits = outputs["pred_logits"].clone()
    logits[0, 1, 0] = math.log(iou / (1 - iou))  # the matched (query, class) already scores the IoU
    logits.requires_grad_(True)
    boxes = outputs["pred_boxes"].clone().requires_grad_(True)
    loss = criterion("varifocal", varifocal_alpha=0.75, focal_gamma=2.0)(
        {"pred_logits": logits, "pred_boxes": boxes}, targets
    )["loss_ce"]
    expected = 0.0
    for query, row in enumerate(logits[0].tolist()):
        for cls in range(2):
            p = sigmoid(row[cls])
            if (query, cls) in MATCHED:
                q = MATCHED[query, cls]
                expected += -q * (q * math.log(p) + (1 - q) * math.log(1 - p))
            else:
                expected += -0.75 * p**2 * math.log(1 - p)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)
    loss.backward()
    # d/dx [q * BCE(x, q)] = q * (sigmoid(x) - q): zero exactly where the score equals the IoU target.
    assert logits.grad[0, 1, 0].abs() < 1e-6
    assert (logits.grad[0, :, :2].flatten()[[0, 1, 3, 4]] > 0).all()  # targets 0: pushed down
    assert logits.grad[0, 2, 1] < 0  # target 1 (a perfect box), score 0.73: pushed up
    assert (logits.grad[..., 2] == 0).all()  # the "no object" logit is unused
    assert boxes.grad is None or (boxes.grad == 0).all()  # the IoU target is detached
    assert paired_iou(
        torch.tensor([[0.45, 0.4, 0.65, 0.6]]), torch.tensor([[0.4, 0.4, 0.6, 0.6]])
    ).item() == (pytest.approx(iou))


def test_focal_matching_cost_follows_its_formula_and_the_matching_is_optimal():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 5, 4, generator=generator)
    boxes = torch.rand(1, 5, 4, generator=generator) * 0.5 + 0.25
    targets = [
        {
            "labels": torch.tensor([0, 2, 1]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.5, 0.1, 0.1]]),
        }
    ]
    matcher = HungarianMatcher(2, 5, 2, class_cost="focal", focal_alpha=0.25, focal_gamma=2.0)
    cost = matcher.cost_matrix(logits[None], boxes[None], targets)[0, 0]
    box_only = HungarianMatcher(1e-12, 5, 2).cost_matrix(logits[None], boxes[None], targets)[0, 0]
    for query, (index, label) in itertools.product(range(5), enumerate([0, 2, 1])):
        p = sigmoid(logits[0, query, label].item())
        focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
        assert cost[query, index].item() == pytest.approx(box_only[query, index].item() + 2 * focal, abs=1e-5)
    query_idx, target_idx = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]
    best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert torch.isclose(cost[query_idx, target_idx].sum(), torch.as_tensor(best))


def test_sigmoid_postprocess_takes_the_top_k_query_class_pairs():
    logits = torch.tensor([[[0.0, 2.0, 9.0], [3.0, -1.0, 9.0], [1.0, 2.5, 9.0]]])  # last column unused
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    sizes = torch.tensor([[100, 200]])  # height, width
    out = PostProcess("sigmoid", top_k=4)({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]
    # Flat (query, class) scores: 3.0 (q1 c0), 2.5 (q2 c1), 2.0 (q0 c1), 1.0 (q2 c0), 0.0, -1.0.
    torch.testing.assert_close(out["scores"], torch.tensor([3.0, 2.5, 2.0, 1.0]).sigmoid())
    assert out["labels"].tolist() == [0, 1, 1, 0] and out["queries"].tolist() == [1, 2, 0, 2]
    expected_boxes = {0: [80, 40, 120, 60], 1: [0, 0, 100, 50], 2: [0, 0, 200, 100]}
    torch.testing.assert_close(out["boxes"], torch.tensor([expected_boxes[q] for q in [1, 2, 0, 2]]).float())
    # Default k: the number of queries.
    assert len(PostProcess("sigmoid")({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]["scores"]) == 3
    softmax = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]
    assert softmax["queries"].tolist() == [0, 1, 2]


def test_default_is_the_official_softmax_everywhere():
    torch.manual_seed(0)
    module = DETRLitModule(model=TINY_MODEL)
    assert module.criterion.class_loss == "ce" and module.criterion.matcher.class_cost == "softmax"
    assert module.postprocess.score == "softmax"
    torch.manual_seed(0)
    plain = build_detr(**TINY_MODEL)
    torch.testing.assert_close(module.model.class_embed.bias, plain.class_embed.bias)  # no prior init
    assert saved_scoring({"hyper_parameters": {"model": TINY_MODEL}}) == ("softmax", None)


def make_module(class_loss: str) -> DETRLitModule:
    torch.manual_seed(0)
    return DETRLitModule(
        model={**TINY_MODEL, "num_groups": 2}, loss={"class_loss": class_loss}, postprocess={"top_k": 5}
    ).train()


def train_step(module: DETRLitModule, bf16: bool = False) -> dict[str, torch.Tensor]:
    """Forward, losses, backward; returns the loss dict after checking losses and gradients."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        outputs = module.model(IMAGES)
        losses = module.criterion(outputs, TARGETS)
        total = module.criterion.weighted_total(losses)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    total.backward()
    grads = [p.grad for p in module.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return losses


@pytest.mark.parametrize("class_loss", ["ce", "focal", "varifocal"])
def test_training_step_gives_finite_losses_and_gradients(class_loss):
    module = make_module(class_loss)
    sigmoid_loss = class_loss != "ce"
    assert module.criterion.matcher.class_cost == ("focal" if sigmoid_loss else "softmax")
    assert module.postprocess.score == ("sigmoid" if sigmoid_loss else "softmax")
    if sigmoid_loss:
        torch.testing.assert_close(
            module.model.class_embed.bias, torch.full((4,), prior_class_bias(0.01)), rtol=0, atol=1e-6
        )
    train_step(module)
    module.eval()
    with torch.no_grad():
        detections = module.predict_step((IMAGES, None, [{"orig_size": torch.tensor([64, 64])}] * 2), 0)
    assert len(detections[0]["scores"]) == (5 if sigmoid_loss else 4)


def test_sigmoid_losses_under_bf16_autocast_stay_float32():
    train_step(make_module("varifocal"), bf16=True)  # the whole model (slow on CPU: one loss only)
    outputs, targets = tiny_outputs()
    half = {k: v.bfloat16() for k, v in outputs.items()}
    for class_loss in ("focal", "varifocal"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = criterion(class_loss)(half, targets)
        reference = criterion(class_loss)({k: v.float() for k, v in half.items()}, targets)
        for key, value in losses.items():
            assert value.dtype == torch.float32, key
            torch.testing.assert_close(value, reference[key], msg=key)


def test_group_detr_with_focal_sums_the_per_group_losses():
    model = build_detr(**TINY_MODEL, num_groups=2).train()
    out = model(IMAGES)
    focal = criterion("focal", num_classes=3, weights=build_weight_dict(num_decoder_layers=2))
    total = focal(out, TARGETS)
    q = TINY_MODEL["num_queries"]

    def group(index):
        sl = slice(index * q, (index + 1) * q)
        single = {"pred_logits": out["pred_logits"][:, sl], "pred_boxes": out["pred_boxes"][:, sl]}
        single["aux_outputs"] = [
            {"pred_logits": a["pred_logits"][:, sl], "pred_boxes": a["pred_boxes"][:, sl]}
            for a in out["aux_outputs"]
        ]
        return focal(single, TARGETS)

    first, second = group(0), group(1)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        torch.testing.assert_close(total[key], first[key] + second[key], msg=key)
    assert total["class_error"] == first["class_error"]
    assert total["cardinality_error"] == first["cardinality_error"]


def test_sigmoid_logs_read_the_real_classes():
    outputs, targets = tiny_outputs()
    losses = criterion("focal")(outputs, targets)
    assert losses["class_error"].item() == 0  # queries 1 and 2: best real class right
    # Queries with a real-class sigmoid score above 0.5: 0 (0.5), 1 (2.0), 2 (1.0); two targets. Query 0's
    # "no object" logit (3.0) is ignored.
    assert losses["cardinality_error"].item() == 1
    softmax = criterion("ce")(outputs, targets)
    assert softmax["cardinality_error"].item() == 0  # query 0's argmax is "no object"


def test_sigmoid_loss_keeps_its_fresh_class_head_over_pretrained_weights(tmp_path):
    source = build_detr(**TINY_MODEL)
    path = tmp_path / "official.pth"
    torch.save({"model": source.state_dict()}, path)
    module = DETRLitModule(model=TINY_MODEL, loss={"class_loss": "focal"})
    head = module.model.class_embed.weight.detach().clone()
    module.load_pretrained(str(path))
    torch.testing.assert_close(module.model.class_embed.weight, head)
    torch.testing.assert_close(module.model.query_embed.weight, source.query_embed.weight)


def test_config_choices_are_checked():
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="loss.class_loss=bce") as refused:
            compose("train", overrides=["loss.class_loss=bce"])
        assert "expected one of [ce, focal, varifocal]" in str(refused.value.__cause__)
        cfg = compose("train", overrides=["loss.class_loss=varifocal", "matcher.class_cost=null"])
    assert group_values(cfg.loss)["class_loss"] == "varifocal" and cfg.matcher.class_cost is None
    assert saved_scoring(
        {"hyper_parameters": {"loss": {"class_loss": "varifocal"}, "postprocess": {"top_k": 7}}}
    ) == (
        "sigmoid",
        7,
    )
