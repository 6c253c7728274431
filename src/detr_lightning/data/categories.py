"""From COCO categories to training labels: ``raw`` ids (official DETR) or ``contiguous`` indices.

- ``raw``: label = ``category_id``; ``num_classes = max category id + 1`` (the official convention, so
  a COCO-pretrained head lines up: COCO gives 91). Unused ids (gaps, Roboflow's id-0 supercategory)
  just become logits that are never a target.
- ``contiguous``: only categories that have annotations, sorted by id, become ``0..K-1``;
  ``num_classes = K``. `LabelMap.label_to_category_id` writes predictions back with the original ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detr_lightning.data.errors import DataError

LABEL_MAPPINGS = ("raw", "contiguous")


def check_label_mapping(mode: str) -> None:
    """A `DataError` unless ``mode`` is one of `LABEL_MAPPINGS`."""
    if mode not in LABEL_MAPPINGS:
        raise DataError(
            f"data.label_mapping={mode!r} is not supported. Fix: use one of {', '.join(LABEL_MAPPINGS)}."
        )


@dataclass(frozen=True)
class LabelMap:
    """How category ids become labels, the class names per label, and ``num_classes``."""

    mode: str
    category_to_label: dict[int, int]
    class_names: dict[int, str]
    num_classes: int

    @property
    def label_to_category_id(self) -> dict[int, int]:
        return {label: category_id for category_id, label in self.category_to_label.items()}

    def check_num_classes(self, num_classes: int) -> None:
        """Raise a `DataError` if a model with ``num_classes`` cannot hold every label of the data: a
        larger value is fine (91 for a COCO head on a subset), a smaller one puts classes out of range."""
        if num_classes >= self.num_classes:
            return
        largest = max(self.class_names)
        raise DataError(
            f"model.num_classes={num_classes} cannot hold the data's labels: the largest label is {largest} "
            f"('{self.class_names[largest]}', label_mapping={self.mode}), so num_classes must be at least "
            f"{self.num_classes} (largest label + 1; the model adds the no-object class itself). "
            f"Fix: leave model.num_classes unset to use {self.num_classes}, "
            f"or set it to {self.num_classes} or more."
        )


def _merged_categories(sources: Sequence[tuple[Path, dict[str, Any]]]) -> dict[int, str]:
    seen: dict[int, tuple[str, Path]] = {}  # category id -> (name, first file naming it)
    for ann_file, data in sources:
        for category in data["categories"]:
            category_id, name = category["id"], category["name"]
            first_name, first_file = seen.setdefault(category_id, (name, ann_file))
            if name != first_name:
                raise DataError(
                    f"{ann_file}: category id {category_id} is named {name!r} but {first_file} names it "
                    f"{first_name!r}. Fix: use the same categories list in every split."
                )
    return {category_id: name for category_id, (name, _) in seen.items()}


def build_label_map(sources: Sequence[tuple[Path, dict[str, Any]]], mode: str = "raw") -> LabelMap:
    """Build the label map from every split's (annotation file, validated COCO dict).

    Categories are merged over the splits (same id must mean the same name); in ``contiguous`` mode a
    category is kept when any split has an annotation of it.
    """
    check_label_mapping(mode)
    names = _merged_categories(sources)
    if mode == "raw":
        category_to_label = {category_id: category_id for category_id in sorted(names)}
    else:
        used_ids = sorted({ann["category_id"] for _, data in sources for ann in data["annotations"]})
        if not used_ids:
            files = ", ".join(str(ann_file) for ann_file, _ in sources)
            raise DataError(
                f"{files}: no annotations at all, so label_mapping=contiguous keeps no class. "
                "Fix: annotate the images or use data.label_mapping=raw."
            )
        category_to_label = {category_id: label for label, category_id in enumerate(used_ids)}
    return LabelMap(
        mode=mode,
        category_to_label=category_to_label,
        class_names={label: names[category_id] for category_id, label in category_to_label.items()},
        num_classes=max(category_to_label.values()) + 1,
    )
