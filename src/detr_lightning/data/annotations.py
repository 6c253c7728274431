"""Reading a COCO annotation file, checking its records, and repairing what can be repaired.

Whatever would crash later (in pycocotools, the target conversion or COCOeval) or silently train on wrong
boxes is a `DataError` naming the file, the record and the fix. Boxes that are merely sloppy are repaired
in place and counted, so that one warning line can report them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import posixpath
from collections import Counter
from collections.abc import Callable, Sized
from pathlib import Path, PureWindowsPath
from typing import Any

from pycocotools.coco import COCO

from detr_lightning.data.errors import DataError

REQUIRED_KEYS = ("images", "annotations", "categories")
FIX_RECORD = "re-export the annotations or repair the record"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_box(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_number(x) for x in value)


#: Per section, in the order they are checked: field -> (is it valid, what it must be).
REQUIRED_FIELDS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "images": {
        "id": (_is_int, "an integer"),
        "file_name": (lambda v: isinstance(v, str) and v != "", "a non-empty path"),
        "width": (lambda v: _is_int(v) and v > 0, "a positive integer (pixels)"),
        "height": (lambda v: _is_int(v) and v > 0, "a positive integer (pixels)"),
    },
    "categories": {
        "id": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
        "name": (lambda v: isinstance(v, str), "a string"),
    },
    "annotations": {
        "id": (_is_int, "an integer"),
        "image_id": (_is_int, "an integer"),
        "category_id": (_is_int, "an integer"),
        "bbox": (_is_box, "[x, y, width, height] in pixels (4 finite numbers)"),
    },
}
#: The repairs `validate_annotations` counts, in report order: kind -> (one, several).
REPAIRS = {
    "negative_size": (
        "box with negative width/height made positive",
        "boxes with negative width/height made positive",
    ),
    "clamped": ("box clamped to the image", "boxes clamped to the image"),
    "zero_area": ("zero-area box dropped", "zero-area boxes dropped"),
    "area_filled": ("missing area filled from the box", "missing areas filled from the boxes"),
}


class RepairCounts(Counter):
    """How many annotations `validate_annotations` repaired, per kind of `REPAIRS`."""

    def describe(self) -> str:
        """E.g. ``"2 boxes clamped to the image, 1 zero-area box dropped"`` (non-zero counts only)."""
        counts = [(self[kind], phrases) for kind, phrases in REPAIRS.items() if self[kind]]
        return ", ".join(f"{n} {one if n == 1 else several}" for n, (one, several) in counts)


def read_annotation_file(ann_file: Path) -> dict[str, Any]:
    """Parse a COCO json file, with a `DataError` for a missing/unreadable file, bad JSON or missing keys."""
    if not ann_file.exists():
        raise DataError(
            f"{ann_file}: annotation file not found. "
            "Fix: check data.root or the split's data.<split>.ann_file."
        )
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"{ann_file}: annotation file cannot be read ({type(err).__name__}: {err}). "
            "Fix: make it a readable UTF-8 JSON file."
        ) from None
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


def more_like_it(found: Sized) -> str:
    """What follows the first of ``found`` problems in a message."""
    return f" (and {len(found) - 1} more like it)" if len(found) > 1 else ""


def _leaves_folder(file_name: str) -> bool:
    """Whether ``file_name`` is absolute (POSIX, Windows or a drive letter) or climbs out with ``..``."""
    normalized = posixpath.normpath(file_name.replace("\\", "/"))
    return bool(PureWindowsPath(file_name).anchor) or normalized.split("/")[0] == ".."


def _validate_records(ann_file: Path, data: dict[str, Any]) -> None:
    for section, checks in REQUIRED_FIELDS.items():
        records = data[section]
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{ann_file}: {section}[{index}] is not an object. Fix: {FIX_RECORD}.")
        for key, (is_valid, expected) in checks.items():
            bad = [index for index, record in enumerate(records) if not is_valid(record.get(key))]
            if bad:
                record = records[bad[0]]
                value = repr(record[key]) if key in record else "missing"
                name = f"{section}[{bad[0]}]" + (f" (id {record['id']!r})" if "id" in record else "")
                raise DataError(
                    f"{ann_file}: {name} has '{key}' {value}, expected {expected}{more_like_it(bad)}. "
                    f"Fix: {FIX_RECORD}."
                )
    for section in REQUIRED_KEYS:
        counts = Counter(record["id"] for record in data[section])
        repeated = [record_id for record_id, count in counts.items() if count > 1]
        if repeated:
            raise DataError(
                f"{ann_file}: {section} id {repeated[0]} is used {counts[repeated[0]]} times"
                f"{more_like_it(repeated)}. Fix: give every {section} record a unique id."
            )
    if not data["categories"]:
        raise DataError(
            f"{ann_file}: the 'categories' list is empty. Fix: list every class with an id and a name."
        )

    bad = [image for image in data["images"] if _leaves_folder(image["file_name"])]
    if bad:
        raise DataError(
            f"{ann_file}: image id {bad[0]['id']} has file_name {bad[0]['file_name']!r}, which leaves the "
            f"image folder{more_like_it(bad)}. "
            "Fix: use paths relative to the image folder, without '..' or a leading '/'."
        )
    image_ids = {image["id"] for image in data["images"]}
    bad = [ann for ann in data["annotations"] if ann["image_id"] not in image_ids]
    if bad:
        raise DataError(
            f"{ann_file}: annotation id {bad[0]['id']} points at image id {bad[0]['image_id']}, which is "
            f"not in 'images'{more_like_it(bad)}. Fix: add the image record or delete the annotation."
        )
    category_ids = {category["id"] for category in data["categories"]}
    bad = [ann for ann in data["annotations"] if ann["category_id"] not in category_ids]
    if bad:
        raise DataError(
            f"{ann_file}: annotation id {bad[0]['id']} (image id {bad[0]['image_id']}) has category_id "
            f"{bad[0]['category_id']}, which is not in 'categories' (ids {sorted(category_ids)})"
            f"{more_like_it(bad)}. Fix: add the category or correct the annotation."
        )


def validate_annotations(data: dict[str, Any], ann_file: Path) -> RepairCounts:
    """Check the records of a parsed COCO file (fields, unique ids, known image and category ids, file
    names inside the image folder) and repair its boxes in place: negative sizes made positive (same
    pixels), boxes clamped to the image, then empty ones dropped, missing ``area`` set to the box area,
    ``iscrowd`` defaulted to 0."""
    _validate_records(ann_file, data)
    data.setdefault("info", {})  # pycocotools 2.0.9/2.0.10 ``loadRes`` needs it
    counts = RepairCounts()
    image_sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    kept = []
    for ann in data["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w < 0 or h < 0:
            x, w = (x + w, -w) if w < 0 else (x, w)
            y, h = (y + h, -h) if h < 0 else (y, h)
            counts["negative_size"] += 1
        image_w, image_h = image_sizes[ann["image_id"]]
        x0, y0 = min(max(x, 0.0), image_w), min(max(y, 0.0), image_h)
        x1, y1 = min(max(x + w, 0.0), image_w), min(max(y + h, 0.0), image_h)
        if x1 <= x0 or y1 <= y0:
            counts["zero_area"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["clamped"] += 1
        ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        if not _is_number(ann.get("area")):
            ann["area"] = (x1 - x0) * (y1 - y0)
            counts["area_filled"] += 1
        ann["iscrowd"] = 1 if ann.get("iscrowd") else 0
        kept.append(ann)
    data["annotations"] = kept
    return counts


def build_coco(data: dict[str, Any]) -> COCO:
    """A pycocotools `COCO` index over an already parsed (and validated) annotation dict, quietly."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
