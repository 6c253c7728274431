"""The metric helpers give pycocotools' numbers, lines and results rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from detr_lightning.metrics import (
    build_map_metric,
    coco_detections,
    coco_ground_truth,
    coco_summary_lines,
    evaluate_coco_detections,
    flatten_map_result,
    per_class_table,
)

from .synthetic import (
    CATEGORIES,
    IMAGE_IDS,
    LABEL_TO_CATEGORY_ID,
    STAT_KEYS,
    UNMAPPED_LABEL,
    detections_to_coco_results,
    make_coco,
    make_coco_dict,
    make_detections,
    reference_cocoeval,
)


@pytest.fixture(scope="module")
def case():
    """The synthetic set, its detections in COCO terms, and pycocotools' evaluation of them."""
    coco_dict = make_coco_dict()
    detections = make_detections(coco_dict)
    image_ids = list(detections)
    converted = coco_detections([detections[i] for i in image_ids], LABEL_TO_CATEGORY_ID)
    rows = detections_to_coco_results(image_ids, [detections[i] for i in image_ids], LABEL_TO_CATEGORY_ID)
    stats, printed = reference_cocoeval(coco_dict, rows)
    return coco_dict, image_ids, converted, rows, stats, printed


def as_float32(values) -> torch.Tensor:
    """How torchmetrics hands back COCOeval's float64 stats."""
    return torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_all_12_stats_and_per_class_equal_pycocotools(case, backend):
    coco_dict, image_ids, converted, rows, stats, _ = case
    result = evaluate_coco_detections(image_ids, converted, make_coco(coco_dict), backend=backend)

    assert 0.2 < stats[0] < 0.8  # a set where mistakes show
    assert torch.equal(torch.stack([result[k] for k in STAT_KEYS]), as_float32(stats))
    assert result["classes"].tolist() == [c["id"] for c in CATEGORIES]
    for index, category_id in enumerate(result["classes"].tolist()):
        class_stats, _ = reference_cocoeval(coco_dict, rows, category_id=category_id)
        assert result["map_per_class"][index] == as_float32(class_stats[0])
        assert result["mar_100_per_class"][index] == as_float32(class_stats[8])


def test_summary_lines_are_what_pycocotools_prints(case):
    coco_dict, image_ids, converted, _, _, printed = case
    result = evaluate_coco_detections(image_ids, converted, make_coco(coco_dict), class_metrics=False)
    lines = coco_summary_lines(result)
    assert lines == printed
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.")
    assert lines[6].startswith(" Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.")


def test_summary_lines_print_missing_buckets_as_minus_one():
    result = {key: torch.tensor(-1.0) for key in STAT_KEYS}
    assert all(line.endswith("= -1.000") for line in coco_summary_lines(result))


def test_tied_scores_across_images_are_broken_in_image_id_order():
    """COCOeval walks images in ascending id; fed in another order, ties would rank differently."""
    coco_dict = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    true_positive = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "scores": torch.tensor([0.5])}
    false_positive = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "scores": torch.tensor([0.5])}
    detections = [
        {**false_positive, "labels": torch.tensor([0])},  # image 2, fed first
        {**true_positive, "labels": torch.tensor([0])},
    ]
    converted = coco_detections(detections, {0: 1})
    rows = detections_to_coco_results([2, 1], detections, {0: 1})
    stats, _ = reference_cocoeval(coco_dict, rows)

    result = evaluate_coco_detections([2, 1], converted, make_coco(coco_dict))
    assert stats[0] == pytest.approx(1.0)  # the true positive ranks first, as image 1 comes first
    assert result["map"] == as_float32(stats[0])


def test_a_repeated_image_counts_once(case):
    """Distributed samplers repeat images to even out ranks; the first copy is the one scored."""
    coco_dict, image_ids, converted, _, stats, _ = case
    repeated_ids = image_ids + image_ids[:3]
    shuffled = [{**d, "scores": d["scores"].flip(0)} for d in converted[:3]]  # later copies are ignored
    result = evaluate_coco_detections(repeated_ids, converted + shuffled, make_coco(coco_dict))
    assert torch.equal(torch.stack([result[k] for k in STAT_KEYS]), as_float32(stats))


def test_perfect_detections_score_one(case):
    coco_dict, image_ids, *_ = case
    coco_gt = make_coco(coco_dict)
    detections = []
    for ground_truth in coco_ground_truth(coco_gt, image_ids):
        not_crowd = ground_truth["iscrowd"] == 0
        detections.append(
            {
                "boxes": ground_truth["boxes"][not_crowd].float(),
                "scores": torch.ones(int(not_crowd.sum())),
                "labels": ground_truth["labels"][not_crowd],
            }
        )
    result = evaluate_coco_detections(image_ids, detections, coco_gt)
    assert result["map"] == 1.0 and result["map_50"] == 1.0 and result["mar_100"] == 1.0
    assert result["map_per_class"].tolist() == [1.0, 1.0, 1.0]


def test_coco_detections_map_labels_drop_unmapped_and_give_xywh():
    detection = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0], [1.5, 2.5, 4.0, 8.0]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([2, UNMAPPED_LABEL, 0]),
    }
    (converted,) = coco_detections([detection], LABEL_TO_CATEGORY_ID)
    assert converted["labels"].tolist() == [7, 1]
    assert converted["boxes"].tolist() == [[10.0, 20.0, 20.0, 40.0], [1.5, 2.5, 2.5, 5.5]]
    assert converted["boxes"].dtype == converted["scores"].dtype == torch.float64
    assert converted["scores"].tolist() == pytest.approx([0.9, 0.7])
    (all_dropped,) = coco_detections([detection], {})
    assert all_dropped["boxes"].shape == (0, 4) and all_dropped["labels"].numel() == 0


