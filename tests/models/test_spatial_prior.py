"""model.spatial_prior=gaussian: anchored cross-attention and box centres; off, the official model."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime
import pytest
import torch

from detr_lightning.checkpoints import CheckpointError, infer_architecture
from detr_lightning.export import ExportableDETR, example_inputs, export_onnx
from detr_lightning.lit_module import DETRLitModule
from detr_lightning.models import build_detr
from detr_lightning.models.spatial_prior import GaussianSpatialPrior
from tiny_detr import tiny_detr_kwargs


def gaussian_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_detr(**tiny_detr_kwargs(spatial_prior="gaussian", dropout=0.0, **overrides))


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 128, 160, generator=generator)
    mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    mask[1, 96:, :] = True  # the second image is 96 x 96, padded at the bottom and right
    mask[1, :, 96:] = True
    images[1][:, mask[1]] = 0
    return images, mask


def test_off_by_default_is_the_official_model():
    torch.manual_seed(0)
    model = build_detr(**tiny_detr_kwargs())
    assert model.spatial_prior is None
    assert not any(key.startswith("spatial_prior") for key in model.state_dict())
    assert infer_architecture(model.state_dict())["spatial_prior"] == "none"


def test_attention_bias_peaks_at_the_anchor_and_masks_padding():
    prior = GaussianSpatialPrior(num_anchors=3, init_sigma=0.25)
    with torch.no_grad():  # anchors on cell centres of a 4 x 5 grid: (col + 0.5) / 5, (row + 0.5) / 4
        prior.anchor_logits.copy_(torch.logit(torch.tensor([[0.1, 0.125], [0.9, 0.875], [0.5, 0.375]])))
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 2:, :] = True  # image 1: 2 valid rows x 5 columns
    with torch.no_grad():
        bias = prior.attention_bias(mask, num_queries=3, num_heads=2)
    assert bias.shape == (2 * 2, 3, 4 * 5)
    assert torch.equal(bias[0], bias[1]) and torch.equal(bias[2], bias[3])  # same for every head
    image0 = bias[0].view(3, 4, 5)
    for value in (image0[0, 0, 0], image0[1, 3, 4], image0[2, 1, 2]):  # the anchors' own cells
        assert abs(float(value)) < 1e-6
    for query, (row, col) in enumerate([(0, 0), (3, 4), (1, 2)]):
        assert image0[query].argmax() == row * 5 + col
    # one step of 0.2 (a column) from the anchor at sigma 0.25: -0.5 * (0.2 / 0.25)^2
    assert math.isclose(float(image0[0, 0, 1]), -0.5 * (0.2 / 0.25) ** 2, rel_tol=1e-5)
    image1 = bias[2].view(3, 4, 5)
    assert torch.isinf(image1[:, 2:, :]).all() and torch.isfinite(image1[:, :2, :]).all()
    # the anchors are relative to the valid area: row 0 of 2 valid rows has centre y = 0.25
    assert math.isclose(float(image1[0, 0, 0]), -0.5 * ((0.25 - 0.125) / 0.25) ** 2, rel_tol=1e-5)


def test_box_centres_are_read_relative_to_the_anchors():
    model = gaussian_model().eval()
    with torch.no_grad():
        model.bbox_embed.layers[-1].weight.zero_()
        model.bbox_embed.layers[-1].bias.zero_()
    images, mask = padded_batch()
    with torch.no_grad():
        boxes = model(images, mask)["pred_boxes"]  # (B, Q, 4)
    anchors = model.spatial_prior.anchors(model.num_queries)
    torch.testing.assert_close(boxes[..., :2], anchors.expand_as(boxes[..., :2]))
    torch.testing.assert_close(boxes[..., 2:], torch.full_like(boxes[..., 2:], 0.5))


def test_each_query_attends_around_its_own_anchor():
    """With a narrow prior, every query's cross-attention mass sits on the feature cell of its anchor."""
    model = gaussian_model().eval()
    cells = torch.tensor([[0, 0], [1, 2], [3, 4], [2, 1], [3, 0], [0, 4]])  # (row, col) on the 4 x 5 map
    with torch.no_grad():
        centres = torch.stack([(cells[:, 1] + 0.5) / 5, (cells[:, 0] + 0.5) / 4], dim=-1)
        model.spatial_prior.anchor_logits.copy_(torch.logit(centres))
        model.spatial_prior.log_sigma.fill_(math.log(0.03))
    weights = []
    for layer in model.transformer.decoder.layers:
        layer.need_weights = True
        layer.multihead_attn.register_forward_hook(lambda module, args, output: weights.append(output[1]))
    images = torch.randn(1, 3, 128, 160)  # a 4 x 5 feature map at stride 32
    with torch.no_grad():
        model(images)
    assert len(weights) == 2
    for layer_weights in weights:  # (B, Q, S), averaged over heads
        expected = cells[:, 0] * 5 + cells[:, 1]
        assert torch.equal(layer_weights[0].argmax(dim=-1), expected)
        assert (layer_weights[0].max(dim=-1).values > 0.9).all()


