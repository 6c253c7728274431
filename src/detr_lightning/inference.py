"""A trained DETR ready for inference (``predict.py``, ``export.py``): weights, class names and the input
resize, from a checkpoint of this project and its run's ``.hydra/config.yaml`` (``ckpt_path``) or from
official weights (``model.pretrained``: a name, URL or file) with the 80 COCO class names, or from a
Hugging Face DETR (``model.pretrained``: a folder or hub id) with its ``id2label`` names and its resize.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights
from torchvision.transforms.v2 import functional as F

from detr_lightning.checkpoints import build_from_file, read_detr_file, read_project_checkpoint, saved_scoring
from detr_lightning.data.annotations import read_annotation_file
from detr_lightning.data.categories import build_label_map
from detr_lightning.data.errors import DataError
from detr_lightning.data.layout import resolve_layout
from detr_lightning.data.transforms import (
    DETR_EVAL_MAX_SIZE,
    DETR_EVAL_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    short_side_resize_shape,
)
from detr_lightning.models.detr import DETR
from detr_lightning.models.postprocess import PostProcess
from detr_lightning.models.weight_files import OFFICIAL_DETR_URLS, CheckpointError
from detr_lightning.runs import run_data_config

log = logging.getLogger(__name__)

#: COCO 2017 category id -> name: the labels of the official DETR models (ids 0, 12, 26, ... are unused).
COCO_CLASS_NAMES: dict[int, str] = {
    category_id: name
    for category_id, name in enumerate(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    if name not in ("__background__", "N/A")
}


class InferenceSettingError(CheckpointError):
    """A prediction/export setting that cannot be used (reported without traceback, as weight errors are)."""


@dataclass
class Detector:
    """A DETR in eval mode (no aux outputs) with what inference needs besides the weights.

    ``class_names``: label -> name (others are shown as ``class <label>``); ``scale``, ``max_size``: the
    evaluation resize the model expects; ``source``: where the weights came from; ``score``, ``top_k``:
    how `PostProcess` reads the logits (``softmax`` for ``class_loss=ce``, ``sigmoid`` for focal losses).
    """

    model: DETR
    class_names: dict[int, str] = field(default_factory=dict)
    scale: int = DETR_EVAL_SCALE
    max_size: int | None = DETR_EVAL_MAX_SIZE
    source: str = ""
    score: str = "softmax"
    top_k: int | None = None

    def class_name(self, label: int) -> str:
        return self.class_names.get(int(label), f"class {int(label)}")

    def postprocess(self) -> PostProcess:
        """The post-processing that matches the model's training loss."""
        return PostProcess(self.score, top_k=self.top_k)


def load_detector(
    ckpt_path: str | os.PathLike | None = None,
    pretrained: str | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    scale: int | None = None,
    max_size: int | None = None,
) -> Detector:
    """Load a project checkpoint (``ckpt_path``) or other weights (``pretrained``: ``detr_r50`` ..., a URL,
    a ``.pth`` file, a Hugging Face DETR folder or hub id) for inference.

    ``class_names`` (a list indexed by label, or a mapping) overrides the checkpoint's; ``scale`` and
    ``max_size`` override the run's ``data.val_scale`` / ``data.val_max_size`` (official: 800 / 1333).
    Raises a `CheckpointError` for neither or both sources, an unreadable file or weights that do not fit.
    """
    if bool(ckpt_path) == bool(pretrained):
        raise InferenceSettingError(
            "Give exactly one model: ckpt_path=RUN/checkpoints/best.ckpt (a checkpoint of this project) "
            f"or model.pretrained=detr_r50 (official weights); got ckpt_path={ckpt_path}, "
            f"model.pretrained={pretrained}."
        )
    if ckpt_path:
        detector = _load_project_checkpoint(Path(ckpt_path).expanduser())
    else:
        detector = _load_pretrained(str(pretrained))
    if class_names is not None:
        detector.class_names = _as_name_dict(class_names)
    if scale is not None:
        detector.scale = int(scale)
    if max_size is not None:
        detector.max_size = int(max_size)
    if detector.scale <= 0 or (detector.max_size is not None and detector.max_size <= 0):
        raise InferenceSettingError(
            f"scale={detector.scale}, max_size={detector.max_size}: both must be positive "
            "(shorter side and longer-side cap of the resize, in pixels)."
        )
    return detector


