"""Builders of tiny COCO files and images for the data tests (written into tmp_path by the tests)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CATEGORIES = [
    {"id": 0, "name": "things", "supercategory": "none"},
    {"id": 1, "name": "cat", "supercategory": "things"},
    {"id": 3, "name": "dog", "supercategory": "things"},
]
IMAGES = [
    {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
    {"id": 2, "file_name": "b.png", "width": 32, "height": 32},
    {"id": 3, "file_name": "c.jpg", "width": 24, "height": 36},  # no objects
]
ANNOTATIONS = [
    {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
    {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 10, 15, 12], "area": 180, "iscrowd": 0},
    {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 32, 32], "area": 1024, "iscrowd": 0},
    {"id": 13, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 1},
]


def coco_dict(
    images: list[dict] | None = None,
    annotations: list[dict] | None = None,
    categories: list[dict] | None = None,
) -> dict[str, Any]:
    """A COCO annotation dict; defaults to the valid three-image set above (deep copies)."""
    return {
        "info": {},
        "images": copy.deepcopy(IMAGES if images is None else images),
        "annotations": copy.deepcopy(ANNOTATIONS if annotations is None else annotations),
        "categories": copy.deepcopy(CATEGORIES if categories is None else categories),
    }


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
    """A small noisy image of the given size and PIL mode; the suffix picks the format."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if mode == "P":
        image = image.quantize(16)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)


def write_split(ann_file: Path, img_dir: Path, data: dict[str, Any] | None = None) -> Path:
    """Write ``data`` (default `coco_dict()`) to ``ann_file`` and an image file per image record."""
    data = coco_dict() if data is None else data
    for index, image in enumerate(data["images"]):
        write_image(img_dir / image["file_name"], image["width"], image["height"], seed=index)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(data), encoding="utf-8")
    return ann_file
