"""Loading official and project checkpoints: architecture inference, strictness, safety, downloads."""

from __future__ import annotations

import argparse
import logging
import urllib.error

import pytest
import torch
import torchvision

from detr_lightning import OFFICIAL_DETR_URLS, load_detr
from detr_lightning.models import ResNetBackbone, build_detr
from detr_lightning.models.weight_files import CheckpointError, WeightsUnavailableError, download_weights
from tiny_detr import tiny_detr_kwargs

# Without num_classes: the tests pass it themselves.
TINY = {k: v for k, v in tiny_detr_kwargs(num_queries=5).items() if k != "num_classes"}


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_detr(num_classes=3, **TINY)


def save_official_format(model, path, **args):
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(**args), "epoch": 3}, path)
    return path


def assert_same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        if key not in skip:
            assert torch.equal(sa[key], sb[key]), key


def test_round_trip_official_format(tiny_model, tmp_path):
    path = save_official_format(tiny_model, tmp_path / "ckpt.pth", nheads=2, dilation=False, dropout=0.1)
    loaded = load_detr(path)
    assert_same_weights(tiny_model, loaded)
    assert loaded.architecture == tiny_model.architecture


def test_bare_state_dict_needs_nheads_from_caller(tiny_model, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(tiny_model.state_dict(), path)
    assert_same_weights(tiny_model, load_detr(path, nheads=2))
    assert load_detr(path).architecture["nheads"] == 8  # official default when nothing says


def test_lightning_checkpoint_of_this_project(tiny_model, tmp_path):
    path = tmp_path / "last.ckpt"
    state = {f"model.{k}": v for k, v in tiny_model.state_dict().items()}
    state["criterion.empty_weight"] = torch.ones(4)
    torch.save(
        {"state_dict": state, "hyper_parameters": {"model": tiny_model.architecture}, "epoch": 1}, path
    )
    loaded = load_detr(path)
    assert_same_weights(tiny_model, loaded)
    assert loaded.architecture["nheads"] == 2


def test_contradicting_nheads_is_an_error(tiny_model, tmp_path):
    path = save_official_format(tiny_model, tmp_path / "ckpt.pth", nheads=2)
    with pytest.raises(CheckpointError, match="nheads=2"):
        load_detr(path, nheads=4)


def test_class_head_is_replaced_for_other_num_classes(tiny_model, tmp_path, caplog):
    path = save_official_format(tiny_model, tmp_path / "ckpt.pth", nheads=2)
    with caplog.at_level(logging.INFO, logger="detr_lightning.checkpoints"):
        loaded = load_detr(path, num_classes=1)
    assert "Re-initialised the class head for num_classes=1" in caplog.text
    assert loaded.class_embed.out_features == 2 and loaded.num_classes == 1
    reference = tiny_model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith("class_embed."):
            assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("transformer.decoder.norm.bias"), "missing: transformer.decoder.norm.bias"),
        (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), "unexpected: extra.weight"),
        (
            lambda sd: sd.__setitem__("input_proj.bias", torch.zeros(7)),
            r"shape mismatch: input_proj.bias: file \(7,\)",
        ),
    ],
)
def test_strict_loading_names_the_bad_keys(tiny_model, tmp_path, edit, message):
    state = tiny_model.state_dict()
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=message):
        load_detr(path, nheads=2)


class _RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_pickles_code_is_refused(tiny_model, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_model.state_dict(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="Refusing to load .*evil.pth"):
        load_detr(path)
    assert not marker.exists()


def test_not_a_weight_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch weight file"):
        load_detr(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_detr(tmp_path / "nope.pth")


def test_official_name_offline_says_url_and_destination(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        load_detr("detr_r50")
    message = str(info.value)
    assert OFFICIAL_DETR_URLS["detr_r50"] in message
    assert str(tmp_path / "checkpoints" / "detr-r50-e632da11.pth") in message


def test_download_failure_is_reported_with_the_fix(monkeypatch, tmp_path):
    """The real download path, with the network failing as it does offline."""
    monkeypatch.delenv("DETR_LIGHTNING_OFFLINE")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    calls = []

    def no_network(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError, match="Name or service not known.*copy it to"):
        download_weights(OFFICIAL_DETR_URLS["detr_r101_dc5"])
    assert calls == [(OFFICIAL_DETR_URLS["detr_r101_dc5"], "a2e86def")]


def test_official_name_from_the_hub_cache_sets_dilation(monkeypatch, tmp_path):
    model = build_detr(num_classes=3, dilation=True, **{**TINY, "backbone": "resnet50"})
    cached = tmp_path / "checkpoints" / "detr-r50-dc5-f0fb7ef5.pth"
    cached.parent.mkdir()
    torch.save({"model": model.state_dict()}, cached)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    loaded = load_detr("detr_r50_dc5", nheads=2)
    assert loaded.architecture["dilation"] is True and loaded.backbone[0].stride == 16
    assert_same_weights(model, loaded)


def test_imagenet_backbone_weights_through_torchvision_api(monkeypatch, tmp_path):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="resnet18-f37072fd.pth"):
        ResNetBackbone("resnet18", pretrained=True)
    reference = torchvision.models.resnet18()
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / weights.url.rsplit("/", 1)[1])
    backbone = ResNetBackbone("resnet18", pretrained=True)
    torch.testing.assert_close(backbone.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_backbone_variants_are_read_from_the_weights(tmp_path):
    variant = build_detr(
        num_classes=3, backbone_norm="batch", backbone_output_stage="layer3", num_groups=3, **TINY
    )
    path = tmp_path / "variant.pth"
    torch.save({"model": variant.state_dict()}, path)
    loaded = load_detr(path, nheads=2)
    for key in ("backbone_norm", "backbone_output_stage", "num_groups"):
        assert loaded.architecture[key] == variant.architecture[key], key
    assert_same_weights(variant, loaded)
