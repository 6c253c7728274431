from __future__ import annotations

import logging
from pathlib import Path

import pytest

from detr_lightning.data.errors import DataError
from detr_lightning.data.layout import resolve_layout

from .builders import write_split


def test_roboflow_export_is_detected_and_logged_in_one_line(roboflow_root: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="detr_lightning.data.layout"):
        layout = resolve_layout(roboflow_root)
    assert layout.kind == "Roboflow export"
    assert list(layout.splits) == ["train", "val", "test"]
    assert layout.splits["val"].ann_file == roboflow_root / "valid" / "_annotations.coco.json"
    assert layout.splits["val"].img_dir == roboflow_root / "valid"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert (
        "Roboflow export" in messages[0]
        and str(roboflow_root / "test" / "_annotations.coco.json") in messages[0]
    )


@pytest.mark.parametrize(
    ("naming", "kind", "train_name"),
    [("instances", "COCO", "instances_train2017.json"), ("custom", "COCO (custom)", "custom_train.json")],
)
def test_coco_layouts_are_detected(coco_root, naming: str, kind: str, train_name: str) -> None:
    root = coco_root(naming)
    layout = resolve_layout(root)
    assert layout.kind == kind
    assert list(layout.splits) == ["train", "val"]
    assert layout.splits["train"].ann_file == root / "annotations" / train_name
    assert layout.splits["train"].img_dir == root / "train2017"
    assert layout.splits["val"].img_dir == root / "val2017"


def test_explicit_files_override_detection_relative_to_root(coco_root) -> None:
    root = coco_root("instances")
    write_split(root / "extra" / "my_test.json", root / "test_images")
    layout = resolve_layout(
        root,
        {
            "val": {"ann_file": "annotations/instances_train2017.json", "img_dir": None},
            "test": {"ann_file": "extra/my_test.json", "img_dir": "test_images"},
        },
    )
    assert layout.kind == "COCO + explicit overrides"
    # An ann_file alone keeps the folder detection found for that split.
    assert layout.splits["val"].ann_file == root / "annotations" / "instances_train2017.json"
    assert layout.splits["val"].img_dir == root / "val2017"
    assert layout.splits["test"].ann_file == root / "extra" / "my_test.json"
    assert layout.splits["test"].img_dir == root / "test_images"


def test_explicit_files_without_root(tmp_path: Path) -> None:
    ann_file = write_split(tmp_path / "somewhere" / "train.json", tmp_path / "somewhere")
    layout = resolve_layout(None, {"train": {"ann_file": str(ann_file)}})
    assert layout.kind == "explicit"
    assert layout.splits["train"].img_dir == ann_file.parent  # ann_file alone: images beside it


def test_folder_without_dataset_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"no dataset found in .*_annotations\.coco\.json.*instances_train2017"
    ):
        resolve_layout(tmp_path)


def test_missing_root_and_missing_split_are_clear_errors(tmp_path: Path, coco_root) -> None:
    with pytest.raises(DataError, match=r"data.root=.*nowhere is not a folder"):
        resolve_layout(tmp_path / "nowhere")
    with pytest.raises(DataError, match="data.root is not set"):
        resolve_layout(None)
    layout = resolve_layout(coco_root("instances"))
    with pytest.raises(DataError, match=r"no test split .*Fix: .*data\.test\.ann_file"):
        layout.require("test")
