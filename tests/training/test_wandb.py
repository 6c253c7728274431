"""W&B without credentials or network: offline runs with config, metrics, images with boxes, COCO tables."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from pycocotools.coco import COCO

from conftest import DemoSweep  # tests/conftest.py
from detr_lightning import loggers
from detr_lightning.callbacks.val_samples import class_labels as wandb_class_labels
from detr_lightning.callbacks.val_samples import confident_detections, ground_truth_boxes
from detr_lightning.callbacks.wandb_media import (
    WandbPredictionImages,
    coco_per_class_rows,
    coco_summary_rows,
    wandb_box_layers,
)
from detr_lightning.loggers import resolve_wandb_mode, wandb_credentials_found, wandb_server_reachable

SYNC_HINT = re.compile(r"W&B offline \(no W&B credentials found\): run `wandb sync (\S+)` to upload")
DEMO_CLASS_NAMES = {"square", "disc", "triangle"}
# The .wandb file is a LevelDB-style log of protobuf records: a 7-byte header, then 32 KiB blocks of
# chunks, each with a 7-byte header (checksum, little-endian length, type: full, first, middle, last).
_BLOCK_SIZE, _CHUNK_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(run_file: Path) -> list:
    """The protobuf ``Record``s of an offline run's ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B record log"
    position, pending, records = 7, b"", []
    while position + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK_SIZE - position % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER:  # the block's zero padding
            position += left_in_block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + _CHUNK_HEADER : position + _CHUNK_HEADER + length]
        position += _CHUNK_HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def logged_values(records: list, kind: str) -> dict[str, object]:
    """Top-level keys and last values of a run's ``history`` or ``config`` records (JSON-decoded)."""
    values: dict[str, object] = {}
    for record in records:
        if record.WhichOneof("record_type") != kind:
            continue
        items = record.history.item if kind == "history" else record.config.update
        for item in items:
            key = item.key or "/".join(item.nested_key)
            values[key] = json.loads(item.value_json)
    return values


@pytest.fixture(scope="module")
def wandb_sweep(demo_sweep) -> DemoSweep:
    """The suite's sweep (tests/conftest.py): ``logger=wandb`` with no credentials, two offline jobs."""
    return demo_sweep