def _load_pretrained(source: str) -> Detector:
    """Official weights (COCO names), or any other file of ``read_detr_file`` with the class names and
    scoring it saved (a checkpoint of this project, a Hugging Face DETR's ``id2label``) and, for a Hugging
    Face DETR, the resize of its ``preprocessor_config.json``."""
    file = read_detr_file(source)
    model = build_from_file(file, aux_loss=False).eval()
    names = COCO_CLASS_NAMES if _is_official(source) else file.contents.get("class_names") or {}
    score, top_k = saved_scoring(file.contents)
    detector = Detector(model, _as_name_dict(names), source=source, score=score, top_k=top_k)
    preprocessing = dict(file.contents.get("preprocessing") or {})
    if "scale" in preprocessing:
        detector.scale, detector.max_size = int(preprocessing["scale"]), preprocessing["max_size"]
    mean, std = preprocessing.get("mean", IMAGENET_MEAN), preprocessing.get("std", IMAGENET_STD)
    if not torch.allclose(
        torch.tensor([*mean, *std]), torch.tensor([*IMAGENET_MEAN, *IMAGENET_STD]), atol=1e-3
    ):
        log.warning(
            "%s expects images normalized by mean %s, std %s; inputs here are normalized by ImageNet's "
            "mean %s, std %s, so its detections may differ from its own pipeline's.",
            source,
            mean,
            std,
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
    return detector


def _is_official(source: str) -> bool:
    """An official name or URL, or a local copy of an official file (same file name)."""
    official_files = {os.path.basename(urlparse(url).path) for url in OFFICIAL_DETR_URLS.values()}
    return source in OFFICIAL_DETR_URLS or os.path.basename(urlparse(str(source)).path) in official_files


def _as_name_dict(names: Sequence[str] | Mapping[Any, str]) -> dict[int, str]:
    if isinstance(names, Mapping):
        return {int(label): str(name) for label, name in names.items()}
    return {label: str(name) for label, name in enumerate(names)}


def _load_project_checkpoint(path: Path) -> Detector:
    file = read_project_checkpoint(path)
    model = build_from_file(file, aux_loss=False).eval()
    run_data = run_data_config(path.resolve().parent.parent)
    score, top_k = saved_scoring(file.contents)
    detector = Detector(model=model, source=str(path), score=score, top_k=top_k)
    if run_data is not None:
        detector.scale = int(run_data.get("val_scale") or DETR_EVAL_SCALE)
        detector.max_size = run_data.get("val_max_size", DETR_EVAL_MAX_SIZE)
    else:
        log.warning(
            "No run config beside %s (expected ../.hydra/config.yaml): resizing to the official %d/%d; "
            "set scale= and max_size= to the training data's val_scale/val_max_size.",
            path,
            detector.scale,
            detector.max_size,
        )
    saved_names = file.contents.get("class_names")  # label -> name, saved by DETRLitModule.on_save_checkpoint
    detector.class_names = _as_name_dict(saved_names) if saved_names else _run_class_names(run_data, path)
    return detector


def _run_class_names(run_data: Mapping[str, Any] | None, ckpt_path: Path) -> dict[int, str]:
    """Names from the run's annotation files: all splits for ``contiguous`` labels, the smallest file for
    ``raw`` ones (labels are category ids there, and every split lists the same categories)."""
    if run_data is None:
        return {}
    overrides = {split: run_data.get(split) for split in ("train", "val", "test") if run_data.get(split)}
    try:
        layout = resolve_layout(run_data.get("root"), overrides)
        ann_files = sorted({files.ann_file for files in layout.splits.values()}, key=_file_size)
        mode = run_data.get("label_mapping", "raw")
        if mode == "raw":
            ann_files = ann_files[:1]
        sources = [(ann_file, read_annotation_file(ann_file)) for ann_file in ann_files]
        return dict(build_label_map(sources, mode).class_names)
    except DataError as error:
        log.warning(
            "Class names unavailable (the data of the run that wrote %s: %s); labels are shown as "
            "'class <id>'. Fix: pass class_names=[...] (indexed by label).",
            ckpt_path,
            error,
        )
        return {}


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def preprocess_image(image: Tensor, scale: int, max_size: int | None) -> Tensor:
    """The evaluation transform: ``(3, H, W)`` uint8 RGB -> ``(3, H', W')`` float32, ImageNet-normalized,
    shorter side ``scale`` and longer side at most ``max_size`` (bilinear, antialiased, as in training)."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    resized = F.resize(image, list(short_side_resize_shape(height, width, scale, max_size)), antialias=True)
    pixels = F.to_dtype(resized, torch.float32, scale=True)
    return F.normalize(pixels, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
