"""A small synthetic COCO set and model-like detections for it, plus a fake datamodule exposing them.

The set covers what moves COCO numbers: non-contiguous category ids, image ids out of file order, a crowd
box, an image without annotations, an ``area`` that differs from the box area (as mask areas do), all three
area ranges, jittered true positives, wrong classes, false positives, an unmapped model label and score ties.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torch.utils.data import DataLoader

from detr_lightning.metrics import coco_detections, coco_results

#: The 12 COCOeval stats in ``COCOeval.stats`` order, as torchmetrics names them.
STAT_KEYS = [
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
]

CATEGORIES = [
    {"id": 1, "name": "cat", "supercategory": "animal"},
    {"id": 3, "name": "dog", "supercategory": "animal"},
    {"id": 7, "name": "traffic light", "supercategory": "outdoor"},
]
# Model label -> category id; model label 3 has no category (a slot the data does not use).
LABEL_TO_CATEGORY_ID = {0: 1, 1: 3, 2: 7}
CLASS_NAMES = {0: "cat", 1: "dog", 2: "traffic light"}
UNMAPPED_LABEL = 3
# Ids out of file order on purpose; 5 has no annotations. Nine, so two ranks get a repeated image.
IMAGE_IDS = [42, 7, 13, 100, 5, 64, 9, 21, 30]
IMAGE_WITHOUT_ANNOTATIONS = 5
NUM_QUERIES = 25


def make_coco_dict(seed: int = 0) -> dict[str, Any]:
    """The annotation file as a dict: 9 images, ~5 objects each of all sizes, one crowd box."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in IMAGE_IDS:
        width, height = int(rng.integers(320, 640)), int(rng.integers(240, 480))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        if image_id == IMAGE_WITHOUT_ANNOTATIONS:
            continue
        for _ in range(int(rng.integers(3, 7))):
            side = float(rng.choice([12.0, 20.0, 50.0, 80.0, 150.0, 220.0]))
            w = round(side * float(rng.uniform(0.7, 1.3)), 2)
            h = round(side * float(rng.uniform(0.7, 1.3)), 2)
            x = round(float(rng.uniform(0, width - w)), 2)
            y = round(float(rng.uniform(0, height - h)), 2)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice([c["id"] for c in CATEGORIES])),
                    "bbox": [x, y, w, h],
                    # A polygon area, smaller than the box; COCOeval buckets sizes by this.
                    "area": round(w * h * float(rng.uniform(0.5, 0.9)), 2),
                    "iscrowd": 0,
                }
            )
    crowd_image = IMAGE_IDS[0]
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": crowd_image,
            "category_id": 3,
            "bbox": [10.0, 10.0, 120.0, 90.0],
            "area": 9000.0,
            "iscrowd": 1,
        }
    )
    return {
        "info": {"description": "synthetic"},
        "images": images,
        "annotations": annotations,
        "categories": copy.deepcopy(CATEGORIES),
    }


def make_coco(coco_dict: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` of an annotation dict (deep-copied: COCO keeps references)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(coco_dict)
    coco.createIndex()
    return coco


def make_detections(coco_dict: dict[str, Any], seed: int = 1) -> dict[int, dict[str, Tensor]]:
    """``NUM_QUERIES`` DETR-like detections per image: xyxy pixels, scores, model labels.

    Per object a jittered box (1 in 5 with the wrong class); one detection on the crowd box; random false
    positives, some with the unmapped label; two pairs of equal scores, within and across images.
    """
    rng = np.random.default_rng(seed)
    category_to_label = {c: label for label, c in LABEL_TO_CATEGORY_ID.items()}
    detections = {}
    for image in coco_dict["images"]:
        boxes, scores, labels = [], [], []
        for annotation in coco_dict["annotations"]:
            if annotation["image_id"] != image["id"]:
                continue
            x, y, w, h = annotation["bbox"]
            jitter = rng.normal(0.0, 0.08, size=4) * [w, h, w, h]
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            scores.append(rng.uniform(0.3, 1.0))
            label = category_to_label[annotation["category_id"]]
            labels.append(int(rng.integers(0, 3)) if rng.uniform() < 0.2 else label)
        while len(boxes) < NUM_QUERIES:
            x0, y0 = rng.uniform(0, image["width"] - 30), rng.uniform(0, image["height"] - 30)
            x1, y1 = rng.uniform(x0 + 5, image["width"]), rng.uniform(y0 + 5, image["height"])
            boxes.append([x0, y0, x1, y1])
            scores.append(rng.uniform(0.0, 0.6))
            labels.append(int(rng.integers(0, 4)))  # 3 = UNMAPPED_LABEL
        detections[image["id"]] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
    first, second = IMAGE_IDS[0], IMAGE_IDS[1]
    detections[first]["scores"][1] = detections[first]["scores"][0]
    detections[second]["scores"][0] = detections[first]["scores"][0]
    return detections


def perfect_detections(coco_dict: dict[str, Any]) -> dict[int, dict[str, Tensor]]:
    """The non-crowd ground truth itself, as detections with score 1 (xyxy, model labels)."""
    category_to_label = {c: label for label, c in LABEL_TO_CATEGORY_ID.items()}
    detections = {}
    for image in coco_dict["images"]:
        annotations = [
            a for a in coco_dict["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]
        ]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        detections[image["id"]] = {
            "boxes": boxes,
            "scores": torch.ones(len(annotations)),
            "labels": torch.tensor(
                [category_to_label[a["category_id"]] for a in annotations], dtype=torch.int64
            ),
        }
    return detections


def reference_cocoeval(
    coco_dict: dict[str, Any], results: list[dict[str, Any]] | Path, category_id: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """pycocotools ``COCOeval`` run directly: the 12 stats and the 12 lines ``summarize()`` prints.

    Args:
        coco_dict: the annotation file as a dict.
        results: COCO results rows, or a results file (read with ``json``, as COCO tools do).
        category_id: evaluate this category alone (what per-class AP is).
    """
    coco_gt = make_coco(coco_dict)
    rows = json.loads(Path(results).read_text()) if isinstance(results, Path) else copy.deepcopy(results)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(rows)
        evaluation = COCOeval(coco_gt, coco_dt, "bbox")
        if category_id is not None:
            evaluation.params.catIds = [category_id]
        evaluation.evaluate()
        evaluation.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluation.summarize()
    return evaluation.stats, printed.getvalue().splitlines()


class FakeDataModule(lightning.LightningDataModule):
    """What the evaluator reads from the real datamodule (``coco_gt(split)``, the label map, class names),
    and loaders whose batches are lists of image ids (a module looks detections up by id)."""

    def __init__(self, coco_dict: dict[str, Any], batch_size: int = 2) -> None:
        super().__init__()
        self.coco_dict = coco_dict
        self.batch_size = batch_size
        self.label_to_category_id = dict(LABEL_TO_CATEGORY_ID)
        self.class_names = dict(CLASS_NAMES)
        self._coco = make_coco(coco_dict)

    def coco_gt(self, split: str) -> COCO:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}")
        return self._coco

    def _loader(self) -> DataLoader:
        image_ids = [image["id"] for image in self.coco_dict["images"]]
        return DataLoader(image_ids, batch_size=self.batch_size, collate_fn=list)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


def detections_to_coco_results(image_ids, detections, label_to_category_id) -> list[dict]:
    """Model detections (xyxy, model labels) as the rows of a COCO results file, as the evaluator writes."""
    return coco_results(image_ids, coco_detections(detections, label_to_category_id))
