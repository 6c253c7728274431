"""The 12 lines ``COCOeval.summarize()`` prints, from plain numbers or 0-d tensors; imports no torch, so
reports of ``metrics.json`` figures can use it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COCO_MAX_DETECTIONS: list[int] = [1, 10, 100]
# The 12 stats of COCOeval.summarize(), in its order: (result key, AP or AR, IoU, area, maxDets).
_SUMMARY_ROWS: list[tuple[str, bool, str, str, int]] = [
    ("map", True, "0.50:0.95", "all", 100),
    ("map_50", True, "0.50", "all", 100),
    ("map_75", True, "0.75", "all", 100),
    ("map_small", True, "0.50:0.95", "small", 100),
    ("map_medium", True, "0.50:0.95", "medium", 100),
    ("map_large", True, "0.50:0.95", "large", 100),
    ("mar_1", False, "0.50:0.95", "all", 1),
    ("mar_10", False, "0.50:0.95", "all", 10),
    ("mar_100", False, "0.50:0.95", "all", 100),
    ("mar_small", False, "0.50:0.95", "small", 100),
    ("mar_medium", False, "0.50:0.95", "medium", 100),
    ("mar_large", False, "0.50:0.95", "large", 100),
]
#: The result keys of the 12 lines, in their order.
COCO_SUMMARY_KEYS: list[str] = [row[0] for row in _SUMMARY_ROWS]


def coco_summary_lines(result: Mapping[str, Any]) -> list[str]:
    """The 12 lines ``COCOeval.summarize()`` prints, from a metric result (``map``, ``map_50``, ...,
    ``mar_100``, ...): ``' Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.xxx'``
    and so on, 6 AP rows then 6 AR rows."""
    lines = []
    for key, is_precision, iou, area, max_detections in _SUMMARY_ROWS:
        title, kind = ("Average Precision", "(AP)") if is_precision else ("Average Recall", "(AR)")
        lines.append(
            f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | "
            f"maxDets={max_detections:>3d} ] = {float(result[key]):0.3f}"
        )
    return lines