def offline_run_dir(job_dir: Path) -> Path:
    runs = list((job_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"{job_dir}: expected one offline run, found {runs}"
    return runs[0]


def test_without_credentials_the_run_goes_offline_into_the_run_dir(wandb_sweep):
    assert wandb_sweep.result.returncode == 0, wandb_sweep.result.stderr[-3000:]
    output = wandb_sweep.result.stdout + wandb_sweep.result.stderr
    hinted = [Path(path) for path in SYNC_HINT.findall(output)]
    assert hinted == [offline_run_dir(job) for job in wandb_sweep.jobs]  # one line per job, its own run
    assert "wandb: ERROR" not in output and "api key" not in output.lower()


def test_offline_run_holds_config_metrics_images_and_tables(wandb_sweep, small_demo):
    assert wandb_sweep.result.returncode == 0, wandb_sweep.result.stderr[-3000:]
    run_dir = offline_run_dir(wandb_sweep.jobs[0])
    media = run_dir / "files" / "media"

    # At each of the 2 validations (files <image id>_<step>_<hash>): one image per validation image
    # (6 < num_images=8), named by image id, with both box layers.
    ground_truth = COCO(str(small_demo / "valid" / "_annotations.coco.json"))
    val_ids = sorted(ground_truth.imgs)
    images = sorted((media / "images" / "val" / "predictions").glob("*.png"))
    steps = sorted({int(path.name.split("_")[1]) for path in images})
    assert len(steps) == 2
    for step in steps:
        assert sorted(int(path.name.split("_")[0]) for path in images if f"_{step}_" in path.name) == val_ids
    layers_dir = media / "metadata" / "boxes2D" / "val" / "predictions"
    last = steps[-1]
    layers = [json.loads(path.read_text()) for path in sorted(layers_dir.glob(f"*_{last}_*.boxes2D.json"))]
    assert len(layers) == 2 * len(val_ids)
    boxes = [box for layer in layers for box in layer["box_data"]]
    assert boxes and all(box["domain"] == "pixel" for box in boxes)
    assert DEMO_CLASS_NAMES <= set(layers[0]["class_labels"].values())
    # The first image: every query drawn with its score (threshold 0, num_queries=20), and the file's boxes.
    first_image_layers = [
        json.loads(p.read_text()) for p in layers_dir.glob(f"{val_ids[0]}_{last}_*.boxes2D.json")
    ]
    (predicted,) = [layer for layer in first_image_layers if any("scores" in b for b in layer["box_data"])]
    (drawn_truth,) = [layer for layer in first_image_layers if layer is not predicted]
    assert len(predicted["box_data"]) == 20 and all("scores" in box for box in predicted["box_data"])
    expected = [
        {"minX": x, "minY": y, "maxX": x + w, "maxY": y + h}
        for x, y, w, h in (annotation["bbox"] for annotation in ground_truth.imgToAnns[val_ids[0]])
    ]
    assert expected and [box["position"] for box in drawn_truth["box_data"]] == expected

    for split in ("val", "test"):
        (per_class_file,) = (media / "table" / split).glob("coco_per_class_*.table.json")
        per_class = json.loads(per_class_file.read_text())
        assert per_class["columns"] == ["class", "id", "AP", "AR@100"]
        # Every class with ground truth has an AP; a class only predicted (the empty id-0 supercategory)
        # may have a row too, without an AP (COCOeval's -1), as in the console table.
        assert {row[0] for row in per_class["data"] if row[2] is not None} == DEMO_CLASS_NAMES
        assert all(row[2] is None for row in per_class["data"] if row[0] not in DEMO_CLASS_NAMES)
        (summary_file,) = (media / "table" / split).glob("coco_summary_*.table.json")
        summary = json.loads(summary_file.read_text())
        assert [row[1] for row in summary["data"]][:2] == [f"{split}/map", f"{split}/map_50"]
        assert len(summary["data"]) == 12

    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    config = logged_values(records, "config")
    assert config["loss"]["bbox_loss_coef"] == 2 and config["task_name"] == "demo"
    history = logged_values(records, "history")
    for key in ("val/map", "val/mar_100", "train/loss_epoch", "test/map", "trainer/global_step"):
        assert isinstance(history[key], int | float), key


def test_each_sweep_job_is_its_own_run_in_one_group(wandb_sweep):
    assert wandb_sweep.result.returncode == 0, wandb_sweep.result.stderr[-3000:]
    assert [job.name for job in wandb_sweep.jobs] == ["0", "1"]
    runs = []
    for job, bbox_loss_coef in zip(wandb_sweep.jobs, (2, 5), strict=True):
        records = wandb_records(next(offline_run_dir(job).glob("run-*.wandb")))
        runs.append(next(r.run for r in records if r.WhichOneof("record_type") == "run"))
        assert logged_values(records, "config")["loss"]["bbox_loss_coef"] == bbox_loss_coef
    assert runs[0].run_id != runs[1].run_id
    assert runs[0].run_group == runs[1].run_group == "sweep"  # the sweep folder's name
    assert "loss.bbox_loss_coef=2" in runs[0].display_name and "loss.bbox_loss_coef=5" in runs[1].display_name


# ---------------------------------------------------------------------- payloads, without a Trainer
def test_box_layers_are_pixel_boxes_with_class_names():
    import wandb

    class_labels = wandb_class_labels({1: "square", 2: "disc"}, labels={1, 2, 7})
    assert class_labels == {1: "square", 2: "disc", 7: "label 7"}
    predictions = {
        "boxes": torch.tensor([[10.0, 20.0, 110.5, 70.0], [0.0, 0.0, 5.0, 5.0]]),
        "scores": torch.tensor([0.9, 0.75]),
        "labels": torch.tensor([2, 7]),
    }
    ground_truth = {
        "boxes": torch.tensor([[12.0, 18.0, 100.0, 72.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64),
        "labels": torch.tensor([2, 1]),
        "iscrowd": torch.tensor([0, 1]),
    }
    layers = wandb_box_layers(predictions, ground_truth, class_labels)

    first = layers["predictions"]["box_data"][0]
    assert first["position"] == {"minX": 10.0, "minY": 20.0, "maxX": 110.5, "maxY": 70.0}
    assert first["domain"] == "pixel" and first["class_id"] == 2
    assert first["box_caption"] == "disc 0.90" and first["scores"] == {"score": pytest.approx(0.9)}
    assert layers["predictions"]["box_data"][1]["box_caption"] == "label 7 0.75"
    assert [box["box_caption"] for box in layers["ground_truth"]["box_data"]] == ["disc", "square (crowd)"]
    assert all("scores" not in box for box in layers["ground_truth"]["box_data"])
    assert layers["ground_truth"]["class_labels"] == class_labels
    # wandb itself accepts the payload (it validates boxes when the image is built).
    classes = [{"id": label, "name": name} for label, name in class_labels.items()]
    wandb.Image(np.zeros((80, 120, 3), dtype=np.uint8), boxes=layers, classes=classes)


def test_confident_detections_keep_scores_at_or_above_the_threshold():
    detection = {
        "boxes": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "scores": torch.tensor([0.2, 0.5, 0.8]),
        "labels": torch.tensor([1, 2, 3]),
    }
    kept = confident_detections(detection, 0.5)
    assert kept["labels"].tolist() == [2, 3] and kept["boxes"].shape == (2, 4)


def test_ground_truth_boxes_come_from_the_file_in_pixels_with_model_labels():
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 100}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 9, "name": "unmapped"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 1},
            {"id": 2, "image_id": 7, "category_id": 9, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0},
        ],
    }
    coco.createIndex()
    ground_truth = ground_truth_boxes(coco, 7, label_to_category_id={0: 3})
    assert ground_truth["boxes"].tolist() == [[10.0, 20.0, 40.0, 60.0]]
    assert ground_truth["labels"].tolist() == [0] and ground_truth["iscrowd"].tolist() == [1]


