"""COCO box mAP with the numbers pycocotools prints: evaluation, summary lines, tables, results files.

Plain functions around torchmetrics' :class:`~torchmetrics.detection.MeanAveragePrecision`; no Lightning
here (the :class:`~detr_lightning.callbacks.CocoEvaluator` callback drives them during fit and test).

Exact parity with ``pycocotools.cocoeval.COCOeval`` run on the annotation file and a results file rests on
these choices, each tested:

- IoU and recall thresholds are float64 ``np.linspace`` values, as pycocotools builds them (torchmetrics'
  own defaults are float32 and shift ~3 of the 12 stats by ~2e-5).
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

from detr_lightning.coco_summary import COCO_MAX_DETECTIONS, max_detections
from detr_lightning.coco_summary import coco_summary_lines as coco_summary_lines  # for the callbacks

COCO_IOU_THRESHOLDS: list[float] = np.linspace(0.5, 0.95, 10).tolist()
COCO_RECALL_THRESHOLDS: list[float] = np.linspace(0.0, 1.0, 101).tolist()
# torchmetrics replaces an area of 0 by the box area; COCOeval keeps 0, which falls in "small" only. A
# tiny positive area falls in the same buckets.
_ZERO_AREA = 1e-12

_PER_CLASS_KEYS = ("map_per_class", "classes")


def build_map_metric(
    backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval",
    class_metrics: bool = True,
    sync_on_compute: bool = True,
) -> MeanAveragePrecision:
    """A box mAP metric that reproduces ``COCOeval`` exactly.

    Feed it boxes in COCO's xywh (absolute pixels): ``update(preds, target)`` with the outputs of
    :func:`coco_detections` and :func:`coco_ground_truth`, in ascending image id (see
    :func:`evaluate_coco_detections`, which does all of that).

    Args:
        backend: COCOeval implementation; ``faster_coco_eval`` (C++, ~3x faster) gives the same numbers.
        class_metrics: also compute ``map_per_class`` and ``mar_100_per_class`` (one more COCOeval run per
            class at compute time).
        sync_on_compute: gather the states of all ranks in ``compute()`` (torchmetrics' default); turn off
            when the metric is fed the whole split on one rank, or ``compute()`` waits for the others.
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
    """Model detections of a batch in COCO terms: xywh boxes and category ids, on the CPU.

    A label without a category id (e.g. the unused slot 0 of a raw COCO mapping) is dropped: COCOeval
    ignores a category the annotation file does not list, so the numbers are the same either way, and the
    results file stays valid.

    Boxes (converted to xywh in float32, as the official DETR evaluation does) and scores come back as
    float64 holding the shortest decimal that reads back as the same float32 (``452.22375``, not
    ``452.2237548828125``): results files stay short, and the metric sees exactly what the file holds.

    Args:
        detections: per image ``boxes (Q, 4)`` absolute xyxy, ``scores (Q,)``, ``labels (Q,)`` int64
            model labels.
        label_to_category_id: model label -> COCO category id.

    Returns:
        Per image ``boxes (N, 4)`` float64 xywh, ``scores (N,)`` float64, ``labels (N,)`` int64 category ids,
        ``N <= Q``, in the input's order.
    """
    if not detections:
        return []
    lookup_size = max(label_to_category_id, default=-1) + 1
    category_lookup = torch.full((lookup_size,), -1, dtype=torch.int64)
    for label, category_id in label_to_category_id.items():
        category_lookup[int(label)] = int(category_id)
    category_lookup = category_lookup.to(detections[0]["labels"].device)

    converted = []
    for detection in detections:
        labels = detection["labels"].long()
        in_lookup = (labels >= 0) & (labels < lookup_size)
        category_ids = torch.full_like(labels, -1)
        category_ids[in_lookup] = category_lookup[labels[in_lookup]]
        keep = category_ids >= 0
        x0, y0, x1, y1 = detection["boxes"][keep].detach().float().unbind(-1)
        converted.append(
            {
                "boxes": _shortest_decimal(torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)),
                "scores": _shortest_decimal(detection["scores"][keep].detach()),
                "labels": category_ids[keep].cpu(),
            }
        )
    return converted