def test_groups_have_their_own_anchors_and_inference_uses_group_zero():
    model = gaussian_model(num_groups=3)
    assert model.spatial_prior.anchor_logits.shape == (3 * model.num_queries, 2)
    images, mask = padded_batch()
    model.train()
    assert model(images, mask)["pred_boxes"].shape == (2, 3 * model.num_queries, 4)
    model.eval()
    with torch.no_grad():
        before = model(images, mask)["pred_boxes"]
        model.spatial_prior.anchor_logits[model.num_queries :] += 1.0  # move groups 1 and 2 only
        after = model(images, mask)["pred_boxes"]
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_the_architecture_is_read_back_from_the_weights():
    model = gaussian_model().eval()
    architecture = infer_architecture(model.state_dict())
    assert architecture["spatial_prior"] == "gaussian"
    torch.manual_seed(1)
    rebuilt = build_detr(**{**tiny_detr_kwargs(dropout=0.0), **architecture}).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    images, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images, mask)["pred_boxes"], model(images, mask)["pred_boxes"])


def test_official_weights_are_refused_with_the_fix():
    module = DETRLitModule(model=tiny_detr_kwargs(spatial_prior="gaussian", pretrained="detr_r50"))
    with pytest.raises(CheckpointError, match="model.spatial_prior=none"):
        module.load_pretrained()


def test_trains_under_bf16_autocast_with_finite_gradients():
    model = gaussian_model(num_groups=2).train()
    images, mask = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask)
        loss = out["pred_boxes"].float().sum() + out["pred_logits"].float().logsumexp(-1).sum()
    loss.backward()
    assert torch.isfinite(model.spatial_prior.anchor_logits.grad).all()
    assert model.spatial_prior.log_sigma.grad.abs().sum() > 0


def test_onnx_export_matches_pytorch(tmp_path):
    model = gaussian_model().eval()
    result = export_onnx(model, tmp_path / "prior.onnx", height=96, width=128, dynamic=True, verify=False)
    assert result.exporter == "torch.onnx.export(dynamo=True)"  # no fallback to the legacy exporter
    session = onnxruntime.InferenceSession(str(tmp_path / "prior.onnx"), providers=["CPUExecutionProvider"])
    for batch, height, width in [(1, 96, 128), (2, 79, 90)]:
        inputs = example_inputs(batch, height, width, seed=batch)
        with torch.no_grad():
            expected = [t.numpy() for t in ExportableDETR(model).eval()(*inputs)]
        feeds = {node.name: t.numpy() for node, t in zip(session.get_inputs(), inputs, strict=True)}
        actual = session.run(["pred_logits", "pred_boxes"], feeds)
        for ours, theirs in zip(expected, actual, strict=True):
            np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
