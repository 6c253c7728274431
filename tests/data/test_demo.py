from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import detr_lightning.data.demo as demo
from detr_lightning.data.check import check_dataset
from detr_lightning.data.errors import DataError
from detr_lightning.data.layout import resolve_layout

SMALL = {"num_train": 8, "num_val": 4, "num_test": 3}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def test_generation_is_deterministic_and_prefix_stable(tmp_path: Path) -> None:
    demo.write_demo_dataset(tmp_path / "a", **SMALL)
    demo.write_demo_dataset(tmp_path / "b", **SMALL)
    first = _files(tmp_path / "a")
    assert len(first) == 3 + 8 + 4 + 3
    assert first == _files(tmp_path / "b")
    demo.write_demo_dataset(tmp_path / "c", num_train=5, num_val=0, num_test=0)
    assert _files(tmp_path / "c")["train/train_0004.jpg"] == first["train/train_0004.jpg"]
    demo.write_demo_dataset(tmp_path / "d", seed=1, **SMALL)
    assert _files(tmp_path / "d")["train/train_0004.jpg"] != first["train/train_0004.jpg"]


def test_demo_has_the_quirks_of_real_exports(tmp_path: Path) -> None:
    demo.write_demo_dataset(tmp_path, num_train=30, num_val=5, num_test=5)
    train = json.loads((tmp_path / "train" / "_annotations.coco.json").read_text())
    val = json.loads((tmp_path / "valid" / "_annotations.coco.json").read_text())
    assert {c["id"]: c["name"] for c in train["categories"]} == {
        0: "shapes",
        1: "square",
        2: "disc",
        4: "triangle",
    }
    annotated = {ann["category_id"] for ann in train["annotations"]}
    assert annotated == {1, 2, 4}  # the id-0 supercategory has none
    assert [ann["image_id"] for ann in train["annotations"] if ann["iscrowd"]] == [2]
    assert [ann["image_id"] for ann in val["annotations"] if ann["iscrowd"]] == [2]
    assert {image["id"] for image in train["images"]} - {ann["image_id"] for ann in train["annotations"]} >= {
        1
    }
    modes = {
        image["id"]: Image.open(tmp_path / "train" / image["file_name"]).mode for image in train["images"]
    }
    assert [image_id for image_id, mode in modes.items() if mode == "L"] == [3]
    sizes = [ann["bbox"][2] for ann in train["annotations"] if not ann["iscrowd"]]
    assert min(sizes) >= 15 and max(sizes) <= 80 and max(sizes) - min(sizes) > 30
    per_image = [
        sum(ann["image_id"] == image["id"] for ann in train["annotations"]) for image in train["images"]
    ]
    assert max(per_image) <= 4 and len(set(per_image)) >= 3
    assert all(128 <= image[side] <= 192 for image in train["images"] for side in ("width", "height"))

    splits, label_map = check_dataset(resolve_layout(tmp_path), "raw")
    assert list(splits) == ["train", "val", "test"] and label_map.num_classes == 5
    assert check_dataset(resolve_layout(tmp_path), "contiguous", check_images=False)[1].num_classes == 3


def test_ensure_writes_once_and_atomically(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data" / "demo"
    assert demo.ensure_demo_dataset(root, **SMALL) == root
    marker = root / "train" / "marker"
    marker.write_text("kept")
    demo.ensure_demo_dataset(root, **SMALL)  # already there: nothing rewritten
    assert marker.read_text() == "kept"
    assert sorted(path.name for path in root.parent.iterdir()) == ["demo"]  # no staging folder left

    def interrupted(out: Path, **options: int) -> None:
        demo.write_demo_split(out / "train", "train", 2, 0, min_side=128, max_side=192)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "write_demo_dataset", interrupted)
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_dataset(other)
    assert not other.exists() and not list(tmp_path.glob(".other*"))


