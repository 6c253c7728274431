"""Detect objects in image files: what ``predict.py`` runs.

For an image or a folder of images it writes, into the output folder:

- ``predictions.json``: per image its file, ``width``/``height`` and the detections scoring at least
  the threshold, best first: ``boxes`` (xyxy, original-image pixels, clipped to the image), ``scores``,
  ``labels`` (the model's label ids) and ``names``;
- ``images/<file name>``: the image with its boxes, class names and scores drawn;
- with ``attention``: ``attention/<file name>.png``, the last decoder layer's cross-attention of each
  detection and the encoder self-attention at one pixel (see `detr_lightning.attention`).

DETR's output is shown as it is: no NMS, only the score threshold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from detr_lightning.attention import (
    AttentionCapture,
    capture_attention,
    decoder_attention_maps,
    encoder_attention_map,
)
from detr_lightning.batching import pad_images_to_batch
from detr_lightning.data.errors import DataError
from detr_lightning.data.images import DECODABLE_FORMATS, read_image_header, read_image_rgb
from detr_lightning.inference import (
    Detector,
    InferenceSettingError,
    load_detector,
    preprocess_image,
    select_device,
)
from detr_lightning.models.postprocess import PostProcess
from detr_lightning.viz import draw_detections, save_attention_figure, save_image

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"
DRAWN_DIR = "images"
ATTENTION_DIR = "attention"


def predict(cfg: DictConfig) -> Path:
    """Run the configured model on ``cfg.input`` and write the outputs; returns ``predictions.json``."""
    output_dir = Path(cfg.output_dir).expanduser()
    threshold = float(cfg.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise InferenceSettingError(f"threshold={threshold} must be between 0 and 1 (a class probability).")
    if int(cfg.batch_size) < 1:
        raise InferenceSettingError(f"batch_size={cfg.batch_size} must be at least 1.")
    pixel = cfg.get("attention_pixel")
    if pixel is not None and not (isinstance(pixel, Sequence) and len(pixel) == 2):
        raise InferenceSettingError(f"attention_pixel={pixel} must be [x, y] in image pixels.")
    if OmegaConf.is_missing(cfg, "input") or cfg.input is None:
        raise DataError("input is not set. Fix: input=IMAGE_FILE or input=FOLDER_OF_IMAGES.")
    files = list_images(cfg.input)  # before loading the model: a wrong path is reported at once
    class_names = cfg.get("class_names")
    detector = load_detector(
        ckpt_path=cfg.get("ckpt_path"),
        pretrained=cfg.model.get("pretrained"),
        class_names=OmegaConf.to_container(class_names) if class_names is not None else None,
        scale=cfg.get("scale"),
        max_size=cfg.get("max_size"),
    )
    results = predict_files(
        detector,
        files,
        output_dir,
        threshold=threshold,
        batch_size=int(cfg.batch_size),
        device=select_device(str(cfg.device)),
        num_workers=int(cfg.get("num_workers", 0)),
        attention=bool(cfg.get("attention", False)),
        attention_pixel=tuple(float(v) for v in pixel) if pixel is not None else None,
        progress=bool(cfg.get("progress", True)),
    )
    return write_predictions(results, detector, threshold, output_dir)


def list_images(input_path: str | Path) -> list[Path]:
    """The image files at ``input_path`` (one file, or a folder's files, not recursive, sorted).

    Files of a folder that are not decodable images (JPEG, PNG, GIF, WEBP) are skipped with a warning.

    Raises:
        DataError: a missing path, a single file that is not an image, or a folder without images.
    """
    path = Path(str(input_path)).expanduser()
    if not path.exists():
        raise DataError(f"input={path} does not exist. Fix: give an image file or a folder of images.")
    if path.is_file():
        problem = _not_an_image(path)
        if problem:
            raise DataError(f"input={path} {problem}. Fix: give a JPEG, PNG, GIF or WEBP image, or a folder.")
        return [path]
    images = []
    for candidate in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        problem = _not_an_image(candidate)
        if problem:
            log.warning("Skipping %s: it %s.", candidate, problem)
        else:
            images.append(candidate)
    if not images:
        raise DataError(
            f"input={path} holds no image files (JPEG, PNG, GIF or WEBP). Fix: point input at images."
        )
    return images


def _not_an_image(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image, or None (reads the header only)."""
    try:
        header = read_image_header(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return "is not an image file"
    if header.format not in DECODABLE_FORMATS:
        return f"is a {header.format} image, which cannot be decoded (supported: {sorted(DECODABLE_FORMATS)})"
    return None


@dataclass
class LoadedImage:
    """One decoded file: ``image`` ``(3, H, W)`` uint8 RGB and ``pixels`` ``(3, H_in, W_in)`` the model
    input; both None and ``error`` set when decoding failed."""

    path: Path
    image: Tensor | None
    pixels: Tensor | None
    error: str | None = None


class ImageFiles(Dataset):
    """Decode (EXIF orientation applied; gray, RGBA and palette images become RGB) and preprocess."""

    def __init__(self, paths: Sequence[Path], scale: int, max_size: int | None) -> None:
        self.paths = list(paths)
        self.scale = scale
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        path = self.paths[index]
        try:
            image = read_image_rgb(path)
        except (RuntimeError, OSError, ValueError) as error:
            return LoadedImage(path, None, None, f"{type(error).__name__}: {error}")
        return LoadedImage(path, image, preprocess_image(image, self.scale, self.max_size))


def _as_list(batch: list[LoadedImage]) -> list[LoadedImage]:
    return batch


def predict_files(
    detector: Detector,
    paths: Sequence[Path],
    output_dir: Path,
    threshold: float = 0.7,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    attention: bool = False,
    attention_pixel: Sequence[float] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Detect objects in ``paths`` in batches; write the drawn images (and attention figures).

    Returns one record per image that could be decoded (see the module docstring); files that fail to
    decode are skipped with a warning.
    """
    device = torch.device(device)
    model = detector.model.to(device).eval()
    postprocess = detector.postprocess()
    (output_dir / DRAWN_DIR).mkdir(parents=True, exist_ok=True)
    if attention:
        (output_dir / ATTENTION_DIR).mkdir(parents=True, exist_ok=True)
    loader = DataLoader(
        ImageFiles(paths, detector.scale, detector.max_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    columns = (TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results = []
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("predict", total=len(paths))
        for batch in loader:
            for failed in (item for item in batch if item.error is not None):
                log.warning("Skipping %s: cannot decode it (%s).", failed.path, failed.error)
            items = [item for item in batch if item.error is None]
            if items:
                results.extend(
                    _predict_batch(
                        model, postprocess, items, detector, output_dir, threshold, attention, attention_pixel
                    )
                )
            bar.advance(task, len(batch))
    return results


@torch.inference_mode()
def _predict_batch(
    model: torch.nn.Module,
    postprocess: PostProcess,
    items: list[LoadedImage],
    detector: Detector,
    output_dir: Path,
    threshold: float,
    attention: bool,
    attention_pixel: Sequence[float] | None,
) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    images, mask = pad_images_to_batch([item.pixels for item in items])
    with capture_attention(model) if attention else nullcontext() as capture:
        outputs = model(images.to(device), mask.to(device))
    sizes = torch.tensor([item.image.shape[-2:] for item in items], device=device)  # (B, 2) h, w
    records = []
    for index, (item, detections) in enumerate(zip(items, postprocess(outputs, sizes), strict=True)):
        height, width = (int(v) for v in item.image.shape[-2:])
        keep = (detections["scores"] >= threshold).nonzero().flatten()
        keep = keep[detections["scores"][keep].argsort(descending=True)]  # detection indices, best first
        scores = detections["scores"][keep].cpu()
        labels = detections["labels"][keep].cpu().tolist()
        boxes = detections["boxes"][keep].cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        names = [detector.class_name(label) for label in labels]
        captions = [f"{name} {score:.2f}" for name, score in zip(names, scores.tolist(), strict=True)]
        drawn_path = output_dir / DRAWN_DIR / _drawn_name(item.path)
        save_image(draw_detections(item.image, boxes, labels, captions), drawn_path)
        record = {
            "file": str(item.path),
            "width": width,
            "height": height,
            "boxes": [[round(v, 2) for v in box] for box in boxes.tolist()],
            "scores": scores.tolist(),
            "labels": labels,
            "names": names,
            "drawn": str(drawn_path.relative_to(output_dir)),
        }
        if attention:
            figure_path = output_dir / ATTENTION_DIR / f"{item.path.name}.png"
            pixel = attention_pixel if attention_pixel is not None else _top_box_centre(boxes, width, height)
            queries = detections["queries"][keep].tolist()  # the decoder query behind each detection
            _save_attention(capture, index, item, queries, boxes, captions, labels, pixel, figure_path)
            record["attention"] = str(figure_path.relative_to(output_dir))
            record["attention_pixel"] = [float(v) for v in pixel]
        records.append(record)
    return records


def _drawn_name(path: Path) -> str:
    """The input's name for JPEG and PNG files (same format), ``<name>.png`` for the other formats."""
    return path.name if path.suffix.lower() in (".jpg", ".jpeg", ".png") else f"{path.name}.png"


def _top_box_centre(boxes: Tensor, width: int, height: int) -> tuple[float, float]:
    """Centre of the best detection's box, or of the image when nothing was detected."""
    if len(boxes) == 0:
        return width / 2, height / 2
    x0, y0, x1, y1 = boxes[0].tolist()
    return (x0 + x1) / 2, (y0 + y1) / 2


def _save_attention(
    capture: AttentionCapture,
    index: int,
    item: LoadedImage,
    queries: list[int],
    boxes: Tensor,
    captions: list[str],
    labels: list[int],
    pixel: Sequence[float],
    path: Path,
) -> None:
    input_size = tuple(item.pixels.shape[-2:])
    image_size = tuple(item.image.shape[-2:])
    # One map at a time: K full-resolution maps of a large image would take K * H * W * 4 bytes at once.
    decoder_maps = [
        decoder_attention_maps(capture, index, [query], input_size, image_size)[0].cpu() for query in queries
    ]
    encoder_map = encoder_attention_map(capture, index, pixel, input_size, image_size).cpu()
    save_attention_figure(item.image, path, decoder_maps, boxes, captions, labels, encoder_map, pixel)


def write_predictions(
    results: list[dict[str, Any]], detector: Detector, threshold: float, output_dir: Path
) -> Path:
    """``predictions.json`` with the run's settings and every image's detections."""
    path = output_dir / PREDICTIONS_FILE
    content = {
        "model": detector.source,
        "threshold": threshold,
        "resize": {"scale": detector.scale, "max_size": detector.max_size},
        "box_format": "xyxy in original-image pixels",
        "class_names": {str(label): name for label, name in sorted(detector.class_names.items())},
        "images": results,
    }
    path.write_text(json.dumps(content, indent=1))
    detections = sum(len(record["scores"]) for record in results)
    log.info(
        "%d detection(s) in %d image(s): %s (drawn images in %s)",
        detections,
        len(results),
        path,
        path.parent / DRAWN_DIR,
    )
    return path
