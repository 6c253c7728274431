from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_lightning.data.annotations import build_coco
from detr_lightning.data.categories import build_label_map
from detr_lightning.data.coco import CocoDetection, convert_coco_annotations
from detr_lightning.data.errors import DataError
from detr_lightning.data.images import read_image_rgb, verify_image_files
from detr_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .builders import coco_dict, write_image, write_split


def _dataset(tmp_path: Path, data: dict | None = None, mode: str = "raw") -> CocoDetection:
    data = coco_dict() if data is None else data
    ann_file = write_split(tmp_path / "ann.json", tmp_path, data)
    label_map = build_label_map([(ann_file, data)], mode)
    return CocoDetection(build_coco(data), tmp_path, label_map, ann_file=ann_file)


def test_official_target_conversion() -> None:
    annotations = [
        {"category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
        {"category_id": 3, "bbox": [30, 20, 20, 20], "area": 400},  # no iscrowd key: kept, clamped to 40x30
        {"category_id": 3, "bbox": [5, 5, 3, 3], "area": 9, "iscrowd": 1},  # crowd: left out
        {"category_id": 1, "bbox": [45, 5, 3, 3], "area": 9, "iscrowd": 0},  # outside: clamped to nothing
        {"category_id": 1, "bbox": [5, 5, 0, 3], "area": 0, "iscrowd": 0},  # degenerate
    ]
    target = convert_coco_annotations(annotations, height=30, width=40, category_to_label={1: 0, 3: 1})
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 11.0], [30.0, 20.0, 40.0, 30.0]])
    )
    assert target["labels"].tolist() == [0, 1]
    assert target["area"].tolist() == [80.0, 400.0]
    assert target["iscrowd"].tolist() == [0, 0]
    empty = convert_coco_annotations([], height=30, width=40, category_to_label={})
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64


def test_items_follow_the_contract(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path)
    assert len(dataset) == 3 and dataset.image_ids == [1, 2, 3]
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    raw = read_image_rgb(tmp_path / "a.jpg").float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(image, (raw - mean) / std)
    # bbox [2, 3, 10, 8] on a 40x30 image -> cxcywh (7, 7, 10, 8) / (40, 30, 40, 30)
    torch.testing.assert_close(target["boxes"][0], torch.tensor([7 / 40, 7 / 30, 10 / 40, 8 / 30]))
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (2, 4)
    assert target["labels"].tolist() == [1, 3] and target["labels"].dtype == torch.int64
    assert (
        target["image_id"].dtype == torch.int64 and target["image_id"].shape == () and target["image_id"] == 1
    )
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]
    assert target["orig_size"].dtype == torch.int64 and target["size"].dtype == torch.int64
    assert target["area"].dtype == torch.float32 and target["area"].tolist() == [80.0, 180.0]
    assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0, 0]

    _, crowd_image_target = dataset[1]
    assert crowd_image_target["labels"].tolist() == [3]  # the crowd cat box is not a training target
    empty_image, empty_target = dataset[2]
    assert empty_image.shape == (3, 36, 24)
    assert empty_target["boxes"].shape == (0, 4) and empty_target["labels"].shape == (0,)


def test_contiguous_labels_in_targets(tmp_path: Path) -> None:
    _, target = _dataset(tmp_path, mode="contiguous")[0]
    assert target["labels"].tolist() == [0, 1]  # cat (id 1) -> 0, dog (id 3) -> 1


@pytest.mark.parametrize(
    ("file_name", "mode"), [("g.png", "L"), ("g.jpg", "L"), ("a.png", "RGBA"), ("p.png", "P")]
)
def test_grayscale_alpha_and_palette_images_become_rgb(tmp_path: Path, file_name: str, mode: str) -> None:
    write_image(tmp_path / file_name, 20, 10, mode=mode)
    image = read_image_rgb(tmp_path / file_name)
    assert image.shape == (3, 10, 20) and image.dtype == torch.uint8
    expected = np.array(Image.open(tmp_path / file_name).convert("RGB"))
    if file_name.endswith(".png"):  # lossless: exactly what PIL shows
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    if mode == "L":
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def _rotated_jpeg(path: Path) -> None:
    """A 30x20 (width x height) JPEG whose EXIF says 'rotate 90°': displayed as 20x30."""
    image = Image.new("RGB", (30, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif)


def test_exif_orientation_is_applied_when_the_record_has_the_displayed_size(tmp_path: Path) -> None:
    _rotated_jpeg(tmp_path / "r.jpg")
    records = [{"id": 5, "file_name": "r.jpg", "width": 20, "height": 30}]
    assert verify_image_files(records, tmp_path, tmp_path / "ann.json") == frozenset()
    data = coco_dict(images=records, annotations=[])
    dataset = CocoDetection(build_coco(data), tmp_path, build_label_map([(tmp_path, data)]))
    assert dataset[0][0].shape == (3, 30, 20)


def test_exif_orientation_is_skipped_when_the_record_has_the_stored_size(tmp_path: Path) -> None:
    _rotated_jpeg(tmp_path / "r.jpg")
    records = [{"id": 5, "file_name": "r.jpg", "width": 30, "height": 20}]
    read_unrotated = verify_image_files(records, tmp_path, tmp_path / "ann.json")
    assert read_unrotated == frozenset({5})
    data = coco_dict(images=records, annotations=[])
    label_map = build_label_map([(tmp_path, data)])
    dataset = CocoDetection(build_coco(data), tmp_path, label_map, images_read_unrotated=read_unrotated)
    assert dataset[0][0].shape == (3, 20, 30)
    with pytest.raises(DataError, match=r"is 20x30 \(width x height\) but its record says 30x20"):
        CocoDetection(build_coco(data), tmp_path, label_map)[0]  # without the check's finding


def test_undecodable_image_at_load_time_is_a_data_error(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"b\.png \(image id 2\) cannot be decoded.*Fix:"):
        dataset[1]
