"""predict.py: detections written as JSON and drawn on the images; clean errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_runs import cli_env, run_script
from detr_lightning.config import ConfigError
from detr_lightning.data.errors import DataError
from detr_lightning.inference import COCO_CLASS_NAMES, InferenceSettingError, load_detector
from detr_lightning.lit_module import DETRLitModule
from detr_lightning.models import build_detr
from detr_lightning.models.weight_files import CheckpointError, WeightsUnavailableError
from detr_lightning.predict import DetectorModule, ImageFiles, collate_images, predict, trainer_device

from .conftest import IMAGES, REPO_ROOT, TINY_MODEL, compose_config, save_lightning_checkpoint

pytestmark = pytest.mark.slow

EXPECTED_NAMES = {0: "shapes", 1: "square", 2: "disc", 3: "class 3", 4: "triangle"}


def run_predict_cli(args: list[str], cwd: Path):
    """``python predict.py ARGS`` from ``cwd``, offline, as conftest's ``run_cli`` runs it, as a fork of the
    preloaded server of :mod:`cli_runs`, in the environment of every run of the tests (:func:`cli_env`)."""
    return run_script(REPO_ROOT / "predict.py", args, cwd=cwd, env=cli_env(), timeout=120)


def predict_config(overrides: list[str]):
    return compose_config("predict", ["num_workers=0", "progress=false", *overrides])


def check_outputs(output_dir: Path, threshold: float, expected_files: set[str]) -> list[dict]:
    content = json.loads((output_dir / "predictions.json").read_text())
    records = content["images"]
    assert {Path(r["file"]).name for r in records} == expected_files
    for record in records:
        name = Path(record["file"]).name
        width, height, _ = IMAGES[name]
        assert (record["width"], record["height"]) == (width, height)
        with Image.open(output_dir / record["drawn"]) as drawn:
            assert drawn.size == (width, height) and drawn.mode == "RGB"
        assert len(record["boxes"]) == len(record["scores"]) == len(record["labels"]) == len(record["names"])
        assert record["scores"] == sorted(record["scores"], reverse=True)
        for (x0, y0, x1, y1), score, label, class_name in zip(
            record["boxes"], record["scores"], record["labels"], record["names"], strict=True
        ):
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
            assert threshold <= score <= 1
            assert class_name == EXPECTED_NAMES[label]
    return records


def test_predict_folder_writes_json_and_drawn_images(training_run, image_dir, tmp_path, caplog):
    cfg = predict_config(
        [
            f"ckpt_path={training_run}",
            f"input={image_dir}",
            "threshold=0.3",
            "batch_size=2",
            f"output_dir={tmp_path}",
        ]
    )
    with caplog.at_level(logging.WARNING):
        predict(cfg)
    assert any("notes.txt" in message and "not an image" in message for message in caplog.messages)
    records = check_outputs(tmp_path, 0.3, set(IMAGES))
    assert sum(len(r["scores"]) for r in records) > 0  # the tiny model's head is made confident
    content = json.loads((tmp_path / "predictions.json").read_text())
    assert content["resize"] == {"scale": 96, "max_size": 160}  # the run's data.val_scale / val_max_size
    assert content["class_names"] == {"0": "shapes", "1": "square", "2": "disc", "4": "triangle"}


def test_threshold_filters_and_single_file_input(training_run, image_dir, tmp_path):
    everything = predict(
        predict_config(
            [
                f"ckpt_path={training_run}",
                f"input={image_dir}/tall.jpg",
                "threshold=0",
                f"output_dir={tmp_path}/all",
            ]
        )
    )
    [record] = json.loads(everything.read_text())["images"]
    assert len(record["scores"]) == TINY_MODEL["num_queries"]  # no NMS: every query is a detection
    cut = 0.5 * (record["scores"][0] + record["scores"][-1])
    kept = predict(
        predict_config(
            [
                f"ckpt_path={training_run}",
                f"input={image_dir}/tall.jpg",
                f"threshold={cut}",
                f"output_dir={tmp_path}/cut",
            ]
        )
    )
    [filtered] = json.loads(kept.read_text())["images"]
    assert filtered["scores"] == [s for s in record["scores"] if s >= cut]
    assert (tmp_path / "cut" / "images" / "tall.jpg").is_file()


def test_files_that_fail_to_decode_are_skipped(training_run, image_dir, tmp_path, caplog):
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(image_dir / "wide.png", folder / "a_wide.png")
    data = (image_dir / "wide.png").read_bytes()
    (folder / "b_truncated.png").write_bytes(data[: len(data) // 2])  # a valid header, no pixels
    cfg = predict_config(
        [f"ckpt_path={training_run}", f"input={folder}", "batch_size=1", f"output_dir={tmp_path}/out"]
    )
    with caplog.at_level(logging.WARNING):
        path = predict(cfg)  # the second batch holds no decodable image
    assert any("b_truncated.png: cannot decode it" in message for message in caplog.messages)
    [record] = json.loads(path.read_text())["images"]
    assert Path(record["file"]).name == "a_wide.png"


def test_device_is_one_trainer_device(monkeypatch):
    assert trainer_device("auto") == {"accelerator": "auto", "devices": 1}
    assert trainer_device("cpu") == {"accelerator": "cpu", "devices": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert trainer_device("cuda") == {"accelerator": "gpu", "devices": [0]}
    assert trainer_device("cuda:1") == {"accelerator": "gpu", "devices": [1]}
    with pytest.raises(InferenceSettingError, match="device=cuda:2 but no such CUDA GPU"):
        trainer_device("cuda:2")


def test_only_the_model_inputs_go_to_the_device(training_run, image_dir):
    files = ImageFiles([image_dir / "wide.png", image_dir / "tall.jpg"], scale=64, max_size=100)
    batch = collate_images([files[0], files[1]])
    assert batch.images.shape[0] == 2 and batch.sizes.tolist() == [[90, 150], [130, 80]]
    module = DetectorModule(load_detector(ckpt_path=training_run))
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved.images.is_meta and moved.mask.is_meta and moved.sizes.is_meta
    assert moved.loaded[0].image.device.type == "cpu"  # drawn on the host


def test_predict_cli_on_a_folder(training_run, image_dir, tmp_path):
    result = run_predict_cli(
        [
            f"ckpt_path={training_run}",
            f"input={image_dir}",
            "threshold=0.2",
            "num_workers=0",
            f"output_dir={tmp_path}/out",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipping" in result.stdout and "notes.txt" in result.stdout  # Hydra logs to stdout
    check_outputs(tmp_path / "out", 0.2, set(IMAGES))
    assert (tmp_path / "out" / ".hydra" / "config.yaml").is_file()  # the Hydra run folder is output_dir


def test_cli_errors_are_one_message_and_a_non_zero_exit(tmp_path, image_dir):
    result = run_predict_cli([f"ckpt_path={tmp_path}/missing.ckpt", f"input={image_dir}"], cwd=tmp_path)
    assert result.returncode != 0
    assert "missing.ckpt does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["input=NOWHERE"], DataError, "input=.*nowhere does not exist"),
        (["input=null"], DataError, "input is not set"),
        (["input=IMAGES/notes.txt"], DataError, "notes.txt is not an image file"),
        (["input=EMPTY"], DataError, "holds no image files"),
        (["input=IMAGES", "threshold=1.5"], CheckpointError, "threshold=1.5 must be between 0 and 1"),
        (["input=IMAGES", "num_workers=-1"], ConfigError, r"config: num_workers=-1 must be 0 or more"),
        (["input=IMAGES", "batch_size=0"], ConfigError, r"config: batch_size=0 must be positive"),
        # A wrong type (attention_pixel=5) is refused while composing: test_bad_inputs.WRONG_COMMAND_VALUES.
        (
            ["input=IMAGES", "attention_pixel=[1,2,3]"],
            CheckpointError,
            r"attention_pixel=\[1.0, 2.0, 3.0\] must be \[x, y\]",
        ),
        (["input=IMAGES", "ckpt_path=null"], CheckpointError, "Give exactly one model"),
        (["input=IMAGES", "device=tpu"], InferenceSettingError, "device='tpu' is not a device"),
        (["input=IMAGES", "device=cuda:x"], InferenceSettingError, "device='cuda:x' is not a device"),
        pytest.param(
            ["input=IMAGES", "device=cuda"],
            InferenceSettingError,
            "device=cuda but no such CUDA GPU is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available"),
        ),
        (
            ["input=IMAGES", "ckpt_path=null", "model.pretrained=detr_r50"],
            WeightsUnavailableError,
            "forbids downloads",
        ),
        (
            ["input=IMAGES", "ckpt_path=IMAGES/wide.png"],
            CheckpointError,
            "Refusing to load .*wide.png",
        ),
    ],
)
def test_user_errors_name_the_setting(training_run, image_dir, tmp_path, overrides, error, message):
    (tmp_path / "empty").mkdir()
    replacements = {
        "NOWHERE": str(tmp_path / "nowhere"),
        "IMAGES": str(image_dir),
        "EMPTY": str(tmp_path / "empty"),
    }
    resolved = []
    for override in overrides:
        for placeholder, value in replacements.items():
            override = override.replace(placeholder, value)
        resolved.append(override)
    cfg = predict_config([f"ckpt_path={training_run}", f"output_dir={tmp_path}/out", *resolved])
    with pytest.raises(error, match=message):
        predict(cfg)


def test_class_names_without_the_run_config_and_overridden(training_run, tmp_path, caplog):
    alone = tmp_path / "best.ckpt"
    shutil.copy(training_run, alone)
    with caplog.at_level(logging.WARNING):
        detector = load_detector(ckpt_path=alone)
    assert detector.class_names == {} and detector.class_name(2) == "class 2"
    assert (detector.scale, detector.max_size) == (800, 1333) and "scale=" in caplog.text
    named = load_detector(ckpt_path=alone, class_names=["a", "b"], scale=128, max_size=200)
    assert named.class_name(1) == "b" and named.class_name(4) == "class 4" and named.scale == 128
    saved = torch.load(alone, map_location="cpu", weights_only=True)
    torch.save({**saved, "class_names": {2: "disc"}}, alone)  # as DETRLitModule.on_save_checkpoint does
    assert load_detector(ckpt_path=alone).class_names == {2: "disc"}


def test_official_weights_file_gets_coco_names(tmp_path):
    official = build_detr(**{**TINY_MODEL, "num_classes": 91})
    path = tmp_path / "detr-r50-e632da11.pth"  # the official file name, placed by hand
    torch.save({"model": official.state_dict()}, path)
    detector = load_detector(pretrained=str(path))
    assert detector.class_names == COCO_CLASS_NAMES and len(COCO_CLASS_NAMES) == 80
    assert detector.class_name(1) == "person" and detector.class_name(90) == "toothbrush"
    assert (detector.scale, detector.max_size) == (800, 1333)


def test_a_focal_loss_checkpoint_is_scored_with_sigmoid_however_it_is_given(tmp_path):
    """Its saved ``loss.class_loss`` and ``postprocess.top_k`` decide the scoring, through ``ckpt_path``
    and through ``model.pretrained`` alike (the official files: softmax)."""
    torch.manual_seed(0)
    module = DETRLitModule(model=TINY_MODEL, loss={"class_loss": "focal"}, postprocess={"top_k": 3})
    path = save_lightning_checkpoint(module, tmp_path / "run" / "checkpoints" / "focal.ckpt")
    for detector in (load_detector(ckpt_path=path), load_detector(pretrained=str(path))):
        assert (detector.score, detector.top_k) == ("sigmoid", 3)
        assert (detector.postprocess().score, detector.postprocess().top_k) == ("sigmoid", 3)
