"""The COCO detection dataset and the official target conversion (``ConvertCocoPolysToMask``, boxes only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from detr_lightning.data.categories import LabelMap
from detr_lightning.data.errors import DataError
from detr_lightning.data.images import escapes_folder, read_image_rgb
from detr_lightning.data.transforms import DetectionTransform

Transform = Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


def convert_coco_annotations(
    annotations: Sequence[dict[str, Any]], height: int, width: int, category_to_label: dict[int, int]
) -> dict[str, Tensor]:
    """Turn one image's COCO annotations into an absolute-``xyxy`` target, as the official code does.

    Crowd annotations are left out, ``xywh`` becomes ``xyxy``, boxes are clamped to the ``width`` x
    ``height`` image and boxes without width or height are dropped.

    Returns:
        ``boxes`` ``(N, 4)`` float32 ``xyxy`` pixels, ``labels`` ``(N,)`` int64, ``area`` ``(N,)`` float32
        (from the annotations), ``iscrowd`` ``(N,)`` int64 (all 0).
    """
    kept = [ann for ann in annotations if not ann.get("iscrowd", 0)]
    boxes = torch.tensor([ann["bbox"] for ann in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    labels = torch.tensor([category_to_label[ann["category_id"]] for ann in kept], dtype=torch.int64)
    area = torch.tensor([float(ann["area"]) for ann in kept], dtype=torch.float32)
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "area": area[keep],
        "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
    }


@dataclass(frozen=True)
class _ImageEntry:
    image_id: int
    path: Path
    height: int
    width: int
    apply_exif_orientation: bool
    target: dict[str, np.ndarray]


class CocoDetection(Dataset):
    """Images of one COCO annotation file with DETR targets; images without objects are kept.

    Items are ``(image, target)``: ``image`` ``(3, H, W)`` float32 normalised with ImageNet mean/std;
    ``target`` holds ``boxes`` ``(N, 4)`` float32 normalised ``cxcywh`` relative to the transformed,
    unpadded image, ``labels`` ``(N,)`` int64, ``image_id`` int64 scalar, ``orig_size`` ``(2,)`` int64
    ``(h, w)`` of the file, ``size`` ``(2,)`` int64 ``(h, w)`` after transforms, ``area`` ``(N,)`` float32
    (box area in transformed pixels) and ``iscrowd`` ``(N,)`` int64. Crowd boxes are not in targets.

    Args:
        coco: index of the validated annotation file (see `detr_lightning.data.check.load_split`).
        img_dir: folder the ``file_name``s are relative to.
        label_map: category id -> label.
        transform: a `DetectionTransform`; ``None`` means normalisation only.
        images_read_unrotated: ids of images whose record matches the stored pixels of a rotated file.
        ann_file: shown in error messages.
    """

    def __init__(
        self,
        coco: COCO,
        img_dir: Path,
        label_map: LabelMap,
        transform: Transform | None = None,
        images_read_unrotated: frozenset[int] = frozenset(),
        ann_file: Path | None = None,
    ) -> None:
        self.transform: Transform = transform if transform is not None else DetectionTransform()
        self.ann_file = ann_file
        self.img_dir = Path(img_dir).resolve()
        self.image_ids = sorted(coco.imgs)
        # Compact per-image numpy targets: cheaper to share with forked workers than the COCO index.
        self._entries = []
        for image_id in self.image_ids:
            record = coco.imgs[image_id]
            target = convert_coco_annotations(
                coco.imgToAnns.get(image_id, []),
                record["height"],
                record["width"],
                label_map.category_to_label,
            )
            self._entries.append(
                _ImageEntry(
                    image_id=image_id,
                    path=Path(img_dir) / record["file_name"],
                    height=record["height"],
                    width=record["width"],
                    apply_exif_orientation=image_id not in images_read_unrotated,
                    target={key: value.numpy() for key, value in target.items()},
                )
            )

    def __len__(self) -> int:
        return len(self._entries)

    def read_image(self, index: int) -> Tensor:
        """The decoded ``(3, H, W)`` uint8 RGB image of item ``index``, checked against its record."""
        entry = self._entries[index]
        source = f"{self.ann_file}: " if self.ann_file is not None else ""
        if escapes_folder(entry.path, self.img_dir):
            raise DataError(
                f"{source}image {entry.path} (image id {entry.image_id}) is a link to "
                f"{entry.path.resolve()}, outside the image folder {self.img_dir}. Fix: copy the file into "
                "the image folder (links must stay inside it)."
            )
        try:
            image = read_image_rgb(entry.path, apply_exif_orientation=entry.apply_exif_orientation)
        except (RuntimeError, OSError) as err:
            raise DataError(
                f"{source}image {entry.path} (image id {entry.image_id}) cannot be decoded: {err}. "
                "Fix: replace the file or remove its record and annotations."
            ) from None
        if tuple(image.shape[-2:]) != (entry.height, entry.width):
            raise DataError(
                f"{source}image {entry.path} (image id {entry.image_id}) is "
                f"{image.shape[-1]}x{image.shape[-2]} (width x height) but its record says "
                f"{entry.width}x{entry.height}. Fix: correct the record."
            )
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        entry = self._entries[index]
        image = self.read_image(index)
        target = {key: torch.from_numpy(value.copy()) for key, value in entry.target.items()}
        target["image_id"] = torch.tensor(entry.image_id, dtype=torch.int64)
        target["orig_size"] = torch.tensor([entry.height, entry.width], dtype=torch.int64)
        return self.transform(image, target)
