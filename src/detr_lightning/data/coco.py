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
from torchvision.ops import box_convert, clip_boxes_to_image

from detr_lightning.data.categories import LabelMap
from detr_lightning.data.errors import DataError
from detr_lightning.data.images import escapes_folder, read_image_rgb
from detr_lightning.data.transforms import DetectionTransform

Transform = Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


def convert_coco_annotations(
    annotations: Sequence[dict[str, Any]], height: int, width: int, category_to_label: dict[int, int]
) -> dict[str, Tensor]:
    """One image's COCO annotations as an absolute-``xyxy`` target, as the official code makes it: crowd
    annotations left out, boxes clamped to the image, boxes without width or height dropped.

    Returns ``boxes (N, 4)`` float32 xyxy pixels, ``labels (N,)`` int64, ``area (N,)`` float32 (from the
    annotations) and ``iscrowd (N,)`` int64 (all 0).
    """
    kept = [ann for ann in annotations if not ann.get("iscrowd", 0)]
    xywh = torch.tensor([ann["bbox"] for ann in kept], dtype=torch.float32).reshape(-1, 4)
    boxes = clip_boxes_to_image(box_convert(xywh, "xywh", "xyxy"), (height, width))
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    labels = torch.tensor([category_to_label[ann["category_id"]] for ann in kept], dtype=torch.int64)
    area = torch.tensor([float(ann["area"]) for ann in kept], dtype=torch.float32)
    iscrowd = torch.zeros(int(keep.sum()), dtype=torch.int64)
    return {"boxes": boxes[keep], "labels": labels[keep], "area": area[keep], "iscrowd": iscrowd}


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

    ``coco`` indexes the validated annotation file (see `detr_lightning.data.check.load_split`), whose
    ``file_name``s are relative to ``img_dir``; ``transform`` defaults to normalisation only;
    ``images_read_unrotated`` are read without their EXIF rotation; ``ann_file`` names errors.
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
        self.source = f"{ann_file}: " if ann_file is not None else ""  # starts error messages
        self.img_dir = Path(img_dir).resolve()
        self.image_ids = sorted(coco.imgs)
        # Compact per-image numpy targets: cheaper to share with forked workers than the COCO index.
        self._entries = []
        for image_id in self.image_ids:
            record = coco.imgs[image_id]
            height, width = record["height"], record["width"]
            anns = coco.imgToAnns.get(image_id, [])
            target = convert_coco_annotations(anns, height, width, label_map.category_to_label)
            self._entries.append(
                _ImageEntry(
                    image_id=image_id,
                    path=Path(img_dir) / record["file_name"],
                    height=height,
                    width=width,
                    apply_exif_orientation=image_id not in images_read_unrotated,
                    target={key: value.numpy() for key, value in target.items()},
                )
            )

    def __len__(self) -> int:
        return len(self._entries)

    def read_image(self, index: int) -> Tensor:
        """The decoded ``(3, H, W)`` uint8 RGB image of item ``index``, checked against its record."""
        entry = self._entries[index]
        where = f"{self.source}image {entry.path} (image id {entry.image_id})"
        if escapes_folder(entry.path, self.img_dir):
            raise DataError(
                f"{where} is a link to {entry.path.resolve()}, outside the image folder {self.img_dir}. "
                "Fix: copy the file into the image folder (links must stay inside it)."
            )
        try:
            image = read_image_rgb(entry.path, apply_exif_orientation=entry.apply_exif_orientation)
        except (RuntimeError, OSError) as err:
            raise DataError(
                f"{where} cannot be decoded: {err}. "
                "Fix: replace the file or remove its record and annotations."
            ) from None
        if tuple(image.shape[-2:]) != (entry.height, entry.width):
            raise DataError(
                f"{where} is {image.shape[-1]}x{image.shape[-2]} (width x height) but its record says "
                f"{entry.width}x{entry.height}. Fix: correct the record."
            )
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        entry = self._entries[index]
        target = {key: torch.from_numpy(value.copy()) for key, value in entry.target.items()}
        target["image_id"] = torch.tensor(entry.image_id, dtype=torch.int64)
        target["orig_size"] = torch.tensor([entry.height, entry.width], dtype=torch.int64)
        return self.transform(self.read_image(index), target)
