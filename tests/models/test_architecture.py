"""Architecture facts of the official DETR: state-dict layout, parameter counts, frozen layers, shapes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from detr_lightning.models import PositionEmbeddingLearned, PositionEmbeddingSine, build_detr

TINY = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=5)


@pytest.fixture(scope="module")
def detr_r50_coco():
    return build_detr(num_classes=91)


def test_r50_state_dict_equals_official_manifest(detr_r50_coco, official_fixtures):
    manifest = json.loads((official_fixtures / "detr_r50_state_dict_shapes.json").read_text())["tensors"]
    ours = {name: list(tensor.shape) for name, tensor in detr_r50_coco.state_dict().items()}
    assert ours == manifest


def test_r50_parameter_counts(detr_r50_coco):
    trainable = sum(p.numel() for p in detr_r50_coco.parameters() if p.requires_grad)
    total = sum(p.numel() for p in detr_r50_coco.parameters())
    assert (trainable, total) == (41_302_368, 41_524_768)  # main.py's "number of params" for COCO


def test_fire_extinguisher_run_parameter_count():
    model = build_detr(num_classes=2)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 41_279_495


def test_r101_and_dc5_keep_the_key_layout():
    r101 = build_detr(num_classes=91, backbone="resnet101", **TINY)
    assert sum(1 for k in r101.state_dict() if k.startswith("backbone.0.body.")) == 520
    dc5 = build_detr(num_classes=3, dilation=True, **TINY)
    plain = build_detr(num_classes=3, **TINY)
    assert {k: v.shape for k, v in dc5.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }


@pytest.mark.parametrize(("dilation", "stride"), [(False, 32), (True, 16)])
def test_feature_stride(dilation, stride):
    model = build_detr(num_classes=3, backbone="resnet50", dilation=dilation, **TINY).eval()
    images = torch.zeros(1, 3, 200, 250)
    features, feature_mask, pos = model.backbone(images, torch.zeros(1, 200, 250, dtype=torch.bool))
    assert features.shape[-2:] == (math.ceil(200 / stride), math.ceil(250 / stride))
    assert feature_mask.shape == features.shape[:1] + features.shape[-2:]
    assert pos.shape == (1, TINY["hidden_dim"], *features.shape[-2:])


def test_dc5_needs_bottleneck_blocks():
    with pytest.raises(ValueError, match="resnet50 or resnet101"):
        build_detr(num_classes=3, backbone="resnet18", dilation=True, **TINY)


def test_pre_norm_adds_the_encoder_norm():
    keys = build_detr(num_classes=3, backbone="resnet18", pre_norm=True, **TINY).state_dict()
    assert "transformer.encoder.norm.weight" in keys
    assert (
        "transformer.encoder.norm.weight"
        not in build_detr(num_classes=3, backbone="resnet18", **TINY).state_dict()
    )


def test_output_shapes_and_aux_outputs():
    model = build_detr(num_classes=3, backbone="resnet18", **TINY).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80), torch.rand(3, 96, 48)])
    assert out["pred_logits"].shape == (2, 5, 4)
    assert out["pred_boxes"].shape == (2, 5, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == TINY["dec_layers"] - 1
    no_aux = build_detr(num_classes=3, backbone="resnet18", aux_loss=False, **TINY).eval()
    assert "aux_outputs" not in no_aux([torch.rand(3, 64, 64)])


def test_gradients_reach_exactly_the_trainable_parameters():
    model = build_detr(num_classes=3, backbone="resnet18", dropout=0.0, **TINY)
    # At init the first decoder layer attends over all-zero targets with zero biases, so a few of its
    # weights get an exactly zero gradient (in the official model too); random biases remove that.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1 and param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    out = model([torch.rand(3, 64, 64), torch.rand(3, 48, 80)])
    loss = out["pred_logits"].sum() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    for name, param in model.named_parameters():
        frozen = name.startswith("backbone.0.body.") and not any(
            s in name for s in ("layer2", "layer3", "layer4")
        )
        assert param.requires_grad is not frozen, name
        if frozen:
            assert param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    frozen_count = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen_count == 64 * 3 * 7 * 7 + 4 * 64 * 64 * 3 * 3  # conv1 + layer1 of ResNet-18


def test_frozen_backbone_option():
    model = build_detr(num_classes=3, backbone="resnet18", train_backbone=False, **TINY)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))


def test_sine_encoding_values():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, -1] = True  # last column is padding
    pos = PositionEmbeddingSine(num_pos_feats=8)(mask)
    assert pos.shape == (1, 16, 3, 4)
    assert pos[0, 0, 0, 0] == pytest.approx(math.sin(2 * math.pi / 3), abs=1e-5)  # y first, sine
    assert pos[0, 1, 0, 0] == pytest.approx(math.cos(2 * math.pi / 3), abs=1e-5)  # interleaved cosine
    assert pos[0, 8, 0, 0] == pytest.approx(math.sin(2 * math.pi / 3), abs=1e-5)  # x: 1 of 3 valid columns
    assert pos[0, 8, 0, 3] == pytest.approx(math.sin(2 * math.pi), abs=1e-4)  # padded column keeps last value


def test_learned_encoding_is_x_then_y_and_bounded():
    encoding = PositionEmbeddingLearned(num_pos_feats=4, max_size=6)
    pos = encoding(torch.zeros(2, 3, 5, dtype=torch.bool))
    assert pos.shape == (2, 8, 3, 5)
    torch.testing.assert_close(pos[0, :4, 1, 2], encoding.col_embed.weight[2])
    torch.testing.assert_close(pos[0, 4:, 1, 2], encoding.row_embed.weight[1])
    with pytest.raises(ValueError, match="6x6"):
        encoding(torch.zeros(1, 7, 2, dtype=torch.bool))


def test_layer3_output_stage_halves_the_stride_and_drops_layer4():
    model = build_detr(num_classes=3, backbone="resnet18", backbone_output_stage="layer3", **TINY).eval()
    assert not any(".layer4." in key for key in model.state_dict())
    assert model.backbone[0].num_channels == 256 and model.backbone[0].stride == 16
    features, _, _ = model.backbone(torch.zeros(1, 3, 160, 96), torch.zeros(1, 160, 96, dtype=torch.bool))
    assert features.shape == (1, 256, 10, 6)


def test_from_scratch_backbone_trains_every_stage_with_batch_norm():
    model = build_detr(
        num_classes=3, backbone="resnet18", backbone_norm="batch", trainable_backbone_layers=5, **TINY
    )
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    none_train = build_detr(num_classes=3, backbone="resnet18", trainable_backbone_layers=0, **TINY)
    assert not any(p.requires_grad for p in none_train.backbone.parameters())
