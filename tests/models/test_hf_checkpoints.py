"""Hugging Face DETR checkpoints: both backbone flavours load with the same outputs, our models export to
a folder transformers loads (same outputs, same pipeline detections as predict.py), round trips are
exact, and fine-tuning replaces the class head. Tiny models made here; the hub is never reached."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from detr_lightning.checkpoints import load_detr, read_detr_file
from detr_lightning.export import export
from detr_lightning.hf_format import (
    HFPreprocessing,
    hf_architecture,
    is_hf_source,
    ours_to_hf,
    write_hf_folder,
)
from detr_lightning.inference import load_detector
from detr_lightning.lit_module import DETRLitModule
from detr_lightning.models import build_detr
from detr_lightning.models.weight_files import CheckpointError, WeightsUnavailableError
from detr_lightning.predict import predict
from inference.conftest import compose_config  # tests/inference/conftest.py
from tiny_detr import tiny_detr_kwargs

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

ATOL = 1e-4  # outputs of the two implementations (float32 on CPU; measured: below 1e-6)
IMAGENET = HFPreprocessing(96, 160, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: The tiny HF DETR: ResNet-18, 2 + 2 layers of width 32, 5 queries, 3 classes.
HF_TINY = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_queries=5,
    id2label={0: "cat", 1: "dog", 2: "bird"},
)
#: Our model of the same architecture.
OUR_TINY = tiny_detr_kwargs(
    num_classes=3, enc_layers=2, dec_layers=2, hidden_dim=32, nheads=2, dim_feedforward=64, num_queries=5
)
#: (backbone flavour, position embedding): each flavour, and each position embedding, once.
CASES = [("timm", "sine"), ("native", "learned")]


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """The hub client read HF_HUB_OFFLINE when first imported: set its switch too."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def randomize_frozen_norms(model: torch.nn.Module, seed: int) -> None:
    """Random statistics and affine values in every frozen batch norm (defaults would hide a swapped key)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_var", "weight")):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
            elif name.endswith(("running_mean", "bias")):
                buffer.copy_(0.2 * torch.randn(buffer.shape, generator=generator))


def hf_detr(flavour: str, position_embedding: str, seed: int = 0):
    """A random ``DetrForObjectDetection`` (eval mode) with ``flavour``'s ResNet-18."""
    if flavour == "timm":
        pytest.importorskip("timm")
        backbone = dict(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False)
    else:
        resnet = transformers.ResNetConfig(
            layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_features=["stage4"]
        )
        backbone = dict(use_timm_backbone=False, backbone_config=resnet)
    config = transformers.DetrConfig(position_embedding_type=position_embedding, **backbone, **HF_TINY)
    torch.manual_seed(seed)
    model = transformers.DetrForObjectDetection(config)
    randomize_frozen_norms(model, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # transformers starts the heads near zero: every query would say the same
        for name, parameter in model.named_parameters():
            if name.startswith(("bbox_predictor.", "class_labels_classifier.", "model.query_position")):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_ours(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_detr(**{**OUR_TINY, **overrides})
    randomize_frozen_norms(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """``hf_folders(flavour)``: ``(folder written by save_pretrained, the HF model)`` of :data:`CASES`,
    made once per module."""
    made: dict[str, tuple[Path, object]] = {}

    def get(flavour: str) -> tuple[Path, object]:
        if flavour not in made:
            model = hf_detr(flavour, dict(CASES)[flavour])
            folder = tmp_path_factory.mktemp(f"hf_{flavour}")
            model.save_pretrained(folder)
            made[flavour] = folder, model
        return made[flavour]

    return get


def padded_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two padded batches of different sizes: ``(images (2, 3, H, W), mask (2, H, W))``."""
    batches = []
    for seed, (height, width, padded) in enumerate([(64, 96, 1), (80, 56, 0)]):
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros(2, height, width, dtype=torch.bool)
        mask[padded, (2 * height) // 3 :] = True
        mask[padded, :, (3 * width) // 4 :] = True
        images[padded] = images[padded].masked_fill(mask[padded], 0.0)
        batches.append((images, mask))
    return batches


def assert_same_outputs(hf_model, ours) -> None:
    for images, mask in padded_batches():
        with torch.no_grad():
            theirs = hf_model(pixel_values=images, pixel_mask=(~mask).long())
            mine = ours(images, mask)
        assert mine["pred_logits"].std() > 0.01 and mine["pred_boxes"].std() > 0.01  # not a constant output
        torch.testing.assert_close(mine["pred_logits"], theirs.logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(mine["pred_boxes"], theirs.pred_boxes, atol=ATOL, rtol=0)


def copy_folder(folder: Path, destination: Path) -> Path:
    destination.mkdir()
    for file in folder.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination


@pytest.mark.parametrize(("flavour", "position_embedding"), CASES)
def test_hf_folder_loads_with_the_same_outputs(hf_folders, flavour, position_embedding):
    folder, hf_model = hf_folders(flavour)
    file = read_detr_file(folder)
    assert file.architecture["backbone"] == "resnet18" and file.architecture["nheads"] == 2
    assert file.architecture["position_embedding"] == position_embedding
    assert file.contents["class_names"] == {0: "cat", 1: "dog", 2: "bird"}
    assert_same_outputs(hf_model, load_detr(folder, aux_loss=False).eval())


def test_pytorch_model_bin_loads_like_safetensors(hf_folders, tmp_path):
    folder = copy_folder(hf_folders("native")[0], tmp_path / "bin")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    reference = load_detr(hf_folders("native")[0]).state_dict()
    loaded = load_detr(folder / "pytorch_model.bin").state_dict()  # a file of the folder: the folder
    assert all(torch.equal(reference[key], value) for key, value in loaded.items())


@pytest.mark.parametrize(("flavour", "position_embedding"), CASES)
def test_round_trip_ours_to_hf_to_ours(tmp_path, flavour, position_embedding):
    if flavour == "timm":
        pytest.importorskip("timm")
    ours = tiny_ours(position_embedding=position_embedding)
    names = {0: "cat", 2: "bird"}
    preprocessing = IMAGENET if flavour == "timm" else replace(IMAGENET, max_size=None)  # None: no cap
    folder = write_hf_folder(ours, tmp_path / "hf", names, preprocessing, flavour=flavour)
    back = read_detr_file(folder)
    assert load_detr(folder).architecture == ours.architecture
    state = ours.state_dict()
    assert set(back.state_dict) == set(state)
    assert all(torch.equal(value, state[key]) for key, value in back.state_dict.items())
    assert back.contents["class_names"] == {0: "cat", 1: "class 1", 2: "bird"}
    resize = back.contents["preprocessing"]
    assert (resize["scale"], resize["max_size"]) == (preprocessing.scale, preprocessing.max_size)
    hf_model, info = transformers.DetrForObjectDetection.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf_model.config.id2label == {0: "cat", 1: "class 1", 2: "bird"}
    assert_same_outputs(hf_model.eval(), ours)


def test_fine_tuning_from_hf_folder_replaces_the_class_head(hf_folders):
    folder = hf_folders("native")[0]
    arch = {k: v for k, v in OUR_TINY.items() if k != "num_classes"}
    module = DETRLitModule(model={**arch, "position_embedding": "learned", "num_classes": 7})
    module.load_pretrained(str(folder))
    reference = load_detr(folder).state_dict()
    for key, value in module.model.state_dict().items():
        if key.startswith("class_embed."):
            assert value.shape[0] == 8 and reference[key].shape[0] == 4
        else:
            assert torch.equal(value, reference[key]), key


def test_unsupported_config_fields_are_listed(hf_folders, tmp_path):
    folder = copy_folder(hf_folders("native")[0], tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    config["activation_function"] = "silu"
    config["encoder_ffn_dim"] = 128
    config["two_stage"] = True
    config["backbone_config"]["downsample_in_bottleneck"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        read_detr_file(folder)
    message = str(error.value)
    assert str(folder / "config.json") in message and "\n" not in message
    for expected in (
        "'two_stage'",
        "activation_function='silu'",
        "encoder_ffn_dim=128",
        "downsample_in_bottleneck",
    ):
        assert expected in message


def test_config_only_models_and_backbones_are_refused():
    with pytest.raises(CheckpointError, match="DetrForSegmentation"):
        hf_architecture({"architectures": ["DetrForSegmentation"]}, "config.json")
    with pytest.raises(CheckpointError, match="backbone='resnet50d'"):
        hf_architecture({"use_timm_backbone": True, "backbone": "resnet50d"}, "config.json")
    with pytest.raises(CheckpointError, match="dilation with resnet18"):
        hf_architecture({"backbone": "resnet18", "dilation": True}, "config.json")
    # transformers 4's facebook/detr-resnet-50 layout: a timm ResNet-50 by name, training fields ignored.
    config = {
        "architectures": ["DetrForObjectDetection"],
        "backbone": "resnet50",
        "use_timm_backbone": True,
        "backbone_config": None,
        "backbone_kwargs": {"in_chans": 3, "out_indices": [1, 2, 3, 4]},
        "dilation": True,
        "num_hidden_layers": 6,
        "eos_coefficient": 0.1,
        "max_position_embeddings": 1024,
        "id2label": {str(i): f"c{i}" for i in range(91)},
        "torch_dtype": "float32",
    }
    architecture, flavour = hf_architecture(config, "config.json")
    assert flavour == "timm" and architecture["backbone"] == "resnet50" and architecture["dilation"]
    assert architecture["num_classes"] == 91 and architecture["nheads"] == 8


def test_weights_without_counterpart_are_listed(hf_folders, tmp_path):
    folder = copy_folder(hf_folders("timm")[0], tmp_path / "extra")
    weights = load_file(folder / "model.safetensors")
    weights["model.extra_head.weight"] = torch.zeros(2)
    del weights["model.decoder.layers.1.encoder_attn.k_proj.bias"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        read_detr_file(folder)
    assert "model.extra_head.weight" in str(error.value)
    assert "transformer.decoder.layers.1.multihead_attn.in_proj_bias" in str(error.value)


def test_hub_id_offline_names_the_id_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailableError) as error:
        read_detr_file("facebook/detr-resnet-50")
    message = str(error.value)
    assert (
        "facebook/detr-resnet-50" in message
        and "hf download" in message
        and "model.pretrained=DIR" in message
    )
    assert is_hf_source("runs/best") and not is_hf_source("runs/best.ckpt") and not is_hf_source("detr_r50")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_detr_file("runs/best.ckpt")


def test_hub_id_from_the_hub_cache(hf_folders, tmp_path, monkeypatch):
    """A model the hub client downloaded before: the cache layout ``models--owner--name``."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-detr"
    (repo / "snapshots").mkdir(parents=True)
    copy_folder(hf_folders("native")[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    file = read_detr_file("someone/tiny-detr")
    assert file.path == repo / "snapshots" / commit
    reference = load_detr(hf_folders("native")[0]).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in file.state_dict.items())


def test_models_transformers_cannot_compute_are_not_exported(tmp_path):
    with pytest.raises(CheckpointError, match="pre_norm") as error:
        write_hf_folder(tiny_ours(pre_norm=True, backbone_output_stage="layer3"), tmp_path, {}, IMAGENET)
    assert "model.backbone_output_stage=layer3" in str(error.value)  # every problem in the one message
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(CheckpointError, match="spatial_prior"):
        ours_to_hf(tiny_ours(spatial_prior="gaussian").state_dict(), "native")


# ------------------------------------------------------------------ export.py and predict.py


@pytest.fixture(scope="module")
def project_run(tmp_path_factory) -> Path:
    """``run/checkpoints/best.ckpt``: a project checkpoint (architecture, weights, class names) of a tiny
    model with confident, varied scores; the run's config says the resize (96, at most 160)."""
    run = tmp_path_factory.mktemp("run")
    model = tiny_ours(seed=3, num_classes=4, num_queries=6)
    with torch.no_grad():
        model.class_embed.weight.mul_(20)
        model.class_embed.bias.copy_(torch.tensor([1.0, 2.0, 2.0, 1.0, -4.0]))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("data:\n  val_scale: 96\n  val_max_size: 160\n")
    (run / "checkpoints").mkdir()
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": model.architecture},
        "class_names": {0: "square", 1: "disc", 3: "triangle"},
    }
    torch.save(checkpoint, run / "checkpoints" / "best.ckpt")
    return run / "checkpoints" / "best.ckpt"


def test_export_py_huggingface_matches_predict_py(project_run, tmp_path):
    """``export.py format=huggingface``, then ``transformers.pipeline`` on the folder against our
    ``predict.py`` on the checkpoint (batch_size=1: the pipeline pads nothing either). Same labels and
    names; scores within 1e-4; boxes within 1 pixel (the pipeline truncates them to whole pixels and does
    not clip them to the image, which we do)."""
    folder = tmp_path / "hf"
    result = export(
        compose_config(
            "export",
            [
                f"ckpt_path={project_run}",
                "format=huggingface",
                f"output_dir={folder}",
                "height=64",
                "width=96",
            ],
        )
    )
    assert result.path == folder and len(result.max_abs_diff) == 2
    assert max(result.max_abs_diff.values()) <= ATOL
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    loaded = load_detector(pretrained=str(folder))  # model.pretrained=FOLDER: its names and resize
    assert loaded.class_names == {0: "square", 1: "disc", 2: "class 2", 3: "triangle"}
    assert (loaded.scale, loaded.max_size) == (96, 160)
    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for name, (width, height) in {"wide.png": (150, 90), "tall.png": (80, 130)}.items():
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(images / name)
    threshold = 0.5
    predictions = predict(
        compose_config(
            "predict",
            [
                f"ckpt_path={project_run}",
                f"input={images}",
                f"threshold={threshold}",
                "batch_size=1",
                "device=cpu",
                "num_workers=0",
                "progress=false",
                f"output_dir={tmp_path / 'predict'}",
            ],
        )
    )
    detector = transformers.pipeline("object-detection", model=str(folder), device="cpu")
    detected = 0
    for record in json.loads(predictions.read_text())["images"]:
        theirs = sorted(detector(Image.open(record["file"]), threshold=threshold), key=lambda d: -d["score"])
        assert [d["label"] for d in theirs] == record["names"]
        detected += len(theirs)
        for box, score, found in zip(record["boxes"], record["scores"], theirs, strict=True):
            assert abs(found["score"] - score) <= 1e-4
            corners = [found["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]
            limits = [record["width"], record["height"]] * 2
            clipped = [min(max(v, 0), limit) for v, limit in zip(corners, limits, strict=True)]
            assert all(abs(a - b) <= 1.0 + 1e-2 for a, b in zip(clipped, box, strict=True)), (clipped, box)
    assert detected >= 2
