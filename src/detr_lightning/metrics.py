"""COCO box mAP with the numbers pycocotools prints: plain functions around torchmetrics'
:class:`~torchmetrics.detection.MeanAveragePrecision`, driven by the ``CocoEvaluator`` callback.

Exact parity with ``pycocotools.cocoeval.COCOeval`` on the annotation file and a results file rests on
these choices, each tested:

- IoU and recall thresholds are float64 ``np.linspace`` values, as pycocotools builds them (torchmetrics'
  float32 defaults shift some of the 12 stats).
- Ground truth is read from the annotation file as it is: ``bbox`` xywh (float64, never converted to
  xyxy and back), ``iscrowd`` and ``area`` (not recomputed; 0 stays "small"), original category ids.
- Images are evaluated in ascending image id, as pycocotools orders them, so score ties across images
  are broken the same way.
- Detections enter the metric and the results file as the same xywh numbers (computed in float32 like the
  official DETR evaluation, written with the fewest digits that keep the float32 value), so re-scoring
  the file gives the logged numbers bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert

from detr_lightning.coco_summary import COCO_MAX_DETECTIONS, COCO_SUMMARY_KEYS
from detr_lightning.coco_summary import coco_summary_lines as coco_summary_lines  # re-exported

COCO_IOU_THRESHOLDS: list[float] = np.linspace(0.5, 0.95, 10).tolist()
COCO_RECALL_THRESHOLDS: list[float] = np.linspace(0.0, 1.0, 101).tolist()
# torchmetrics replaces an area of 0 by the box area; COCOeval keeps 0, which falls in "small" only. A
# tiny positive area falls in the same buckets.
_ZERO_AREA = 1e-12


def build_map_metric(
    backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval",
    class_metrics: bool = True,
    sync_on_compute: bool = True,
) -> MeanAveragePrecision:
    """A box mAP metric that reproduces ``COCOeval`` exactly, fed as :func:`evaluate_coco_detections` does.

    ``class_metrics`` adds ``map_per_class`` and ``mar_100_per_class`` (a COCOeval run per class);
    ``sync_on_compute`` gathers the states of all ranks in ``compute()``: off when one rank has the whole
    split, or ``compute()`` waits for the others.
    """
    return MeanAveragePrecision(
        box_format="xywh",
        iou_type="bbox",
        iou_thresholds=COCO_IOU_THRESHOLDS,
        rec_thresholds=COCO_RECALL_THRESHOLDS,
        max_detection_thresholds=COCO_MAX_DETECTIONS,
        class_metrics=class_metrics,
        backend=backend,
        sync_on_compute=sync_on_compute,
    )


def coco_detections(
    detections: Sequence[Mapping[str, Tensor]], label_to_category_id: Mapping[int, int]
) -> list[dict[str, Tensor]]:
    """Model detections in COCO terms, on the CPU.

    Takes per image ``boxes (Q, 4)`` absolute xyxy, ``scores (Q,)`` and ``labels (Q,)`` model labels;
    returns per image ``boxes (N, 4)`` xywh, ``scores (N,)`` and ``labels (N,)`` int64 category ids. Labels
    without a category id (e.g. the unused slot 0 of a raw COCO mapping) are dropped: COCOeval ignores
    them anyway. Boxes and scores are float64 holding the shortest decimal of their float32 value
    (``452.22375``, not ``452.2237548828125``): short results files, the same numbers as the metric.
    """
    converted = []
    for detection in detections:
        keep, category_ids = map_labels(detection["labels"], label_to_category_id)
        boxes = detection["boxes"].detach().cpu()[keep].float()
        converted.append(
            {
                "boxes": _shortest_decimal(box_convert(boxes, "xyxy", "xywh")),
                "scores": _shortest_decimal(detection["scores"].detach().cpu()[keep]),
                "labels": category_ids,
            }
        )
    return converted


def map_labels(labels: Tensor, mapping: Mapping[int, int]) -> tuple[Tensor, Tensor]:
    """``labels (N,)`` through ``mapping``: which of them it maps (``(N,)`` bool) and their values
    (``(M,)`` int64, in order); labels it lacks are left out."""
    values = labels.tolist()
    keep = torch.tensor([value in mapping for value in values], dtype=torch.bool)
    return keep, torch.tensor([mapping[value] for value in values if value in mapping], dtype=torch.int64)


def _shortest_decimal(values: Tensor) -> Tensor:
    """float32 values as float64 CPU values of their shortest round-trip decimal (numpy's ``str``)."""
    return torch.from_numpy(values.float().cpu().numpy().astype(str).astype(np.float64))


def coco_ground_truth(coco_gt: Any, image_ids: Sequence[int]) -> list[dict[str, Tensor]]:
    """Ground truth of ``image_ids`` from the annotation file's ``COCO`` index, as COCOeval reads it: per
    image ``boxes (M, 4)`` float64 xywh, ``labels (M,)`` int64 category ids, ``iscrowd (M,)`` int64 and
    ``area (M,)`` float64, as in the file, crowd boxes included."""
    ground_truth = []
    for image_id in image_ids:
        if image_id not in coco_gt.imgs:
            raise ValueError(
                f"image id {image_id} is not in the annotation file's images; the evaluation step must "
                "return the ids of the file (the 'id' of each entry of 'images')"
            )
        # COCOeval keeps only annotations of categories the file lists; file order is kept.
        annotations = [a for a in coco_gt.imgToAnns[image_id] if a["category_id"] in coco_gt.cats]
        ground_truth.append(
            {
                "boxes": torch.tensor([a["bbox"] for a in annotations], dtype=torch.float64).reshape(-1, 4),
                "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
                "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in annotations], dtype=torch.int64),
                "area": torch.tensor([a["area"] or _ZERO_AREA for a in annotations], dtype=torch.float64),
            }
        )
    return ground_truth


def unique_images(
    image_ids: Sequence[int], detections: Sequence[Mapping[str, Tensor]]
) -> tuple[list[int], list[Mapping[str, Tensor]]]:
    """Sort images by id and keep the first entry of a repeated id (distributed samplers repeat images to
    give every rank as many; COCO counts every image once)."""
    first_of_image: dict[int, Mapping[str, Tensor]] = {}
    for image_id, detection in zip(image_ids, detections, strict=True):
        first_of_image.setdefault(int(image_id), detection)
    sorted_ids = sorted(first_of_image)
    return sorted_ids, [first_of_image[image_id] for image_id in sorted_ids]


def evaluate_coco_detections(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, Tensor]],
    coco_gt: Any,
    backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval",
    class_metrics: bool = True,
) -> dict[str, Tensor]:
    """COCO box mAP of :func:`coco_detections` outputs (one per image id; a repeated id counts once)
    against the annotation file's ``COCO`` index, computed in this process: torchmetrics' result, 0-dim
    float32 ``map``, ``map_50``, ..., ``mar_large`` (the 12 COCO stats, -1 where nothing qualifies), and
    ``map_per_class (K,)``, ``mar_100_per_class (K,)``, ``classes (K,)``."""
    sorted_ids, sorted_detections = unique_images(image_ids, detections)
    metric = build_map_metric(backend=backend, class_metrics=class_metrics, sync_on_compute=False)
    predictions = [{key: d[key].cpu() for key in ("boxes", "scores", "labels")} for d in sorted_detections]
    metric.update(predictions, coco_ground_truth(coco_gt, sorted_ids))
    return metric.compute()