def test_results_rows_are_short_and_keep_the_float32_values_through_json():
    detection = {
        "boxes": torch.tensor([[10.1, 20.2, 30.3, 60.6], [452.22375, 0.0, 460.0, 1.0]]),
        "scores": torch.tensor([0.123456789, 1e-6]),
        "labels": torch.tensor([1, 1]),
    }
    rows = json.loads(json.dumps(detections_to_coco_results([42], [detection], LABEL_TO_CATEGORY_ID)))
    assert [(row["image_id"], row["category_id"]) for row in rows] == [(42, 3), (42, 3)]
    x0, y0, x1, y1 = detection["boxes"].unbind(-1)
    float32_xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)
    assert torch.equal(torch.tensor([row["bbox"] for row in rows], dtype=torch.float32), float32_xywh)
    assert torch.equal(torch.tensor([row["score"] for row in rows], dtype=torch.float32), detection["scores"])
    assert rows[1]["bbox"][0] == 452.22375 and rows[0]["score"] == 0.12345679  # not 0.12345679104328156
    (converted,) = coco_detections([detection], LABEL_TO_CATEGORY_ID)
    assert converted["boxes"].tolist() == [row["bbox"] for row in rows]  # what the metric sees


def test_ground_truth_comes_from_the_file_unchanged(case):
    coco_dict, *_ = case
    coco_gt = make_coco(coco_dict)
    crowd_image = IMAGE_IDS[0]
    (ground_truth,) = coco_ground_truth(coco_gt, [crowd_image])
    annotations = [a for a in coco_dict["annotations"] if a["image_id"] == crowd_image]
    assert ground_truth["boxes"].tolist() == [a["bbox"] for a in annotations]  # xywh, float64
    assert ground_truth["area"].tolist() == [a["area"] for a in annotations]  # not w * h
    assert ground_truth["iscrowd"].tolist()[-1] == 1
    assert ground_truth["labels"].tolist() == [a["category_id"] for a in annotations]

    (empty,) = coco_ground_truth(coco_gt, [5])
    assert empty["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="image id 999 is not in the annotation file"):
        coco_ground_truth(coco_gt, [999])


def test_an_area_of_zero_counts_as_small_as_in_cocoeval():
    coco_dict = {
        "images": [{"id": 1, "width": 300, "height": 300}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 200], "area": 0, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    detections = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 200.0, 200.0]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([0]),
        }
    ]
    stats, _ = reference_cocoeval(coco_dict, detections_to_coco_results([1], detections, {0: 1}))
    result = evaluate_coco_detections([1], coco_detections(detections, {0: 1}), make_coco(coco_dict))
    assert stats[3] > 0.99 and stats[5] == -1.0  # in "small" (by its area), none in "large" (by its box)
    assert torch.equal(torch.stack([result[k] for k in STAT_KEYS]), as_float32(stats))


@pytest.fixture(scope="module")
def result_with_a_class_without_ground_truth():
    """Category 1 has ground truth; 7 only a detection (COCOeval's -1); named 'cat' twice."""
    coco_dict = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "light"}],
    }
    detections = coco_detections(
        [
            {
                "boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [0.0, 0.0, 9.0, 9.0]]),
                "scores": torch.tensor([0.9, 0.8]),
                "labels": torch.tensor([0, 1]),
            }
        ],
        {0: 1, 1: 7},
    )
    return evaluate_coco_detections([1], detections, make_coco(coco_dict))


def test_per_class_table_names_classes_and_marks_missing_ones(result_with_a_class_without_ground_truth):
    table = per_class_table(result_with_a_class_without_ground_truth, {1: "cat", 7: "traffic [light]"})
    console = Console(record=True, width=100)
    console.print(table)
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in console.export_text().splitlines()
        if line.startswith("│")
    ]
    assert rows == [["cat", "1", "1.000", "1.000"], ["traffic [light]", "7", "-", "-"]]


def test_flatten_gives_prefixed_scalars_and_per_class_ap(result_with_a_class_without_ground_truth):
    scalars = flatten_map_result(result_with_a_class_without_ground_truth, "val", {1: "cat", 7: "light"})
    assert set(scalars) == {f"val/{k}" for k in STAT_KEYS} | {"val/ap/cat"}  # no AP for 7: no ground truth
    assert scalars["val/map"] == 1.0 and scalars["val/ap/cat"] == 1.0
    assert all(type(v) is float for v in scalars.values())

    collided = flatten_map_result(result_with_a_class_without_ground_truth, "test", {1: "cat", 7: "cat"})
    assert "test/ap/cat_1" in collided


def test_without_class_metrics_there_are_no_per_class_entries(case):
    coco_dict, image_ids, converted, *_ = case
    result = evaluate_coco_detections(image_ids, converted, make_coco(coco_dict), class_metrics=False)
    assert set(flatten_map_result(result, "val")) == {f"val/{k}" for k in STAT_KEYS}
    assert per_class_table(result, {}).row_count == 0


def test_metric_uses_float64_linspace_thresholds():
    metric = build_map_metric()
    assert metric.iou_thresholds == np.linspace(0.5, 0.95, 10).tolist()
    assert metric.rec_thresholds == np.linspace(0.0, 1.0, 101).tolist()
    assert metric.box_format == "xywh" and metric.max_detection_thresholds == [1, 10, 100]