def _shortest_decimal(values: Tensor) -> Tensor:
    """float32 values as float64 CPU values of their shortest round-trip decimal (numpy's ``str``)."""
    as_text = values.float().cpu().numpy().astype(str)
    return torch.from_numpy(as_text.astype(np.float64))


def coco_ground_truth(coco_gt: Any, image_ids: Sequence[int]) -> list[dict[str, Tensor]]:
    """Ground truth of some images, read from the annotation file as COCOeval reads it.

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` (or faster_coco_eval ``COCO``) of the annotation file.
        image_ids: ids of the images, in the order wanted.

    Returns:
        Per image ``boxes (M, 4)`` float64 xywh as in the file, ``labels (M,)`` int64 category ids,
        ``iscrowd (M,)`` int64, ``area (M,)`` float64 from the file (not the box area; 0 stays in the
        "small" bucket as in COCOeval); crowd boxes included (COCOeval matches detections to them without
        counting them as misses).
    """
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
    """Sort images by id and keep the first entry of a repeated id.

    Distributed samplers repeat images to give every rank as many; COCO counts every image once, and
    COCOeval goes through images in ascending id.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(image_ids)} image ids but {len(detections)} detection entries")
    first_index_of_image: dict[int, int] = {}
    for index, image_id in enumerate(image_ids):
        first_index_of_image.setdefault(int(image_id), index)
    sorted_ids = sorted(first_index_of_image)
    return sorted_ids, [detections[first_index_of_image[image_id]] for image_id in sorted_ids]


def evaluate_coco_detections(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, Tensor]],
    coco_gt: Any,
    backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval",
    class_metrics: bool = True,
) -> dict[str, Tensor]:
    """COCO box mAP of detections in COCO terms against the annotation file, computed here alone.

    The whole set is evaluated in this process: nothing is gathered from other ranks.

    Args:
        image_ids: one id per entry of ``detections``; repeats count once (the first is kept).
        detections: outputs of :func:`coco_detections` (xywh boxes, category-id labels).
        coco_gt: the ``COCO`` object of the annotation file.
        backend, class_metrics: as in :func:`build_map_metric`.

    Returns:
        torchmetrics' result: 0-dim float32 ``map``, ``map_50``, ``map_75``, ``map_small|medium|large``,
        ``mar_1|10|100``, ``mar_small|medium|large`` (-1 where nothing qualifies, as COCOeval), and
        ``map_per_class (K,)``, ``mar_100_per_class (K,)``, ``classes (K,)`` category ids.
    """
    sorted_ids, sorted_detections = unique_images(image_ids, detections)
    metric = build_map_metric(backend=backend, class_metrics=class_metrics, sync_on_compute=False)
    metric.update(
        [
            {key: detection[key].cpu() for key in ("boxes", "scores", "labels")}
            for detection in sorted_detections
        ],
        coco_ground_truth(coco_gt, sorted_ids),
    )
    return metric.compute()


def coco_results(
    image_ids: Sequence[int], detections: Sequence[Mapping[str, Tensor]]
) -> list[dict[str, Any]]:
    """Detections in COCO terms as rows of a COCO results file (``loadRes`` input).

    Numbers are exactly those the metric sees (see :func:`coco_detections`), so re-scoring the file gives
    the logged figures; rounding them further would move boxes across IoU thresholds and tie scores.

    Args:
        image_ids: one id per entry of ``detections``.
        detections: outputs of :func:`coco_detections`.

    Returns:
        ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per detection, image by image.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(image_ids)} image ids but {len(detections)} detection entries")
    rows = []
    for image_id, detection in zip(image_ids, detections, strict=True):
        boxes = detection["boxes"].cpu().tolist()
        scores = detection["scores"].cpu().tolist()
        category_ids = detection["labels"].cpu().tolist()
        rows.extend(
            {"image_id": int(image_id), "category_id": category_id, "bbox": box, "score": score}
            for box, score, category_id in zip(boxes, scores, category_ids, strict=True)
        )
    return rows


