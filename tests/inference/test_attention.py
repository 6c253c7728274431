"""Attention maps: captured by hooks only while asked, normalized over the unpadded image."""

from __future__ import annotations

import json

import pytest
import torch

from detr_lightning.attention import (
    capture_attention,
    decoder_attention_maps,
    encoder_attention_map,
    feature_cell,
)
from detr_lightning.batching import pad_images_to_batch
from detr_lightning.predict import predict

from .conftest import TINY_MODEL, tiny_module
from .test_predict import predict_config


def attention_layers(model):
    return model.transformer.decoder.layers[-1], model.transformer.encoder.layers[-1]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_maps_have_the_image_size_and_sum_to_one():
    model = tiny_module().model
    # Model inputs of two sizes (so the second is padded), standing for originals of other sizes.
    inputs = [torch.randn(3, 96, 130), torch.randn(3, 70, 100)]
    originals = [(192, 260), (35, 50)]
    images, mask = pad_images_to_batch(inputs)
    with torch.no_grad(), capture_attention(model) as capture:
        model(images, mask)
    height, width = images.shape[-2:]
    h, w = -(-height // 32), -(-width // 32)
    assert capture.feature_mask.shape == (2, h, w)
    assert capture.decoder_cross.shape == (2, TINY_MODEL["num_queries"], h * w)
    assert capture.encoder_self.shape == (2, h * w, h * w)
    # Padded feature cells get no attention: each query's weights sum to one over the valid cells.
    valid = (~capture.feature_mask).flatten(1)  # (B, S)
    assert not valid[1].all()
    torch.testing.assert_close((capture.decoder_cross * valid[:, None]).sum(-1), torch.ones(2, 6))
    for index, (image, original) in enumerate(zip(inputs, originals, strict=True)):
        input_size = image.shape[-2:]
        maps = decoder_attention_maps(capture, index, [0, 3, 5], input_size, original)
        assert maps.shape == (3, *original) and (maps >= 0).all()
        torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3))
        pixel = (original[1] * 0.7, original[0] * 0.2)
        encoder = encoder_attention_map(capture, index, pixel, input_size, original)
        assert encoder.shape == original and (encoder >= 0).all()
        torch.testing.assert_close(encoder.sum(), torch.tensor(1.0))


def test_feature_cell_follows_the_resize_and_stays_in_the_image():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[3:, :] = True  # three valid rows
    # Original 200x300 (h x w) fed at 100x150: pixel (x=299, y=199) -> input (149, 99) -> cell (3, 4),
    # whose row is padding: the last valid row, 2.
    assert feature_cell((299, 199), (100, 150), (200, 300), 32, mask) == (2, 4)
    assert feature_cell((-5, -5), (100, 150), (200, 300), 32, mask) == (0, 0)
    assert feature_cell((100, 90), (100, 150), (200, 300), 32, mask) == (1, 1)


def test_capture_leaves_no_hooks_and_restores_need_weights():
    model = tiny_module().model
    decoder_layer, encoder_layer = attention_layers(model)
    before = hook_count(model)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        plain = model(images)
        with capture_attention(model):
            assert decoder_layer.need_weights and encoder_layer.need_weights
            assert not any(layer.need_weights for layer in model.transformer.encoder.layers[:-1])
            captured = model(images)
    assert not decoder_layer.need_weights and not encoder_layer.need_weights
    assert hook_count(model) == before == 0
    # Explicit attention instead of SDPA: the same outputs up to rounding.
    torch.testing.assert_close(captured["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="inside"), capture_attention(model, encoder=False):
        raise RuntimeError("inside")
    assert hook_count(model) == 0 and not decoder_layer.need_weights


def test_predict_with_attention_saves_one_figure_per_image(training_run, image_dir, tmp_path):
    cfg = predict_config(
        [
            f"ckpt_path={training_run}",
            f"input={image_dir}",
            "threshold=0.3",
            "attention=true",
            "attention_pixel=[10,20]",
            f"output_dir={tmp_path}",
        ]
    )
    path = predict(cfg)
    for record in json.loads(path.read_text())["images"]:
        assert (tmp_path / record["attention"]).stat().st_size > 0
        assert record["attention_pixel"] == [10.0, 20.0]
