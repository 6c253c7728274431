"""Group DETR: K independent query groups in training, plain DETR at inference."""

from __future__ import annotations

import torch

from detr_lightning.models import HungarianMatcher, SetCriterion, build_detr, build_weight_dict
from tiny_detr import tiny_detr_kwargs

TINY = tiny_detr_kwargs(num_queries=4, dropout=0.0)
IMAGES = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
TARGETS = [
    {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])}
]


def test_one_group_is_the_plain_model():
    torch.manual_seed(0)
    plain = build_detr(**TINY)
    torch.manual_seed(0)
    grouped = build_detr(**TINY, num_groups=1)
    assert plain.state_dict().keys() == grouped.state_dict().keys()
    plain.train()
    grouped.train()
    torch.testing.assert_close(grouped(IMAGES)["pred_logits"], plain(IMAGES)["pred_logits"], rtol=0, atol=0)


def test_groups_cannot_see_each_other():
    model = build_detr(**TINY, num_groups=3).train()
    before = model(IMAGES)
    with torch.no_grad():
        model.query_embed_groups[4:8] += 5.0  # group 2 (the second extra block)
    after = model(IMAGES)
    q = TINY["num_queries"]
    torch.testing.assert_close(
        after["pred_logits"][:, : 2 * q], before["pred_logits"][:, : 2 * q]
    )  # groups 0, 1
    assert not torch.allclose(after["pred_logits"][:, 2 * q :], before["pred_logits"][:, 2 * q :])
    assert before["pred_logits"].shape == (1, 3 * q, 4) and before["num_groups"] == 3


def test_inference_runs_group_zero_only():
    model = build_detr(**TINY, num_groups=3).eval()
    out = model(IMAGES)
    assert out["pred_logits"].shape == (1, TINY["num_queries"], 4) and "num_groups" not in out
    model.train()
    torch.testing.assert_close(model(IMAGES)["pred_logits"][:, : TINY["num_queries"]], out["pred_logits"])


def test_loss_is_the_sum_of_per_group_losses():
    model = build_detr(**TINY, num_groups=2).train()
    out = model(IMAGES)
    criterion = SetCriterion(3, HungarianMatcher(), build_weight_dict(num_decoder_layers=2))
    total = criterion(out, TARGETS)
    q = TINY["num_queries"]

    def group(index):
        sl = slice(index * q, (index + 1) * q)
        single = {"pred_logits": out["pred_logits"][:, sl], "pred_boxes": out["pred_boxes"][:, sl]}
        single["aux_outputs"] = [
            {"pred_logits": a["pred_logits"][:, sl], "pred_boxes": a["pred_boxes"][:, sl]}
            for a in out["aux_outputs"]
        ]
        return criterion(single, TARGETS)

    first, second = group(0), group(1)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        torch.testing.assert_close(total[key], first[key] + second[key], msg=key)
    assert total["class_error"] == first["class_error"]  # logs describe group 0


def test_official_weights_initialise_every_group_from_group_zero():
    model = build_detr(**TINY, num_groups=3)
    model.copy_group_zero_queries()
    torch.testing.assert_close(model.query_embed_groups[:4], model.query_embed.weight)
    torch.testing.assert_close(model.query_embed_groups[4:], model.query_embed.weight)