def test_coco_tables_turn_undefined_figures_into_none():
    result = {key: torch.tensor(0.5) for key in ("map", "map_50", "map_75", "map_small", "map_medium")}
    result.update(
        {key: torch.tensor(0.25) for key in ("mar_1", "mar_10", "mar_100", "mar_small", "mar_medium")}
    )
    result.update({"map_large": torch.tensor(-1.0), "mar_large": torch.tensor(-1.0)})
    result.update(
        classes=torch.tensor([1, 4]),
        map_per_class=torch.tensor([0.4, -1.0]),
        mar_100_per_class=torch.tensor([0.6, -1.0]),
    )
    assert coco_per_class_rows(result, {1: "square"}) == [
        ["square", 1, pytest.approx(0.4), pytest.approx(0.6)],
        ["4", 4, None, None],
    ]
    summary = coco_summary_rows(result, "val")
    assert summary[0] == [
        "Average Precision (AP) @[ IoU=0.50:0.95 | area= all | maxDets=100 ]",
        "val/map",
        0.5,
    ]
    assert summary[5][1:] == ["val/map_large", None] and summary[8][1:] == ["val/mar_100", 0.25]
    no_classes = {**result, "classes": torch.tensor([]), "map_per_class": torch.tensor(-1.0)}
    assert coco_per_class_rows(no_classes, {}) == []


def test_callback_is_inert_without_a_wandb_logger(tmp_path):
    callback = WandbPredictionImages(num_images=2)
    trainer = SimpleNamespace(
        loggers=[CSVLogger(tmp_path)],
        datamodule=None,
        sanity_checking=False,
        is_global_zero=True,
        callbacks=[],
    )
    callback.setup(trainer, None, "fit")
    callback.on_validation_epoch_start(trainer, None)  # would read the datamodule's annotation file
    outputs = {
        "image_ids": [1],
        "detections": [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.ones(1)}],
    }
    callback.on_validation_batch_end(trainer, None, outputs, None, 0)
    callback.on_validation_epoch_end(trainer, None)
    callback.on_fit_end(trainer, None)  # the datamodule is None: any attempt to log would raise


# ---------------------------------------------------------------------- the mode, decided before wandb starts
@pytest.fixture
def no_wandb_setup(monkeypatch, tmp_path):
    """No W&B variable, no netrc: HOME is an empty temporary folder."""
    for name in [name for name in os.environ if name.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_no_credentials_means_offline(no_wandb_setup):
    assert resolve_wandb_mode(offline=None) == ("offline", "no W&B credentials found")
    assert resolve_wandb_mode(offline=True)[0] == "offline"


def test_asking_for_online_without_credentials_fails_instead_of_prompting(no_wandb_setup, monkeypatch):
    with pytest.raises(ValueError, match="logger.wandb.offline=false.*wandb login"):
        resolve_wandb_mode(offline=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ValueError, match="WANDB_MODE=online.*unset WANDB_MODE"):
        resolve_wandb_mode(offline=None)


def test_wandb_mode_variable_wins(no_wandb_setup, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(offline=None) == ("disabled", "WANDB_MODE=disabled")
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode(offline=False)[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        resolve_wandb_mode(offline=None)


def test_credentials_go_online_only_when_the_server_answers(no_wandb_setup, monkeypatch):
    netrc_file = no_wandb_setup / ".netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert wandb_credentials_found()
    assert not wandb_credentials_found("https://wandb.example.com")
    monkeypatch.setattr(loggers, "wandb_server_reachable", lambda base_url: False)
    assert resolve_wandb_mode(offline=None) == ("offline", "https://api.wandb.ai unreachable")
    monkeypatch.setattr(loggers, "wandb_server_reachable", lambda base_url: True)
    assert resolve_wandb_mode(offline=None) == ("online", "")
    netrc_file.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_credentials_found()


def test_server_probe_answers_within_its_timeout():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert wandb_server_reachable(f"http://127.0.0.1:{port}", timeout_s=2)
    assert not wandb_server_reachable(f"http://127.0.0.1:{port}", timeout_s=2)  # closed now
