"""Speed options: channels_last and torch.compile in place, the speed config group, and the default run's
random stream (plain PyTorch's)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from omegaconf import OmegaConf

from detr_lightning.config import SpeedSchema
from detr_lightning.models import build_detr
from detr_lightning.speed import apply_speed_config, apply_speed_options
from tiny_detr import tiny_detr_kwargs

TINY = tiny_detr_kwargs(dec_layers=1, num_queries=5, dropout=0.0)


def conv_weights_channels_last(model: torch.nn.Module) -> bool:
    weights = [p for p in model.backbone.parameters() if p.dim() == 4]
    return bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    reference = build_detr(**TINY).eval()
    fast = build_detr(**TINY).eval()
    fast.load_state_dict(reference.state_dict())
    apply_speed_options(fast, channels_last=True)
    assert conv_weights_channels_last(fast)
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected, actual = reference(images), fast(images)
    torch.testing.assert_close(actual["pred_boxes"], expected["pred_boxes"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(actual["pred_logits"], expected["pred_logits"], atol=1e-5, rtol=1e-4)


def test_compile_in_place_keeps_checkpoint_keys():
    model = build_detr(**TINY)
    keys = list(model.state_dict())
    apply_speed_options(model, compile=True, compile_mode="reduce-overhead")
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints load uncompiled
    assert model._compiled_call_impl is not None


def test_unknown_compile_mode_is_refused():
    """By torch.compile itself here; a config (``speed.compile_mode=fastest``) is refused while composing,
    with the choices (``test_bad_inputs.WRONG_VALUES``)."""
    with pytest.raises(RuntimeError, match="mode=fastest"):
        apply_speed_options(build_detr(**TINY), compile=True, compile_mode="fastest")


def test_speed_config_group_reaches_the_options():
    defaults = OmegaConf.structured(SpeedSchema)
    options = set(inspect.signature(apply_speed_options).parameters) - {"model"}
    assert set(defaults) == options  # the config group names every option, and nothing else
    assert not conv_weights_channels_last(apply_speed_config(build_detr(**TINY), None))
    assert not conv_weights_channels_last(apply_speed_config(build_detr(**TINY), defaults))
    defaults.channels_last = True
    assert conv_weights_channels_last(apply_speed_config(build_detr(**TINY), defaults))


def test_default_speed_config_keeps_pytorchs_random_stream():
    """Training with dropout draws from PyTorch's generator as plain PyTorch does: the same seed gives
    the same outputs and gradients, with the default speed options applied or not; another seed differs."""
    torch.manual_seed(0)
    plain = build_detr(**tiny_detr_kwargs(dropout=0.1)).train()
    configured = apply_speed_config(copy.deepcopy(plain), OmegaConf.structured(SpeedSchema))
    images = torch.randn(2, 3, 64, 80)

    def boxes_and_grads(model: torch.nn.Module, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        boxes = model(images)["pred_boxes"]
        boxes.sum().backward()
        return boxes.detach(), [p.grad for p in model.transformer.parameters()]

    first, grads = boxes_and_grads(plain, 7)
    assert all(g is not None for g in grads)
    for model in (plain, configured):
        again, grads_again = boxes_and_grads(model, 7)
        assert torch.equal(again, first)
        assert all(torch.equal(a, b) for a, b in zip(grads_again, grads, strict=True))
    assert not torch.equal(boxes_and_grads(plain, 8)[0], first)
