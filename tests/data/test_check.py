from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from detr_lightning.data.check import load_split, main
from detr_lightning.data.layout import SplitFiles

from .builders import coco_dict, write_image, write_split

TRAIN_JSON = Path("train") / "_annotations.coco.json"


def _edit_train(root: Path, edit: Callable[[dict], None]) -> None:
    ann_file = root / TRAIN_JSON
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))


def _missing_file(root: Path) -> list[str]:
    return ["--train-ann-file", str(root / "train" / "nope.json")]


def _unreadable(root: Path) -> list[str]:
    (root / TRAIN_JSON).write_bytes(b'{"images": "\xff\xfe"}')
    return []


def _invalid_json(root: Path) -> list[str]:
    (root / TRAIN_JSON).write_text('{"images": [\n  {"id": 1,,}\n]}')
    return []


def _without(key: str) -> Callable[[Path], list[str]]:
    def edit(root: Path) -> list[str]:
        _edit_train(root, lambda data: data.pop(key))
        return []

    return edit


def _duplicate_image_id(root: Path) -> list[str]:
    _edit_train(root, lambda data: data["images"][0].update(id=2))
    return []


def _duplicate_annotation_id(root: Path) -> list[str]:
    _edit_train(root, lambda data: data["annotations"][2].update(id=11))
    return []


def _unknown_image(root: Path) -> list[str]:
    _edit_train(root, lambda data: data["annotations"][1].update(image_id=99))
    return []


def _unknown_category(root: Path) -> list[str]:
    _edit_train(root, lambda data: data["annotations"][1].update(category_id=7))
    return []


def _missing_image(root: Path) -> list[str]:
    (root / "train" / "b.png").unlink()
    return []


def _undecodable_image(root: Path) -> list[str]:
    (root / "train" / "a.jpg").write_bytes(b"this is not a jpeg at all")
    return []


def _wrong_size(root: Path) -> list[str]:
    _edit_train(root, lambda data: data["images"][0].update(width=41))
    return []


def _parent_file_name(root: Path) -> list[str]:
    write_image(root / "b.png", 32, 32)
    _edit_train(root, lambda data: data["images"][1].update(file_name="../b.png"))
    return []


def _absolute_file_name(root: Path) -> list[str]:
    _edit_train(root, lambda data: data["images"][1].update(file_name=str(root / "train" / "b.png")))
    return []


def _empty_split(root: Path) -> list[str]:
    _edit_train(root, lambda data: data.update(images=[], annotations=[]))
    return []


BROKEN_DATASETS = {
    "missing annotation file": (_missing_file, r"train/nope\.json: annotation file not found"),
    "unreadable annotation file": (_unreadable, r"_annotations\.coco\.json: annotation file cannot be read"),
    "invalid json": (_invalid_json, r"_annotations\.coco\.json: invalid JSON at line 2, column 12"),
    "no images": (_without("images"), r"_annotations\.coco\.json: no 'images' list"),
    "no annotations": (_without("annotations"), r"_annotations\.coco\.json: no 'annotations' list"),
    "no categories": (_without("categories"), r"_annotations\.coco\.json: no 'categories' list"),
    "duplicate image id": (_duplicate_image_id, r"\.json: images id 2 is used 2 times"),
    "duplicate annotation id": (_duplicate_annotation_id, r"\.json: annotations id 11 is used 2 times"),
    "unknown image": (
        _unknown_image,
        r"\.json: annotation id 11 points at image id 99, which is not in 'images'",
    ),
    "unknown category": (
        _unknown_category,
        r"\.json: annotation id 11 \(image id 1\) has category_id 7, which is not in 'categories'",
    ),
    "missing image": (_missing_image, r"\.json: image file not found: \S*train/b\.png \(image id 2\)"),
    "undecodable image": (_undecodable_image, r"cannot be decoded: \S*train/a\.jpg \(image id 1\)"),
    "wrong size": (
        _wrong_size,
        r"a\.jpg \(image id 1\) is 40x30 \(width x height\) but its record says 41x30",
    ),
    "file name with ..": (
        _parent_file_name,
        r"image id 2 has file_name '\.\./b\.png', which leaves the image folder",
    ),
    "absolute file name": (
        _absolute_file_name,
        r"image id 2 has file_name '/\S+/b\.png', which leaves the image",
    ),
    "empty split": (_empty_split, r"_annotations\.coco\.json: the train split has no images"),
}


@pytest.mark.parametrize("case", list(BROKEN_DATASETS))
def test_each_broken_dataset_gives_one_clear_message(roboflow_root: Path, capsys, case: str) -> None:
    breaker, expected = BROKEN_DATASETS[case]
    extra_args = breaker(roboflow_root)
    exit_code = main([str(roboflow_root), *extra_args])
    captured = capsys.readouterr()
    assert exit_code == 2
    assert "Traceback" not in captured.err
    failures = [line for line in captured.err.splitlines() if line.startswith("data check failed:")]
    assert len(failures) == 1, captured.err
    message = failures[0]
    assert re.search(expected, message), message
    assert "Fix:" in message


def test_command_exits_non_zero_without_traceback(roboflow_root: Path) -> None:
    _unknown_category(roboflow_root)
    result = subprocess.run(
        [sys.executable, "-m", "detr_lightning.data.check", str(roboflow_root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "has category_id 7, which is not in 'categories'" in result.stderr
    assert "RuntimeWarning" not in result.stderr


def test_report_lists_images_boxes_and_boxes_per_class(roboflow_root: Path, capsys) -> None:
    assert main([str(roboflow_root), "--label-mapping", "contiguous"]) == 0
    out = capsys.readouterr().out
    # contiguous: the unused id-0 category is gone; cat -> 0, dog -> 1 (crowd boxes not counted per class)
    assert re.search(r"│\s+0 │\s+1 │ cat\s+│\s+1 │\s+1 │\s+1 │", out), out
    assert re.search(r"│\s+1 │\s+3 │ dog\s+│\s+2 │\s+2 │\s+2 │", out), out
    assert "things" not in out
    # split summary: 3 images, 1 without boxes, 3 boxes, 1 crowd box
    assert re.search(r"│ train │ .* │\s+3 │\s+1 │\s+3 │\s+1 │\s+0 │", out), out
    assert "data check passed" in out


def test_fixable_boxes_are_repaired_and_counted_in_one_warning(tmp_path: Path, caplog) -> None:
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 20, 20, 20], "area": 400},  # clamped
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [12, 3, -10, -3]},  # negative, area filled
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4], "area": 0},  # zero area
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [40, 40, 5, 5], "area": 25},  # outside: zero area
        {"id": 5, "image_id": 2, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 1},
    ]
    ann_file = write_split(tmp_path / "train.json", tmp_path, coco_dict(annotations=annotations))
    with caplog.at_level(logging.WARNING):
        split = load_split(SplitFiles("train", ann_file, tmp_path))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        f"data: repaired {ann_file} (train split): 1 box with negative width/height made positive, "
        "1 box clamped to the image, 2 zero-area boxes dropped, 1 missing area filled from the box"
    ]
    boxes = {ann["id"]: ann["bbox"] for ann in split.data["annotations"]}
    assert boxes == {1: [30.0, 20.0, 10.0, 10.0], 2: [2.0, 0.0, 10.0, 3.0], 5: [1.0, 2.0, 3.0, 4.0]}
    assert split.data["annotations"][1]["area"] == 30.0
    assert [ann["iscrowd"] for ann in split.data["annotations"]] == [0, 0, 1]  # default 0 filled in
    assert split.coco.getAnnIds(imgIds=[2]) == [5]  # the pycocotools index sees the repaired list