def test_ensure_refuses_a_folder_with_other_content(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists but holds no complete dataset"):
        demo.ensure_demo_dataset(tmp_path)


def test_command_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert demo.main([str(out), "--num-train", "3", "--num-val", "2", "--num-test", "2"]) == 0
    assert "wrote the demo dataset" in capsys.readouterr().out
    assert len(list((out / "train").glob("*.jpg"))) == 3
    assert demo.main([str(out)]) == 0
    assert "already holds a dataset" in capsys.readouterr().out
    assert demo.main([str(tmp_path / "none"), "--num-train", "-3"]) == 2  # nothing written, one message
    assert (
        "split sizes must be 1 or more train" in capsys.readouterr().err and not (tmp_path / "none").exists()
    )


def test_crowded_variant_has_more_and_smaller_shapes(tmp_path: Path) -> None:
    demo.write_demo_dataset(tmp_path / "plain", num_train=30, num_val=0, num_test=0)
    demo.write_demo_dataset(
        tmp_path / "crowded", num_train=30, num_val=5, num_test=5, **demo.CROWDED_DEMO_OPTIONS
    )

    def objects(root: Path) -> tuple[list[dict], list[dict]]:
        coco = json.loads((root / "train" / "_annotations.coco.json").read_text())
        return coco["images"], [ann for ann in coco["annotations"] if not ann["iscrowd"]]

    plain_images, plain = objects(tmp_path / "plain")
    images, crowded = objects(tmp_path / "crowded")
    assert len(crowded) > 2 * len(plain)
    assert all(10 <= ann["bbox"][2] <= 40 for ann in crowded)
    assert sum(ann["bbox"][2] for ann in crowded) / len(crowded) < sum(ann["bbox"][2] for ann in plain) / len(
        plain
    )
    per_image = [sum(ann["image_id"] == image["id"] for ann in crowded) for image in images]
    assert max(per_image) <= 10 and per_image[1] == 0  # image 1 stays empty
    assert all(192 <= image[side] <= 256 for image in images for side in ("width", "height"))
    assert (
        check_dataset(resolve_layout(tmp_path / "crowded"), "contiguous", check_images=False)[1].num_classes
        == 3
    )


def test_bad_object_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="min_object_size"):
        demo.write_demo_dataset(
            tmp_path, num_train=1, num_val=0, num_test=0, min_object_size=30, max_object_size=20
        )
    with pytest.raises(DataError, match="max_objects"):
        demo.write_demo_dataset(tmp_path, num_train=1, num_val=0, num_test=0, max_objects=0)


def test_command_line_crowded(tmp_path: Path) -> None:
    out = tmp_path / "crowded"
    assert demo.main([str(out), "--crowded", "--num-train", "3", "--num-val", "1", "--num-test", "1"]) == 0
    widths = [
        image["width"]
        for image in json.loads((out / "train" / "_annotations.coco.json").read_text())["images"]
    ]
    assert all(192 <= width <= 256 for width in widths)


def test_realistic_variant_has_coco_like_sizes_and_parallel_drawing_writes_the_same_files(
    tmp_path: Path,
) -> None:
    counts = ["--num-train", "4", "--num-val", "0", "--num-test", "0"]
    assert demo.main([str(tmp_path / "a"), "--realistic", *counts]) == 0
    assert demo.main([str(tmp_path / "b"), "--realistic", *counts, "--processes", "2"]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    train = json.loads((tmp_path / "a" / "train" / "_annotations.coco.json").read_text())
    assert all(640 <= image[side] <= 1024 for image in train["images"] for side in ("width", "height"))
    shapes = [ann for ann in train["annotations"] if not ann["iscrowd"]]
    per_image = [sum(ann["image_id"] == image["id"] for ann in shapes) for image in train["images"]]
    assert per_image[demo.EMPTY_IMAGE_INDEX] == 0 and max(per_image) <= 20 and sum(per_image) >= 4
    assert all(16 <= ann["bbox"][2] <= 320 for ann in shapes)
