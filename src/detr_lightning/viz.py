"""Pictures of detections: boxes drawn on the image, and attention heat maps.

`draw_detections` draws into the pixels of a full-size image (``predict.py``'s drawn files),
`draw_boxes` onto a matplotlib axis (the attention figures, ``TrainingPlots``' grid). Figures are
rendered by the Agg canvas, never through ``pyplot``: no window or global backend is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

#: Box colours, one per class label (cycled).
PALETTE = [tuple(int(255 * c) for c in color[:3]) for color in matplotlib.colormaps["tab10"].colors]


def class_color(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


@cache
def _label_font() -> str | None:
    """A TrueType font file (matplotlib ships DejaVu Sans), so label text can scale with the image."""
    try:
        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except (ValueError, RuntimeError):
        return None


def draw_detections(image: Tensor, boxes: Tensor, labels: Sequence[int], captions: Sequence[str]) -> Tensor:
    """``(3, H, W)`` uint8 image with each ``xyxy`` pixel box drawn in its class colour and captioned."""
    if len(boxes) == 0:
        return image
    short_side = min(image.shape[-2:])
    font = _label_font()
    return draw_bounding_boxes(
        image,
        boxes.float(),
        labels=list(captions),
        colors=[class_color(label) for label in labels],
        width=max(1, round(short_side / 250)),
        font=font,
        font_size=max(9, round(short_side / 40)) if font else None,
        fill_labels=True,
    )


def draw_boxes(
    axis: Axes,
    boxes: Sequence[Sequence[float]] | Tensor,
    color: Any,
    captions: Sequence[str] | None = None,
    linewidth: float = 2.0,
    linestyle: str = "-",
    caption_at: Literal["above", "below"] = "above",
) -> None:
    """Draw ``(K, 4)`` xyxy pixel boxes in one matplotlib ``color`` on an axis showing the image.

    ``captions`` (one per box) are white text on a tag of the box's colour, at its left, sitting on its
    top edge (``caption_at="above"``) or hanging from its bottom edge (``"below"``), clipped to the axis.
    """
    rows = boxes.tolist() if isinstance(boxes, Tensor) else list(boxes)
    tag = {"facecolor": color, "alpha": 0.7, "pad": 1, "linewidth": 0}
    for box, caption in zip(rows, captions if captions is not None else [None] * len(rows), strict=True):
        x0, y0, x1, y1 = (float(value) for value in box)
        outline = Rectangle(
            (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=linewidth, linestyle=linestyle
        )
        axis.add_patch(outline)
        if caption is not None:
            y, va = (y0, "bottom") if caption_at == "above" else (y1, "top")
            axis.text(x0, y, caption, color="white", fontsize=6, va=va, clip_on=True, bbox=tag)


def save_image(image: Tensor, path: Path) -> None:
    """Write a ``(3, H, W)`` uint8 image; JPEG (quality 95) for ``.jpg``/``.jpeg`` names, else PNG."""
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    options = {"format": "JPEG", "quality": 95} if jpeg else {"format": "PNG"}
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path, **options)


def save_attention_figure(
    image: Tensor,
    path: Path,
    decoder_maps: Sequence[Tensor],
    boxes: Tensor,
    captions: Sequence[str],
    labels: Sequence[int],
    encoder_map: Tensor,
    encoder_pixel: Sequence[float],
) -> None:
    """One PNG: a panel per detection (its ``(H, W)`` decoder map over the ``(3, H, W)`` uint8 image, with
    its xyxy box of ``(K, 4)`` ``boxes``), then the ``(H, W)`` encoder map at ``encoder_pixel`` ``(x, y)``
    (a cross); four panels a row."""
    panels = len(decoder_maps) + 1
    columns = min(4, panels)
    rows = -(-panels // columns)
    height, width = image.shape[-2:]
    # Panels about as large as the image (within 2-4 inches at 100 dpi) and a fixed title band:
    # no tight_layout, which renders the figure twice.
    panel_w = min(max(width / 100, 2.0), 4.0)
    panel_h = panel_w * height / width
    title_h, margin = 0.3, 0.05
    fig_w, fig_h = panel_w * columns + 2 * margin, (panel_h + title_h) * rows + margin
    figure = Figure(figsize=(fig_w, fig_h))  # savefig renders PNG with Agg, whatever pyplot's backend
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    figure.subplots_adjust(left=margin / fig_w, right=1 - margin / fig_w, bottom=margin / fig_h)
    figure.subplots_adjust(top=1 - title_h / fig_h, wspace=0.02, hspace=title_h / panel_h)
    pixels = image.permute(1, 2, 0).cpu().numpy()
    for ax in axes:
        ax.axis("off")
    for ax, heat, box, caption, label in zip(axes, decoder_maps, boxes, captions, labels, strict=False):
        _overlay(ax, pixels, heat)
        draw_boxes(ax, box[None], color=np.array(class_color(label)) / 255, linewidth=2)
        ax.set_title(f"decoder: {caption}", fontsize=9)
    x, y = encoder_pixel
    ax = axes[len(decoder_maps)]
    _overlay(ax, pixels, encoder_map)
    ax.plot([x], [y], marker="x", color="white", markersize=10, mew=2)
    ax.set_title(f"encoder at x={x:.0f}, y={y:.0f}", fontsize=9)
    figure.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})


def _overlay(ax: Axes, pixels: np.ndarray, heat: Tensor) -> None:
    ax.imshow(pixels)
    ax.imshow(heat.float().cpu().numpy(), cmap="inferno", alpha=0.55)
