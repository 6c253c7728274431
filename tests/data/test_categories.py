from __future__ import annotations

from pathlib import Path

import pytest

from detr_lightning.data.categories import build_label_map
from detr_lightning.data.errors import DataError

from .builders import coco_dict

TRAIN, VAL = Path("train.json"), Path("val.json")


def test_raw_labels_are_category_ids_and_num_classes_is_max_id_plus_one() -> None:
    label_map = build_label_map([(TRAIN, coco_dict()), (VAL, coco_dict())], "raw")
    assert label_map.num_classes == 4  # ids 0, 1, 3
    assert label_map.category_to_label == {0: 0, 1: 1, 3: 3}
    assert label_map.label_to_category_id == {0: 0, 1: 1, 3: 3}
    assert label_map.class_names == {0: "things", 1: "cat", 3: "dog"}


def test_roboflow_fire_extinguisher_convention_gives_two_classes() -> None:
    categories = [
        {"id": 0, "name": "fire-extinguishers", "supercategory": "none"},
        {"id": 1, "name": "fire-extinguisher", "supercategory": "fire-extinguishers"},
    ]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    data = coco_dict(annotations=annotations, categories=categories)
    assert build_label_map([(TRAIN, data)], "raw").num_classes == 2
    contiguous = build_label_map([(TRAIN, data)], "contiguous")
    assert contiguous.num_classes == 1
    assert contiguous.class_names == {0: "fire-extinguisher"}
    assert contiguous.label_to_category_id == {0: 1}


def test_contiguous_keeps_annotated_categories_of_any_split_in_id_order() -> None:
    categories = [*coco_dict()["categories"], {"id": 9, "name": "bird", "supercategory": "things"}]
    train = coco_dict(
        annotations=[{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]}], categories=categories
    )
    val = coco_dict(
        annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}], categories=categories
    )
    label_map = build_label_map([(TRAIN, train), (VAL, val)], "contiguous")
    assert label_map.category_to_label == {1: 0, 9: 1}
    assert label_map.class_names == {0: "cat", 1: "bird"}
    assert label_map.num_classes == 2


def test_check_num_classes_names_both_numbers() -> None:
    label_map = build_label_map([(TRAIN, coco_dict())], "raw")
    label_map.check_num_classes(4)
    label_map.check_num_classes(91)  # a bigger head (e.g. COCO-pretrained) is fine
    with pytest.raises(DataError, match=r"model\.num_classes=3 .* largest label is 3 \('dog'.* at least 4"):
        label_map.check_num_classes(3)


def test_conflicting_names_across_splits_and_unknown_mapping_are_errors() -> None:
    renamed = coco_dict(
        categories=[{"id": 0, "name": "things"}, {"id": 1, "name": "kitten"}, {"id": 3, "name": "dog"}]
    )
    with pytest.raises(
        DataError, match=r"val\.json: category id 1 is named 'kitten' but train\.json names it 'cat'"
    ):
        build_label_map([(TRAIN, coco_dict()), (VAL, renamed)], "raw")
    with pytest.raises(DataError, match=r"data\.label_mapping='sorted' is not supported"):
        build_label_map([(TRAIN, coco_dict())], "sorted")
    with pytest.raises(DataError, match="no annotations at all"):
        build_label_map([(TRAIN, coco_dict(annotations=[]))], "contiguous")
