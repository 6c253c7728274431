"""The data check: every split's annotation file and images, with one clear message per problem.

Runs before training (from `CocoDataModule.setup`) and alone, where errors exit with code 2::

    python -m detr_lightning.data.check DIR [--label-mapping contiguous] [--skip-images]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from detr_lightning.data.annotations import (
    RepairCounts,
    build_coco,
    read_annotation_file,
    validate_annotations,
)
from detr_lightning.data.categories import LABEL_MAPPINGS, LabelMap, build_label_map
from detr_lightning.data.errors import DataError
from detr_lightning.data.images import verify_image_files
from detr_lightning.data.layout import SPLITS, DatasetLayout, SplitFiles, resolve_layout

log = logging.getLogger(__name__)


@dataclass
class CheckedSplit:
    """One split after its annotation file passed the record check (boxes already repaired)."""

    files: SplitFiles
    data: dict[str, Any]
    repairs: RepairCounts
    images_verified: bool = False
    images_read_unrotated: frozenset[int] = frozenset()

    @cached_property
    def coco(self) -> COCO:
        """pycocotools index of the repaired file: original category ids, crowd boxes included."""
        return build_coco(self.data)

    def verify_images(self) -> None:
        """Check every image file of the split (once): present, decodable, of the recorded size."""
        if self.images_verified:
            return
        self.images_read_unrotated = verify_image_files(
            self.data["images"], self.files.img_dir, self.files.ann_file
        )
        self.images_verified = True
        if self.images_read_unrotated:
            log.warning(
                "data: %s: %d images have a 90° EXIF orientation but records of the stored size; "
                "they are read without rotation",
                self.files.ann_file,
                len(self.images_read_unrotated),
            )


def load_split(files: SplitFiles) -> CheckedSplit:
    """Read and check one split's annotation file; logs one warning line if boxes were repaired."""
    data = read_annotation_file(files.ann_file)
    repairs = validate_annotations(data, files.ann_file)
    if not data["images"]:
        raise DataError(
            f"{files.ann_file}: the {files.split} split has no images. Fix: export images into this split or "
            f"point data.{files.split}.ann_file at a file that has some."
        )
    if repairs.total():
        log.warning("data: repaired %s (%s split): %s", files.ann_file, files.split, repairs.describe())
    return CheckedSplit(files=files, data=data, repairs=repairs)


def check_dataset(
    layout: DatasetLayout, label_mapping: str = "raw", check_images: bool = True
) -> tuple[dict[str, CheckedSplit], LabelMap]:
    """Check every split of ``layout``; returns the checked splits and the label map built from them."""
    splits = {name: load_split(files) for name, files in layout.splits.items()}
    label_map = build_label_map(
        [(split.files.ann_file, split.data) for split in splits.values()], label_mapping
    )
    if check_images:
        for split in splits.values():
            split.verify_images()
    return splits, label_map


def render_report(splits: dict[str, CheckedSplit], label_map: LabelMap, console: Console) -> None:
    """Print per split its images and boxes (crowd boxes apart), then the boxes per class and split."""
    summary = Table(title="Splits")
    for column in ("split", "annotation file", "images", "without boxes", "boxes", "crowd", "repaired"):
        summary.add_column(column, justify="left" if column in ("split", "annotation file") else "right")
    per_class = Table(
        title=f"Boxes per class (label_mapping={label_map.mode}, num_classes={label_map.num_classes})"
    )
    for column in ("label", "category id", "name", *splits):
        per_class.add_column(column, justify="left" if column == "name" else "right")
    boxes_per_label = {}
    for name, split in splits.items():
        images, annotations = split.data["images"], split.data["annotations"]
        regular = [ann for ann in annotations if not ann["iscrowd"]]
        boxes_per_label[name] = Counter(label_map.category_to_label[ann["category_id"]] for ann in regular)
        without_boxes = len(images) - len({ann["image_id"] for ann in regular})
        crowd = len(annotations) - len(regular)
        counts = (len(images), without_boxes, len(regular), crowd, split.repairs.total())
        summary.add_row(escape(name), escape(str(split.files.ann_file)), *(str(count) for count in counts))
    category_ids = label_map.label_to_category_id
    for label, class_name in label_map.class_names.items():
        counts = [str(boxes_per_label[name][label]) for name in splits]
        per_class.add_row(str(label), str(category_ids[label]), escape(class_name), *counts)
    console.print(summary)
    console.print(per_class)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code (0 ok, 2 data error)."""
    parser = argparse.ArgumentParser(
        prog="python -m detr_lightning.data.check", description="Check a COCO-format detection dataset."
    )
    parser.add_argument("root", type=Path, help="dataset folder (Roboflow export or COCO layout)")
    parser.add_argument("--label-mapping", choices=LABEL_MAPPINGS, default="raw")
    parser.add_argument("--skip-images", action="store_true", help="check annotation files only")
    for split in SPLITS:
        parser.add_argument(f"--{split}-ann-file", type=Path, help=f"explicit {split} annotation file")
        parser.add_argument(f"--{split}-img-dir", type=Path, help=f"explicit {split} image folder")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", force=True)  # on stderr
    overrides = {
        split: {"ann_file": getattr(args, f"{split}_ann_file"), "img_dir": getattr(args, f"{split}_img_dir")}
        for split in SPLITS
    }
    try:
        layout = resolve_layout(args.root, overrides)
        splits, label_map = check_dataset(layout, args.label_mapping, check_images=not args.skip_images)
    except DataError as err:
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]data check failed:[/bold red] {escape(str(err))}"
        )
        return 2
    console = Console(soft_wrap=True)
    render_report(splits, label_map, console)
    console.print(f"[green]data check passed[/green] ({', '.join(splits)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
