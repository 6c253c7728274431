"""The 12 lines ``COCOeval.summarize()`` prints, from plain numbers or 0-d tensors; imports no torch, so
reports of ``metrics.json`` figures can use it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

COCO_MAX_DETECTIONS: list[int] = [1, 10, 100]
# The 12 stats of COCOeval.summarize(), in its order: (result key, AP or AR, IoU, area, maxDets index).
_SUMMARY_ROWS: list[tuple[str, bool, str, str, int]] = [
    ("map", True, "0.50:0.95", "all", 2),
    ("map_50", True, "0.50", "all", 2),
    ("map_75", True, "0.75", "all", 2),
    ("map_small", True, "0.50:0.95", "small", 2),
    ("map_medium", True, "0.50:0.95", "medium", 2),
    ("map_large", True, "0.50:0.95", "large", 2),
    ("mar_{0}", False, "0.50:0.95", "all", 0),
    ("mar_{1}", False, "0.50:0.95", "all", 1),
    ("mar_{2}", False, "0.50:0.95", "all", 2),
    ("mar_small", False, "0.50:0.95", "small", 2),
    ("mar_medium", False, "0.50:0.95", "medium", 2),
    ("mar_large", False, "0.50:0.95", "large", 2),
]


#: The result keys of the 12 lines, in their order, with the default maxDets.
COCO_SUMMARY_KEYS: list[str] = [row[0].format(*COCO_MAX_DETECTIONS) for row in _SUMMARY_ROWS]


def max_detections(result: Mapping[str, Any]) -> list[int]:
    """The three maxDets of a result, read from its ``mar_<n>`` keys (else `COCO_MAX_DETECTIONS`)."""
    found = sorted(int(m.group(1)) for key in result if (m := re.fullmatch(r"mar_(\d+)", key)))
    return found if len(found) == 3 else COCO_MAX_DETECTIONS


def coco_summary_lines(result: Mapping[str, Any]) -> list[str]:
    """The 12 lines ``COCOeval.summarize()`` prints, from a metric result (``map``, ``map_50``, ...,
    ``mar_100``, ...): ``' Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.xxx'``
    and so on, 6 AP rows then 6 AR rows."""
    detections = max_detections(result)
    lines = []
    for key, is_precision, iou, area, detections_index in _SUMMARY_ROWS:
        value = float(result[key.format(*detections)])
        title, kind = ("Average Precision", "(AP)") if is_precision else ("Average Recall", "(AR)")
        lines.append(
            f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | "
            f"maxDets={detections[detections_index]:>3d} ] = {value:0.3f}"
        )
    return lines