def coco_results(
    image_ids: Sequence[int], detections: Sequence[Mapping[str, Tensor]]
) -> list[dict[str, Any]]:
    """Outputs of :func:`coco_detections`, one per image id, as rows of a COCO results file: exactly the
    numbers the metric sees (rounding them further would move boxes across IoU thresholds and tie scores)."""
    rows = []
    for image_id, detection in zip(image_ids, detections, strict=True):
        boxes, scores = detection["boxes"].tolist(), detection["scores"].tolist()
        rows.extend(
            {"image_id": int(image_id), "category_id": category_id, "bbox": box, "score": score}
            for box, score, category_id in zip(boxes, scores, detection["labels"].tolist(), strict=True)
        )
    return rows


def category_names(coco_gt: Any) -> dict[int, str]:
    """Category id -> name of an annotation file's ``COCO`` index."""
    return {category_id: str(category["name"]) for category_id, category in coco_gt.cats.items()}


def per_class_values(result: Mapping[str, Tensor]) -> list[tuple[int, float, float]]:
    """``(category id, AP, AR@100)`` per class of a result; empty without ``class_metrics``."""
    classes = result["classes"].reshape(-1).tolist()
    average_precisions = result["map_per_class"].reshape(-1).tolist()
    average_recalls = result[f"mar_{COCO_MAX_DETECTIONS[-1]}_per_class"].reshape(-1).tolist()
    if len(average_precisions) != len(classes):  # class_metrics=False gives a single -1
        return []
    return list(zip(classes, average_precisions, average_recalls, strict=True))


def per_class_table(result: Mapping[str, Tensor], class_names: Mapping[int, str]) -> Table:
    """A rich table of AP and AR per category of the result (category id -> name in ``class_names``); a
    class without ground truth in the evaluated images has no AP (COCOeval's -1) and shows ``-``."""
    table = Table(title="AP per class")
    table.add_column("class")
    for column in ("id", "AP@[.50:.95]", f"AR@{COCO_MAX_DETECTIONS[-1]}"):
        table.add_column(column, justify="right")
    for category_id, *values in per_class_values(result):
        figures = ["-" if value < 0 else f"{value:0.3f}" for value in values]  # AP, AR
        table.add_row(escape(str(class_names.get(category_id, category_id))), str(category_id), *figures)
    return table


def flatten_map_result(
    result: Mapping[str, Tensor], prefix: str, class_names: Mapping[int, str] | None = None
) -> dict[str, float]:
    """Loggable scalars of a metric result: ``{prefix}/map``, ..., ``{prefix}/mar_large`` (the 12 COCO stats)
    and ``{prefix}/ap/<class name>`` per class that has ground truth (``class_names``: category id -> name,
    else the id; a name used by two categories gets ``_<id>`` appended)."""
    class_names = class_names or {}
    scalars = {f"{prefix}/{key}": float(result[key]) for key in COCO_SUMMARY_KEYS}
    per_class = per_class_values(result)
    names = [str(class_names.get(category_id, category_id)) for category_id, _, _ in per_class]
    for (category_id, average_precision, _), name in zip(per_class, names, strict=True):
        if average_precision >= 0:
            unique_name = name if names.count(name) == 1 else f"{name}_{category_id}"
            scalars[f"{prefix}/ap/{unique_name}"] = average_precision
    return scalars