def detections_to_coco_results(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, Tensor]],
    label_to_category_id: Mapping[int, int],
) -> list[dict[str, Any]]:
    """Model detections (xyxy, model labels) as rows of a COCO results file.

    Args:
        image_ids: one COCO image id per entry of ``detections``.
        detections: per image ``boxes (Q, 4)`` absolute xyxy, ``scores (Q,)``, ``labels (Q,)`` model labels.
        label_to_category_id: model label -> COCO category id; other labels are dropped.
    """
    return coco_results(image_ids, coco_detections(detections, label_to_category_id))


def _per_class_values(result: Mapping[str, Tensor]) -> list[tuple[int, float, float]]:
    """``(category id, AP, AR@maxDets)`` per class; empty without ``class_metrics``."""
    classes = result.get("classes")
    average_precisions = result.get("map_per_class")
    if classes is None or average_precisions is None:
        return []
    average_precisions = average_precisions.reshape(-1)
    recall_key = f"mar_{max_detections(result)[-1]}_per_class"
    average_recalls = result[recall_key].reshape(-1)
    classes = classes.reshape(-1)
    if len(average_precisions) != len(classes):  # class_metrics=False gives a single -1
        return []
    return [
        (int(c), float(ap), float(ar))
        for c, ap, ar in zip(
            classes.tolist(), average_precisions.tolist(), average_recalls.tolist(), strict=True
        )
    ]


def per_class_table(result: Mapping[str, Tensor], class_names: Mapping[int, str]) -> Table:
    """A rich table of AP and AR per class, one row per category of the result.

    Args:
        result: a metric result computed with ``class_metrics=True``.
        class_names: category id -> name; ids without a name show the id.

    A class with no ground truth in the evaluated images has no AP (COCOeval's -1) and shows ``-``.
    """
    recall_at = max_detections(result)[-1]
    table = Table(title="AP per class")
    table.add_column("class")
    table.add_column("id", justify="right")
    table.add_column("AP@[.50:.95]", justify="right")
    table.add_column(f"AR@{recall_at}", justify="right")
    for category_id, average_precision, average_recall in _per_class_values(result):
        table.add_row(
            escape(str(class_names.get(category_id, category_id))),
            str(category_id),
            "-" if average_precision < 0 else f"{average_precision:0.3f}",
            "-" if average_recall < 0 else f"{average_recall:0.3f}",
        )
    return table


def flatten_map_result(
    result: Mapping[str, Tensor], prefix: str, class_names: Mapping[int, str] | None = None
) -> dict[str, float]:
    """Loggable scalars of a metric result.

    Args:
        result: a metric result.
        prefix: the split, e.g. ``"val"``.
        class_names: category id -> name for the per-class keys (the id when absent).

    Returns:
        ``{prefix}/map``, ``{prefix}/map_50``, ..., ``{prefix}/mar_large`` (the 12 COCO stats) and
        ``{prefix}/ap/<class name>`` per class that has ground truth (classes without are COCOeval's -1 and
        left out); a name used by two categories gets ``_<id>`` appended.
    """
    class_names = class_names or {}
    scalars = {
        f"{prefix}/{key}": float(value)
        for key, value in result.items()
        if key not in _PER_CLASS_KEYS and not key.endswith("_per_class") and value.numel() == 1
    }
    per_class = _per_class_values(result)
    names = [str(class_names.get(category_id, category_id)) for category_id, _, _ in per_class]
    for (category_id, average_precision, _), name in zip(per_class, names, strict=True):
        if average_precision < 0:
            continue
        unique_name = name if names.count(name) == 1 else f"{name}_{category_id}"
        scalars[f"{prefix}/ap/{unique_name}"] = average_precision
    return scalars
