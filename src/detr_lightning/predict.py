"""Detect objects in image files: what ``predict.py`` runs.

For an image or a folder of images it writes, into the output folder: ``predictions.json`` (per image
its file, size and the detections scoring at least the threshold, best first: xyxy ``boxes`` in
original-image pixels clipped to the image, ``scores``, ``labels``, ``names``), ``images/<file name>``
(the boxes drawn) and, with ``attention``, ``attention/<file name>.png`` (`detr_lightning.attention`).
DETR's output is shown as it is: no NMS, only the score threshold.

Data flow: :class:`ImageFiles` (decode, resize) -> :func:`collate_images` (pad) -> ``Trainer.predict``
with :class:`DetectorModule` (forward, post-process) -> :class:`PredictionWriter` (threshold, files).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import clip_boxes_to_image

from detr_lightning.attention import (
    AttentionCapture,
    capture_attention,
    decoder_attention_maps,
    encoder_attention_map,
)
from detr_lightning.batching import pad_images_to_batch
from detr_lightning.config import check_values
from detr_lightning.data.errors import DataError
from detr_lightning.data.images import DECODABLE_FORMATS, image_header_or_error, read_image_rgb
from detr_lightning.files import write_json
from detr_lightning.inference import Detector, InferenceSettingError, load_detector, preprocess_image
from detr_lightning.viz import draw_detections, save_attention_figure, save_image

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"
DRAWN_DIR = "images"
ATTENTION_DIR = "attention"


def predict(cfg: DictConfig) -> Path:
    """Run the configured model on ``cfg.input`` and write the outputs; returns ``predictions.json``."""
    check_values(cfg)
    threshold, pixel = float(cfg.threshold), cfg.get("attention_pixel")
    if not 0.0 <= threshold <= 1.0:
        raise InferenceSettingError(f"threshold={threshold} must be between 0 and 1 (a class probability).")
    if pixel is not None and not (isinstance(pixel, Sequence) and len(pixel) == 2):
        raise InferenceSettingError(f"attention_pixel={pixel} must be [x, y] in image pixels.")
    if OmegaConf.is_missing(cfg, "input") or cfg.input is None:
        raise DataError("input is not set. Fix: input=IMAGE_FILE or input=FOLDER_OF_IMAGES.")
    files = list_images(cfg.input)  # before loading the model: a wrong path is reported at once
    device = trainer_device(str(cfg.device))
    detector = load_detector(
        ckpt_path=cfg.get("ckpt_path"),
        pretrained=cfg.model.get("pretrained"),
        class_names=cfg.get("class_names"),
        scale=cfg.get("scale"),
        max_size=cfg.get("max_size"),
    )
    pixel = tuple(float(v) for v in pixel) if pixel is not None else None
    writer = PredictionWriter(detector, Path(cfg.output_dir).expanduser(), threshold, pixel)
    images = ImageFiles(files, detector.scale, detector.max_size)
    batch_size, num_workers = int(cfg.batch_size), int(cfg.num_workers)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # no device report or logger tip on every run
    try:
        trainer = lightning.Trainer(
            **device,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=bool(cfg.progress),
            callbacks=[writer, RichProgressBar()] if cfg.progress else [writer],
        )
        # Not returned: Lightning would keep every batch's outputs, attention maps included, until the end.
        trainer.predict(DetectorModule(detector, bool(cfg.attention)), loader, return_predictions=False)
    finally:
        lightning_log.setLevel(level)
    return writer.output_dir / PREDICTIONS_FILE


def trainer_device(device: str) -> dict[str, Any]:
    """The Trainer's ``accelerator`` and ``devices`` for ``device=auto|cpu|cuda|cuda:N``: one device
    (``auto``: Lightning's choice). An `InferenceSettingError` for an unknown device or a missing GPU."""
    if device in ("auto", "cpu"):
        return {"accelerator": device, "devices": 1}
    kind, colon, index = device.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise InferenceSettingError(f"device={device!r} is not a device. Fix: auto, cpu or cuda.")
    gpu = int(index or 0)
    if not torch.cuda.is_available() or gpu >= torch.cuda.device_count():
        raise InferenceSettingError(
            f"device={device} but no such CUDA GPU is available. Fix: device=auto or cpu."
        )
    return {"accelerator": "gpu", "devices": [gpu]}


def list_images(input_path: str | Path) -> list[Path]:
    """The image files at ``input_path``: one file, or a folder's (sorted, not recursive, non-images
    skipped with a warning). A `DataError` for a missing path, a non-image file or no image at all."""
    path = Path(str(input_path)).expanduser()
    if not path.exists():
        raise DataError(f"input={path} does not exist. Fix: give an image file or a folder of images.")
    if path.is_file():
        if problem := _not_an_image(path):
            raise DataError(f"input={path} {problem}. Fix: give a JPEG, PNG, GIF or WEBP image, or a folder.")
        return [path]
    images = []
    for candidate in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        if problem := _not_an_image(candidate):
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
    if isinstance(header := image_header_or_error(path), Exception):
        return "is not an image file"
    if header.format not in DECODABLE_FORMATS:
        return f"is a {header.format} image, which cannot be decoded (supported: {sorted(DECODABLE_FORMATS)})"
    return None


class LoadedImage(NamedTuple):
    """One decoded file: ``image`` ``(3, H, W)`` uint8 RGB and ``pixels`` ``(3, H_in, W_in)`` the model
    input; both None and ``error`` set when decoding failed."""

    path: Path
    image: Tensor | None
    pixels: Tensor | None
    error: str | None = None


@dataclass
class ImageFiles(Dataset):
    """Decode (EXIF orientation applied; gray, RGBA and palette images become RGB) and preprocess."""

    paths: Sequence[Path]
    scale: int
    max_size: int | None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        path = self.paths[index]
        try:
            image = read_image_rgb(path)
        except (RuntimeError, OSError, ValueError) as error:
            return LoadedImage(path, None, None, f"{type(error).__name__}: {error}")
        return LoadedImage(path, image, preprocess_image(image, self.scale, self.max_size))


class ImageBatch(NamedTuple):
    """``B`` decoded files and the failed ones: ``images`` ``(B, 3, H_max, W_max)`` float32 padded inputs,
    ``mask`` ``(B, H_max, W_max)`` True on padding, ``sizes`` ``(B, 2)`` original (height, width); all
    three None when ``B = 0``."""

    images: Tensor | None
    mask: Tensor | None
    sizes: Tensor | None
    loaded: list[LoadedImage]
    failed: list[LoadedImage]


def collate_images(items: list[LoadedImage]) -> ImageBatch:
    loaded = [item for item in items if item.error is None]
    failed = [item for item in items if item.error is not None]
    if not loaded:
        return ImageBatch(None, None, None, loaded, failed)
    images, mask = pad_images_to_batch([item.pixels for item in loaded])
    sizes = torch.tensor([item.image.shape[-2:] for item in loaded])
    return ImageBatch(images, mask, sizes, loaded, failed)


class DetectorModule(lightning.LightningModule):
    """A `Detector`'s model and post-processing for ``Trainer.predict`` (official weights have no
    `DETRLitModule` settings)."""

    def __init__(self, detector: Detector, attention: bool = False) -> None:
        super().__init__()
        self.model = detector.model
        self.postprocess = detector.postprocess()
        self.attention = attention

    def transfer_batch_to_device(
        self, batch: ImageBatch, device: torch.device, dataloader_idx: int
    ) -> ImageBatch:
        """Only the model inputs go to the device: the decoded images stay on the host for drawing."""
        if batch.images is None:
            return batch
        return batch._replace(
            images=batch.images.to(device), mask=batch.mask.to(device), sizes=batch.sizes.to(device)
        )

    def predict_step(self, batch: ImageBatch) -> tuple[list[dict[str, Tensor]], AttentionCapture | None]:
        """Per image ``scores``, ``labels``, ``queries`` ``(N,)`` and ``boxes`` ``(N, 4)`` xyxy original
        pixels (`PostProcess`); and the batch's attention with ``attention``, else None."""
        if batch.images is None:
            return [], None
        with capture_attention(self.model) if self.attention else nullcontext() as capture:
            outputs = self.model(batch.images, batch.mask)
        return self.postprocess(outputs, batch.sizes), capture


class PredictionWriter(BasePredictionWriter):
    """Writes the outputs of the module docstring for detections scoring at least ``threshold``: images
    batch by batch, ``predictions.json`` at the end. ``attention_pixel`` ``(x, y)``: where the encoder
    attention is shown (None: centre of the top box)."""

    def __init__(
        self,
        detector: Detector,
        output_dir: Path,
        threshold: float,
        attention_pixel: Sequence[float] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.detector = detector
        self.output_dir = output_dir
        self.threshold = threshold
        self.attention_pixel = attention_pixel
        self.records: list[dict[str, Any]] = []

    def on_predict_start(self, trainer: lightning.Trainer, pl_module: DetectorModule) -> None:
        (self.output_dir / DRAWN_DIR).mkdir(parents=True, exist_ok=True)
        if pl_module.attention:
            (self.output_dir / ATTENTION_DIR).mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: DetectorModule,
        prediction: tuple[list[dict[str, Tensor]], AttentionCapture | None],
        batch_indices: Sequence[int] | None,
        batch: ImageBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for failed in batch.failed:
            log.warning("Skipping %s: cannot decode it (%s).", failed.path, failed.error)
        detections, capture = prediction
        for index, (item, found) in enumerate(zip(batch.loaded, detections, strict=True)):
            self.records.append(self._write_image(item, found, capture, index))

    def _write_image(
        self, item: LoadedImage, found: dict[str, Tensor], capture: AttentionCapture | None, index: int
    ) -> dict[str, Any]:
        """Draw image ``index`` of the batch (and its attention figure); its record in predictions.json."""
        height, width = item.image.shape[-2:]
        keep = (found["scores"] >= self.threshold).nonzero().flatten()
        keep = keep[found["scores"][keep].argsort(descending=True)]  # detection indices, best first
        scores = found["scores"][keep].cpu()
        labels = found["labels"][keep].cpu().tolist()
        boxes = clip_boxes_to_image(found["boxes"][keep].cpu(), (height, width))
        names = [self.detector.class_name(label) for label in labels]
        captions = [f"{name} {score:.2f}" for name, score in zip(names, scores.tolist(), strict=True)]
        drawn_path = self.output_dir / DRAWN_DIR / _drawn_name(item.path)
        save_image(draw_detections(item.image, boxes, labels, captions), drawn_path)
        record = {
            "file": str(item.path),
            "width": width,
            "height": height,
            "boxes": [[round(v, 2) for v in box] for box in boxes.tolist()],
            "scores": scores.tolist(),
            "labels": labels,
            "names": names,
            "drawn": str(drawn_path.relative_to(self.output_dir)),
        }
        if capture is not None:
            figure_path = self.output_dir / ATTENTION_DIR / f"{item.path.name}.png"
            pixel = self.attention_pixel or _top_box_centre(boxes, width, height)
            sizes = (item.pixels.shape[-2:], (height, width))  # the model input's and the image's
            # One map at a time: K full-resolution maps of a large image would take K * H * W * 4 bytes.
            decoder_maps = [
                decoder_attention_maps(capture, index, [query], *sizes)[0].cpu()
                for query in found["queries"][keep].tolist()  # the decoder query behind each detection
            ]
            encoder_map = encoder_attention_map(capture, index, pixel, *sizes).cpu()
            save_attention_figure(
                item.image, figure_path, decoder_maps, boxes, captions, labels, encoder_map, pixel
            )
            record["attention"] = str(figure_path.relative_to(self.output_dir))
            record["attention_pixel"] = list(pixel)
        return record

    def on_predict_end(self, trainer: lightning.Trainer, pl_module: DetectorModule) -> None:
        """``predictions.json``: the run's settings and every image's record."""
        detector, path = self.detector, self.output_dir / PREDICTIONS_FILE
        content = {
            "model": detector.source,
            "threshold": self.threshold,
            "resize": {"scale": detector.scale, "max_size": detector.max_size},
            "box_format": "xyxy in original-image pixels",
            "class_names": {str(label): name for label, name in sorted(detector.class_names.items())},
            "images": self.records,
        }
        write_json(path, content)
        log.info(
            "%d detection(s) in %d image(s): %s (drawn images in %s)",
            sum(len(record["scores"]) for record in self.records),
            len(self.records),
            path,
            self.output_dir / DRAWN_DIR,
        )


def _drawn_name(path: Path) -> str:
    """The input's name for JPEG and PNG files (same format), ``<name>.png`` for the other formats."""
    return path.name if path.suffix.lower() in (".jpg", ".jpeg", ".png") else f"{path.name}.png"


def _top_box_centre(boxes: Tensor, width: int, height: int) -> tuple[float, float]:
    """Centre of the best detection's box, or of the image when nothing was detected."""
    x0, y0, x1, y1 = boxes[0].tolist() if len(boxes) else (0, 0, width, height)
    return (x0 + x1) / 2, (y0 + y1) / 2
