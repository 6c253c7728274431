"""Fast CPU dropout: the masks' distribution and seeding, the backward pass, the explicit attention path
against PyTorch's own, and the swap into a DETR that leaves its checkpoints and eval outputs alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detr_lightning.models import build_detr
from detr_lightning.models import dropout as fast
from detr_lightning.models.dropout import (
    FastDropout,
    FastDropoutMultiheadAttention,
    fast_dropout,
    keep_mask,
    use_fast_dropout,
)
from tiny_detr import tiny_detr_kwargs


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p):
    mask = keep_mask((1000, 1000), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    # 10^6 draws: the kept fraction's standard deviation is at most 0.0005.
    assert abs(mask.float().mean().item() - (1 - p)) < 0.003
    # No structure along either axis (a broken reshape would drop whole rows or columns).
    assert mask.float().mean(0).std() < 0.05 and mask.float().mean(1).std() < 0.05


def test_keep_mask_follows_torch_seed():
    torch.manual_seed(3)
    first, second = keep_mask((64, 64), 0.3), keep_mask((64, 64), 0.3)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 64), 0.3), first)
    assert not torch.equal(first, second)  # each call draws a new seed


def test_fast_dropout_zeroes_and_scales_like_dropout_and_backward_uses_the_same_mask():
    x = torch.randn(50, 4, 64, requires_grad=True)
    y = fast_dropout(x, 0.2, training=True)
    kept = y != 0
    assert 0.7 < kept.float().mean() < 0.9
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    (y * 3).sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 3 / 0.8)


def test_fast_dropout_falls_back_to_pytorch_where_it_does_not_apply():
    x = torch.randn(8, 8)
    assert fast_dropout(x, 0.5, training=False) is x  # eval: identity
    assert torch.equal(fast_dropout(x, 0.0, training=True), x)
    assert not fast.takes_fast_path(x.to(torch.int64), 0.5, True)
    assert not fast.takes_fast_path(x.to("meta"), 0.5, True)
    inplace = copy.deepcopy(nn.Dropout(0.5, inplace=True))
    inplace.__class__ = FastDropout
    torch.manual_seed(0)
    expected = nn.functional.dropout(x.clone(), 0.5, True, inplace=True)
    torch.manual_seed(0)
    assert torch.equal(inplace(x.clone()), expected)


def attention_pair(p: float) -> tuple[nn.MultiheadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(32, 4, dropout=p)
    swapped = copy.deepcopy(reference)
    use_fast_dropout(swapped)
    assert isinstance(swapped, FastDropoutMultiheadAttention)
    return reference, swapped


def attention_inputs() -> dict:
    torch.manual_seed(1)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    blocked = torch.zeros(5, 7, dtype=torch.bool)
    blocked[0, 2] = True
    return {
        "query": torch.randn(5, 2, 32, requires_grad=True),
        "key": torch.randn(7, 2, 32),
        "value": torch.randn(7, 2, 32),
        "padding": padding,
        "blocked": blocked,
        "bias": torch.randn(2 * 4, 5, 7),
    }


@pytest.mark.parametrize("masks", ["none", "padding", "padding+blocked", "padding+bias", "bias"])
def test_explicit_attention_path_equals_pytorch_attention(masks, monkeypatch):
    """With every weight kept, the training path is PyTorch's attention with weights scaled by 1/(1-p):
    the same as PyTorch's eval-mode attention with the output projection's weight scaled."""
    reference, swapped = attention_pair(0.5)
    with torch.no_grad():
        reference.out_proj.weight.mul_(2.0)  # 1 / (1 - 0.5)
    inputs = attention_inputs()
    kwargs = {}
    if "padding" in masks:
        kwargs["key_padding_mask"] = inputs["padding"]
    if "blocked" in masks:
        kwargs["attn_mask"] = inputs["blocked"]
    if "bias" in masks:
        kwargs["attn_mask"] = inputs["bias"]
        if "key_padding_mask" in kwargs:  # PyTorch wants matching mask types
            kwargs["key_padding_mask"] = torch.zeros(2, 7).masked_fill(inputs["padding"], float("-inf"))
    monkeypatch.setattr(fast, "keep_mask", lambda shape, p: torch.ones(shape, dtype=torch.bool))
    query, key, value = inputs["query"], inputs["key"], inputs["value"]
    expected = reference.eval()(query, key, value, need_weights=False, **kwargs)[0]
    actual, weights = swapped.train()(query, key, value, need_weights=False, **kwargs)
    assert weights is None
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=1e-5)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), query)
    (grad_actual,) = torch.autograd.grad(actual.square().sum(), query)
    torch.testing.assert_close(grad_actual, grad_expected, atol=2e-6, rtol=1e-5)


def test_attention_weights_are_dropped_and_reproducible():
    reference, swapped = attention_pair(0.5)
    inputs = attention_inputs()
    args = (inputs["query"], inputs["key"], inputs["value"])
    undropped = swapped.eval()(*args, need_weights=False)[0]
    swapped.train()
    torch.manual_seed(5)
    first = swapped(*args, need_weights=False)[0]
    torch.manual_seed(5)
    again = swapped(*args, need_weights=False)[0]
    assert torch.equal(first, again)
    assert not torch.allclose(first, undropped, atol=1e-3)
    # Asking for the weights takes PyTorch's own path, which returns them.
    assert swapped(*args, need_weights=True)[1].shape == (2, 5, 7)


def test_swapped_detr_keeps_keys_and_eval_outputs_and_trains():
    torch.manual_seed(0)
    model = build_detr(**tiny_detr_kwargs(dropout=0.1))
    images = torch.randn(2, 3, 64, 80)
    keys = list(model.state_dict())
    expected = model.eval()(images)
    changed = use_fast_dropout(model)
    # tiny DETR: 1 encoder layer (3 dropouts + 1 attention) and 2 decoder layers (4 + 2 each).
    assert changed == 16
    assert not any(type(m) in (nn.Dropout, nn.MultiheadAttention) for m in model.modules())
    assert list(model.state_dict()) == keys
    actual = model(images)
    torch.testing.assert_close(actual["pred_logits"], expected["pred_logits"])
    model.train()
    torch.manual_seed(7)
    first = model(images)["pred_boxes"]
    first.sum().backward()
    assert all(p.grad is not None for p in model.transformer.parameters())
    torch.manual_seed(7)
    assert torch.equal(model(images)["pred_boxes"], first)
