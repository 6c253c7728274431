"""The official DETR augmentations (see `make_train_geometry`, `make_eval_geometry`, `DetectionTransform`),
written with ``torchvision.transforms.v2`` and ``tv_tensors``.

Sizes follow the official ``get_size_with_aspect_ratio`` exactly (integer truncation), and resizing is
bilinear with antialiasing, as PIL did for the official code. Random choices use the torch RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_area, box_convert, clip_boxes_to_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official values, for COCO at 800 px.
DETR_TRAIN_SCALES = tuple(range(480, 801, 32))
DETR_TRAIN_MAX_SIZE = 1333
DETR_CROP_RESIZE_SCALES = (400, 500, 600)
DETR_CROP_SIZE = (384, 600)
DETR_EVAL_SCALE = 800
DETR_EVAL_MAX_SIZE = 1333


def short_side_resize_shape(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output ``(height, width)`` of the official resize: shorter side ``size``, longer side <= ``max_size``.

    Example: ``(480, 640)`` with ``size=800, max_size=1333`` gives ``(800, 1066)``.
    """
    if max_size is not None:
        shorter, longer = float(min(height, width)), float(max(height, width))
        if longer / shorter * size > max_size:
            size = max(1, int(round(max_size * shorter / longer)))  # never 0 for extreme aspect ratios
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _randint(low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (both included) from the torch RNG."""
    return int(torch.randint(low, high + 1, ()).item())


class RandomShortSideResize(v2.Transform):
    """Resize so the shorter side is a random choice of ``sizes`` and the longer side <= ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes = [int(size) for size in sizes]
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = self.sizes[_randint(0, len(self.sizes) - 1)]
        return {"shape": short_side_resize_shape(height, width, size, self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=list(params["shape"]), antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random region of random size: width in ``[min_size, min(W, max_size)]``, same for height.

    Where the image is smaller than ``min_size`` the lower bound becomes the image size (the official
    code would fail there). Boxes are cut at the region border; emptied boxes are dropped later.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_width = _randint(min(self.min_size, width), min(width, self.max_size))
        crop_height = _randint(min(self.min_size, height), min(height, self.max_size))
        top = _randint(0, height - crop_height)
        left = _randint(0, width - crop_width)
        return {"top": top, "left": left, "height": crop_height, "width": crop_width}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def make_train_geometry(
    scales: Sequence[int] = DETR_TRAIN_SCALES,
    max_size: int | None = DETR_TRAIN_MAX_SIZE,
    crop_resize_scales: Sequence[int] = DETR_CROP_RESIZE_SCALES,
    crop_size: tuple[int, int] = DETR_CROP_SIZE,
) -> v2.Transform:
    """The official training geometry: a horizontal flip (p=0.5), then with p=0.5 each a multi-scale resize
    (shorter side from ``scales``, longer side <= ``max_size``), or a resize to ``crop_resize_scales``, a
    random crop of ``crop_size`` and the same multi-scale resize."""
    resize = RandomShortSideResize(scales, max_size)
    crop = v2.Compose([RandomShortSideResize(crop_resize_scales), RandomSizeCrop(*crop_size), resize])
    return v2.Compose([v2.RandomHorizontalFlip(p=0.5), v2.RandomChoice([resize, crop])])


def make_eval_geometry(
    scale: int = DETR_EVAL_SCALE, max_size: int | None = DETR_EVAL_MAX_SIZE
) -> v2.Transform:
    """The official evaluation geometry: shorter side ``scale``, longer side <= ``max_size``."""
    return RandomShortSideResize([scale], max_size)


class DetectionTransform:
    """Geometric augmentation + normalisation of one image and its absolute ``xyxy`` boxes.

    Call with ``image`` ``(3, H, W)`` uint8 and a target dict holding ``boxes`` ``(N, 4)`` float32 absolute
    ``xyxy`` plus per-box tensors ``labels``, ``iscrowd`` (``(N,)``); other keys are passed through.
    Returns ``image`` ``(3, H', W')`` float32 normalised with ImageNet mean/std and the target with
    ``boxes`` ``(N', 4)`` normalised ``cxcywh`` (relative to ``H', W'``), ``labels``/``iscrowd``
    ``(N',)``, ``area`` ``(N',)`` = box area in pixels of the transformed image, ``size`` = ``(H', W')``.
    Boxes are clamped to the image and those left with no width or height are dropped (``N' <= N``).
    """

    def __init__(self, geometry: v2.Transform | None = None) -> None:
        self.geometry = geometry

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        image = tv_tensors.Image(image)
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
        if self.geometry is not None:
            image, boxes = self.geometry(image, boxes)
        height, width = image.shape[-2:]
        pixels = F.to_dtype(image, torch.float32, scale=True)
        pixels = F.normalize(pixels, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))

        xyxy = clip_boxes_to_image(boxes.as_subclass(Tensor), (height, width))  # (N, 4)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        xyxy = xyxy[keep]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        out = dict(target, boxes=box_convert(xyxy, "xyxy", "cxcywh") / scale)  # (N', 4) in [0, 1]
        out.update(labels=target["labels"][keep], iscrowd=target["iscrowd"][keep], area=box_area(xyxy))
        out["size"] = torch.tensor([height, width], dtype=torch.int64)
        return pixels.as_subclass(Tensor), out
