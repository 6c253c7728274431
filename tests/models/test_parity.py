"""Numerical parity with the official facebookresearch/detr implementation (../shared fixtures)."""

from __future__ import annotations

import pytest
import torch

from detr_lightning import HungarianMatcher, PostProcess, SetCriterion, load_detr
from detr_lightning.batching import pad_images_to_batch
from detr_lightning.models import build_weight_dict


@pytest.fixture(scope="module")
def tiny_case(request):
    fixtures = request.getfixturevalue("official_fixtures") / "tiny"
    model = load_detr(fixtures / "checkpoint.pth").eval()
    inputs = torch.load(fixtures / "inputs.pt", weights_only=True)
    expected = torch.load(fixtures / "expected.pt", weights_only=True)
    with torch.no_grad():
        outputs = model(inputs["images"])
    return model, inputs, expected, outputs


def test_architecture_read_from_the_official_file(tiny_case):
    model, *_ = tiny_case
    assert model.architecture["backbone"] == "resnet18"
    assert model.architecture["nheads"] == 4  # from args: shapes cannot tell
    assert (model.num_classes, model.num_queries) == (4, 12)
    assert len(model.transformer.encoder.layers) == 2 and len(model.transformer.decoder.layers) == 3


def test_outputs_match_official(tiny_case):
    _, _, expected, outputs = tiny_case
    torch.testing.assert_close(outputs["pred_logits"], expected["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs["pred_boxes"], expected["pred_boxes"], atol=1e-4, rtol=0)
    assert len(outputs["aux_outputs"]) == len(expected["aux_outputs"]) == 2
    for ours, theirs in zip(outputs["aux_outputs"], expected["aux_outputs"], strict=True):
        torch.testing.assert_close(ours["pred_logits"], theirs["pred_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"], atol=1e-4, rtol=0)


def test_padded_batch_input_equals_list_input(tiny_case):
    model, inputs, _, outputs = tiny_case
    images, mask = pad_images_to_batch(inputs["images"])
    with torch.no_grad():
        batched = model(images, mask)
    torch.testing.assert_close(batched["pred_logits"], outputs["pred_logits"], atol=0, rtol=0)


def test_matching_equals_official(tiny_case):
    _, inputs, expected, outputs = tiny_case
    matching = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)(outputs, inputs["targets"])
    assert len(matching) == len(expected["matching"])
    for (query, target), (exp_query, exp_target) in zip(matching, expected["matching"], strict=True):
        assert torch.equal(query, exp_query) and torch.equal(target, exp_target)


def test_losses_equal_official(tiny_case):
    _, inputs, expected, outputs = tiny_case
    weight_dict = build_weight_dict(num_decoder_layers=3, aux_loss=True)
    assert weight_dict == expected["weight_dict"]
    criterion = SetCriterion(4, HungarianMatcher(1, 5, 2), weight_dict, eos_coef=0.1)
    losses = criterion(outputs, inputs["targets"])
    assert list(losses) == list(expected["losses"])  # same keys, same order
    for key, value in expected["losses"].items():
        torch.testing.assert_close(losses[key], value, rtol=1e-4, atol=1e-6, msg=key)
    official_total = sum(expected["losses"][k] * w for k, w in weight_dict.items())
    torch.testing.assert_close(criterion.weighted_total(losses), official_total, rtol=1e-4, atol=0)


def test_postprocess_equals_official(tiny_case):
    _, inputs, expected, outputs = tiny_case
    sizes = torch.stack([t["orig_size"] for t in inputs["targets"]])
    results = PostProcess()(outputs, sizes)
    for ours, theirs in zip(results, expected["postprocess"], strict=True):
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=0)
