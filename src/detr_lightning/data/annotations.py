"""Reading a COCO annotation file, checking its records, and repairing what can be repaired.

Everything that would crash later (in pycocotools, the target conversion or COCOeval) or silently train
on wrong boxes is turned into a `DataError` naming the file, the record and the fix. Boxes that are
merely sloppy are repaired in place and counted, so one warning line can report them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import posixpath
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from detr_lightning.data.errors import DataError

REQUIRED_KEYS = ("images", "annotations", "categories")


@dataclass
class RepairCounts:
    """How many annotations `validate_annotations` repaired, by kind of repair."""

    negative_size_fixed: int = 0
    boxes_clamped: int = 0
    zero_area_dropped: int = 0
    area_filled: int = 0

    def total(self) -> int:
        return sum(getattr(self, field.name) for field in fields(self))

    def describe(self) -> str:
        """E.g. ``"2 boxes clamped to the image, 1 zero-area box dropped"`` (only non-zero counts)."""
        phrases = {
            "negative_size_fixed": (
                "box with negative width/height made positive",
                "boxes with negative width/height made positive",
            ),
            "boxes_clamped": ("box clamped to the image", "boxes clamped to the image"),
            "zero_area_dropped": ("zero-area box dropped", "zero-area boxes dropped"),
            "area_filled": ("missing area filled from the box", "missing areas filled from the boxes"),
        }
        parts = []
        for name, (singular, plural) in phrases.items():
            count = getattr(self, name)
            if count:
                parts.append(f"{count} {singular if count == 1 else plural}")
        return ", ".join(parts)


def read_annotation_file(ann_file: Path) -> dict[str, Any]:
    """Parse a COCO json file, with a `DataError` for a missing/unreadable file, bad JSON or missing keys."""
    if not ann_file.exists():
        raise DataError(
            f"{ann_file}: annotation file not found. "
            "Fix: check data.root or the split's data.<split>.ann_file."
        )
    try:
        text = ann_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"{ann_file}: annotation file cannot be read ({type(err).__name__}: {err}). "
            "Fix: make it a readable UTF-8 JSON file."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{ann_file}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}. "
            "Fix: re-export the annotations or repair the file."
        ) from None
    if not isinstance(data, dict):
        raise DataError(
            f"{ann_file}: the top level is a {type(data).__name__}, not a COCO object. Fix: re-export."
        )
    for key in REQUIRED_KEYS:
        if key not in data:
            raise DataError(
                f"{ann_file}: no '{key}' list at the top level. Fix: a COCO file needs 'images', "
                "'annotations' and 'categories' (an empty 'annotations' list is allowed)."
            )
        if not isinstance(data[key], list):
            raise DataError(
                f"{ann_file}: '{key}' is a {type(data[key]).__name__}, not a list. Fix: re-export."
            )
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _and_more(count: int) -> str:
    return f" (and {count} more like it)" if count > 0 else ""


def _first_failure(
    records: Iterable[tuple[int, dict]], is_bad: Callable[[dict], bool]
) -> tuple[int, dict, int]:
    """The first bad ``(index, record)`` and how many more are bad; index is -1 when none is."""
    bad = [(index, record) for index, record in records if is_bad(record)]
    if not bad:
        return -1, {}, 0
    return bad[0][0], bad[0][1], len(bad) - 1


def _require_fields(
    ann_file: Path,
    section: str,
    records: list,
    checks: dict[str, tuple[Callable[[Any], bool], str]],
    fix: str,
) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{ann_file}: {section}[{index}] is not an object. Fix: {fix}.")
    for key, (is_valid, expected) in checks.items():
        index, record, more = _first_failure(
            enumerate(records), lambda r, k=key, ok=is_valid: not ok(r.get(k))
        )
        if index >= 0:
            value = "missing" if key not in record else repr(record[key])
            record_name = f"{section}[{index}]" + (f" (id {record['id']!r})" if "id" in record else "")
            raise DataError(
                f"{ann_file}: {record_name} has '{key}' {value}, expected {expected}{_and_more(more)}. "
                f"Fix: {fix}."
            )


def _require_unique_ids(ann_file: Path, section: str, records: list[dict]) -> None:
    counts = Counter(record["id"] for record in records)
    duplicates = [record_id for record_id, count in counts.items() if count > 1]
    if duplicates:
        raise DataError(
            f"{ann_file}: {section} id {duplicates[0]} is used {counts[duplicates[0]]} times"
            f"{_and_more(len(duplicates) - 1)}. Fix: give every {section} record a unique id."
        )


def _leaves_folder(file_name: str) -> bool:
    normalized = posixpath.normpath(file_name.replace("\\", "/"))
    return (
        file_name.startswith(("/", "\\"))
        or Path(file_name).is_absolute()
        or (len(file_name) > 1 and file_name[1] == ":")
        or normalized == ".."
        or normalized.startswith("../")
    )


def _validate_records(ann_file: Path, data: dict[str, Any]) -> None:
    fix_export = "re-export the annotations or repair the record"
    _require_fields(
        ann_file,
        "images",
        data["images"],
        {
            "id": (_is_int, "an integer"),
            "file_name": (lambda v: isinstance(v, str) and v != "", "a non-empty path"),
            "width": (lambda v: _is_int(v) and v > 0, "a positive integer (pixels)"),
            "height": (lambda v: _is_int(v) and v > 0, "a positive integer (pixels)"),
        },
        fix_export,
    )
    _require_fields(
        ann_file,
        "categories",
        data["categories"],
        {
            "id": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
            "name": (lambda v: isinstance(v, str), "a string"),
        },
        fix_export,
    )
    _require_fields(
        ann_file,
        "annotations",
        data["annotations"],
        {
            "id": (_is_int, "an integer"),
            "image_id": (_is_int, "an integer"),
            "category_id": (_is_int, "an integer"),
            "bbox": (
                lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v),
                "[x, y, width, height] in pixels (4 finite numbers)",
            ),
        },
        fix_export,
    )
    for section in REQUIRED_KEYS:
        _require_unique_ids(ann_file, section, data[section])
    if not data["categories"]:
        raise DataError(
            f"{ann_file}: the 'categories' list is empty. Fix: list every class with an id and a name."
        )

    index, image, more = _first_failure(enumerate(data["images"]), lambda r: _leaves_folder(r["file_name"]))
    if index >= 0:
        raise DataError(
            f"{ann_file}: image id {image['id']} has file_name {image['file_name']!r}, which leaves the "
            f"image folder{_and_more(more)}. "
            "Fix: use paths relative to the image folder, without '..' or a leading '/'."
        )
    image_ids = {image["id"] for image in data["images"]}
    index, ann, more = _first_failure(
        enumerate(data["annotations"]), lambda r: r["image_id"] not in image_ids
    )
    if index >= 0:
        raise DataError(
            f"{ann_file}: annotation id {ann['id']} points at image id {ann['image_id']}, which is not in "
            f"'images'{_and_more(more)}. Fix: add the image record or delete the annotation."
        )
    category_ids = {category["id"] for category in data["categories"]}
    index, ann, more = _first_failure(
        enumerate(data["annotations"]), lambda r: r["category_id"] not in category_ids
    )
    if index >= 0:
        raise DataError(
            f"{ann_file}: annotation id {ann['id']} (image id {ann['image_id']}) has category_id "
            f"{ann['category_id']}, which is not in 'categories' (ids {sorted(category_ids)})"
            f"{_and_more(more)}. Fix: add the category or correct the annotation."
        )


def _repair_boxes(data: dict[str, Any]) -> RepairCounts:
    """Make widths/heights positive, clamp boxes to their image, drop empty ones, fill missing areas."""
    counts = RepairCounts()
    image_sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    kept = []
    for ann in data["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w < 0 or h < 0:
            x, w = (x + w, -w) if w < 0 else (x, w)
            y, h = (y + h, -h) if h < 0 else (y, h)
            counts.negative_size_fixed += 1
        image_w, image_h = image_sizes[ann["image_id"]]
        x0, y0 = min(max(x, 0.0), image_w), min(max(y, 0.0), image_h)
        x1, y1 = min(max(x + w, 0.0), image_w), min(max(y + h, 0.0), image_h)
        if x1 <= x0 or y1 <= y0:
            counts.zero_area_dropped += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts.boxes_clamped += 1
        ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        if not _is_number(ann.get("area")):
            ann["area"] = (x1 - x0) * (y1 - y0)
            counts.area_filled += 1
        ann["iscrowd"] = 1 if ann.get("iscrowd") else 0
        kept.append(ann)
    data["annotations"] = kept
    return counts


def validate_annotations(data: dict[str, Any], ann_file: Path) -> RepairCounts:
    """Check the records of a parsed COCO file and repair its boxes in place.

    Errors (`DataError`): records without the fields COCO requires, duplicate image/annotation/category
    ids, annotations pointing at unknown images or categories, file names that leave the image folder.
    Repairs: negative width/height made positive (the box spans the same pixels), boxes clamped to the
    image, boxes with zero area after that dropped, missing ``area`` set to the box area, ``iscrowd``
    defaulted to 0, and a missing ``info`` added (pycocotools 2.0.9/2.0.10 ``loadRes`` needs it).
    """
    _validate_records(ann_file, data)
    data.setdefault("info", {})
    return _repair_boxes(data)


def build_coco(data: dict[str, Any]) -> COCO:
    """A pycocotools `COCO` index over an already parsed (and validated) annotation dict, quietly."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
