"""Export DETR to ONNX, TorchScript or a Hugging Face folder, checked against PyTorch: what ``export.py``
runs.

The exported graph takes a normalized, zero-padded batch ``images (B, 3, H, W)`` float32 and, unless
``mask_input=False``, its ``mask (B, H, W)`` bool, True on padded pixels. It returns the raw head outputs
``pred_logits (B, Q, num_classes + 1)`` and ``pred_boxes (B, Q, 4)``, normalized cxcywh relative to each
unpadded image; post-processing stays with the caller (``export.json`` says how).

The model is called with a ready batch and mask, so none of the official code's padding (whose traced
copy gave NaN in ONNX) is in the graph. ONNX Runtime's nearest ``Resize`` computes source indices as
``dst / (out / in)`` where PyTorch computes ``dst * (in / out)``; the two round differently when the
result is a whole number, which would change the feature-level padding mask and with it every output.
The ONNX graph therefore gets that mask from :func:`nearest_mask`, PyTorch's arithmetic as tensor ops.

ONNX goes through ``torch.onnx.export(dynamo=True)`` (``onnx_exporter=legacy``: ``dynamo=False``;
``auto`` falls back to it, and takes it for an ``opset`` below 18); TorchScript is a ``torch.jit.trace``,
which reads sizes at run time.
``format=huggingface`` writes a folder for transformers' ``DetrForObjectDetection`` (:mod:`.hf_format`),
checked with transformers' own forward.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from detr_lightning.config import ExportSettings, check_values
from detr_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detr_lightning.files import write_json
from detr_lightning.hf_format import WEIGHT_FILES, HFPreprocessing, import_transformers, write_hf_folder
from detr_lightning.inference import Detector, InferenceSettingError, load_detector
from detr_lightning.models.detr import DETR

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("pred_logits", "pred_boxes")
#: The opset of the legacy exporter when none is given (the dynamo exporter picks its own).
LEGACY_OPSET = 17
#: The oldest opset the dynamo exporter writes; it converts down to older ones only at best effort (it
#: keeps this one, with a logged traceback, where it cannot), so ``auto`` takes the legacy exporter below.
DYNAMO_MIN_OPSET = 18


class ExportError(RuntimeError):
    """An exported model that does not reproduce PyTorch (a bug to report, not a setting to fix)."""


class ExportableDETR(nn.Module):
    """DETR as exporters want it: ``(images (B, 3, H, W), mask (B, H, W) bool | None) -> (pred_logits,
    pred_boxes)``; without a mask no pixel is padding."""

    def __init__(self, model: DETR) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        outputs = self.model(images, mask)
        return outputs["pred_logits"], outputs["pred_boxes"]


def nearest_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """``F.interpolate(mask[None].float(), size)[0].bool()`` (legacy nearest) as index arithmetic.

    ``(B, H, W)`` bool -> ``(B, h, w)``: row ``i`` is source row ``min(floor(i * (H / h)), H - 1)`` with
    the scale and the product in float32, as PyTorch's kernel computes them; columns likewise.
    """

    def source_indices(input_size: int, output_size: int) -> Tensor:
        scale = torch.ones((), dtype=torch.float32, device=mask.device) * input_size / output_size
        positions = torch.arange(output_size, dtype=torch.float32, device=mask.device)
        return (positions * scale).floor().long().clamp_max(input_size - 1)

    rows = source_indices(mask.shape[-2], size[0])  # sizes may be symbolic while exporting
    cols = source_indices(mask.shape[-1], size[1])
    return mask.index_select(1, rows).index_select(2, cols)


def _portable_feature_mask(module: nn.Module, inputs: tuple[Tensor, Tensor], outputs: tuple[Tensor, Tensor]):
    """Forward hook on ``ResNetBackbone`` (outputs ``(features, feature_mask)``) while exporting to ONNX:
    the down-sampled mask from :func:`nearest_mask`."""
    features = outputs[0]
    return features, nearest_mask(inputs[1], features.shape[-2:])


@dataclass
class ExportResult:
    """Where the model went, how it was made, and how close it came to PyTorch on each check."""

    path: Path
    format: str
    exporter: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)


def export(cfg: DictConfig) -> ExportResult:
    """Export the configured model (``ckpt_path`` or ``model.pretrained``) and check it."""
    check_values(cfg)
    fmt, exporter = str(cfg.format), str(cfg.onnx_exporter)  # checked by the schema (export_schema)
    settings = ExportSettings.from_config(cfg)
    detector = load_detector(ckpt_path=cfg.ckpt_path, pretrained=cfg.model.pretrained)
    output_dir = Path(cfg.output_dir).expanduser()
    if fmt == "onnx":
        result = export_onnx(detector.model, output_dir / "model.onnx", settings, exporter, cfg.opset)
    elif fmt == "torchscript":
        result = export_torchscript(detector.model, output_dir / "model.pt", settings)
    else:  # the folder's config.json and preprocessor_config.json say what export.json would
        result = export_huggingface(detector, output_dir, settings)
    if fmt != "huggingface":
        write_export_info(result, detector, settings, output_dir / "export.json")
    size = "any size" if fmt != "onnx" else "dynamic size" if settings.dynamic else "fixed size"
    checked = ", ".join(f"{label} {diff:.1e}" for label, diff in result.max_abs_diff.items())
    verified = f"max |difference| to PyTorch: {checked}" if checked else "not verified (verify=false)"
    log.info("Exported %s (%s, %s) to %s; %s", result.format, result.exporter, size, result.path, verified)
    return result


def example_inputs(
    batch_size: int, height: int, width: int, mask_input: bool = True, seed: int = 0
) -> tuple[Tensor, ...]:
    """``(images, mask)`` (or ``(images,)``) of random normalized pixels; with a mask and two or more
    images, the second one is padded at the bottom and right (zeros, mask True), as a real batch is."""
    images = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))
    if not mask_input:
        return (images,)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    if batch_size >= 2:
        mask[1, (3 * height) // 4 :, :] = True
        mask[1, :, (2 * width) // 3 :] = True
        images[1] = images[1].masked_fill(mask[1], 0.0)
    return images, mask


def export_onnx(
    model: DETR,
    path: Path,
    settings: ExportSettings | None = None,
    exporter: str = "auto",
    opset: int | None = None,
    **overrides: Any,
) -> ExportResult:
    """Write ``path`` (one self-contained ``.onnx`` file) and, with ``verify``, check it in onnxruntime.

    ``settings`` (default ``ExportSettings()``) with ``overrides`` of its fields, e.g. ``height=96``.
    A dynamic export has symbolic ``batch``, ``height`` and ``width`` axes. It is traced with a batch of
    at least two: ``torch.export`` specializes size-1 dimensions to constants.
    """
    settings = replace(settings or ExportSettings(), **overrides)
    module = _exportable(model, path)
    batch_size = max(settings.batch_size, 2) if settings.dynamic else settings.batch_size
    inputs = example_inputs(batch_size, settings.height, settings.width, settings.mask_input)
    dynamo = exporter == "dynamo" or (exporter == "auto" and (opset is None or opset >= DYNAMO_MIN_OPSET))
    with module.model.backbone[0].register_forward_hook(_portable_feature_mask), _quiet_exporters():
        try:
            torch.onnx.export(module, inputs, str(path), **_onnx_options(settings, opset, dynamo))
        except Exception as error:  # the exporter raises many types; any failure means "try legacy"
            if not dynamo or exporter != "auto":
                raise
            cause = error  # torch.onnx wraps the failure in a page of advice: name the failure itself
            while cause.__cause__ is not None:
                cause = cause.__cause__
            failure = f"{type(cause).__name__}: {str(cause).partition(chr(10))[0]}"
            log.warning("torch.onnx's dynamo exporter failed (%s); using the legacy exporter.", failure)
            dynamo = False
            torch.onnx.export(module, inputs, str(path), **_onnx_options(settings, opset, dynamo))
    result = ExportResult(path, "onnx", f"torch.onnx.export(dynamo={dynamo})")
    if settings.verify:
        result.max_abs_diff = verify_export(_onnx_runner(path), module, settings)
    return result


def _onnx_options(settings: ExportSettings, opset: int | None, dynamo: bool) -> dict[str, Any]:
    """``torch.onnx.export``'s options for ``dynamo`` or the legacy exporter, each with its own way of
    naming the dynamic axes."""
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 1: "height", 2: "width"}}
    axes = {name: axes[name] for name in settings.input_names}
    options: dict[str, Any] = {
        "input_names": settings.input_names,
        "output_names": list(OUTPUT_NAMES),
        "opset_version": opset or (None if dynamo else LEGACY_OPSET),
        "dynamo": dynamo,
    }
    if dynamo:
        options.update(external_data=False, verbose=False)
    if dynamo and settings.dynamic:
        dims = {name: torch.export.Dim(name, min=1) for name in ("batch", "height", "width")}
        options["dynamic_shapes"] = {
            name: {axis: dims[dim] for axis, dim in axes[name].items()} for name in axes
        }
    elif settings.dynamic:
        options["dynamic_axes"] = {**axes, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    return options


def export_torchscript(
    model: DETR, path: Path, settings: ExportSettings | None = None, **overrides: Any
) -> ExportResult:
    """Trace to ``path`` (``torch.jit.save``) and, with ``verify``, reload it (``torch.jit.load``) and
    check it. ``settings`` (default ``ExportSettings()``) with ``overrides`` of its fields."""
    settings = replace(settings or ExportSettings(), **overrides)
    module = _exportable(model, path)
    inputs = example_inputs(settings.batch_size, settings.height, settings.width, settings.mask_input)
    with _quiet_exporters(), torch.no_grad():
        torch.jit.save(torch.jit.trace(module, inputs, check_trace=False), str(path))
    result = ExportResult(path, "torchscript", "torch.jit.trace")
    if settings.verify:
        with _quiet_exporters():
            reloaded = torch.jit.load(str(path))
            result.max_abs_diff = verify_export(lambda inputs: reloaded(*inputs), module, settings)
    return result


def export_huggingface(
    detector: Detector, folder: Path, settings: ExportSettings | None = None, **overrides: Any
) -> ExportResult:
    """Write ``folder`` as a Hugging Face DETR (:func:`~detr_lightning.hf_format.write_hf_folder`: config,
    ``model.safetensors``, the detector's resize and names) and, with ``verify``, load it with
    ``DetrForObjectDetection.from_pretrained`` and check it on the inputs of ``settings`` (default
    ``ExportSettings()``, with ``overrides`` of its fields)."""
    settings = replace(settings or ExportSettings(), **overrides)
    module = _exportable(detector.model, folder / WEIGHT_FILES[0])
    preprocessing = HFPreprocessing(detector.scale, detector.max_size, IMAGENET_MEAN, IMAGENET_STD)
    write_hf_folder(module.model, folder, detector.class_names, preprocessing)
    result = ExportResult(folder, "huggingface", "DetrForObjectDetection")
    if settings.verify:
        result.max_abs_diff = verify_export(_huggingface_runner(folder), module, settings)
    return result


def _huggingface_runner(folder: Path) -> Callable[[tuple[Tensor, ...]], list[Tensor]]:
    """The folder loaded by transformers, as a function of our model's inputs (``pixel_mask`` is 1 on
    image pixels, our mask True on padding)."""
    transformers = import_transformers("verify=true for format=huggingface")
    with _quiet_exporters():
        try:
            model = transformers.DetrForObjectDetection.from_pretrained(folder).eval()
        except ImportError as error:  # timm's ResNet (DC5 models) needs timm
            raise InferenceSettingError(
                f"transformers cannot load {folder} here ({error}). Fix: install what it names, or "
                "verify=false."
            ) from None

    def run(inputs: tuple[Tensor, ...]) -> list[Tensor]:
        pixel_mask = None if len(inputs) == 1 else (~inputs[1]).long()
        outputs = model(pixel_values=inputs[0], pixel_mask=pixel_mask)  # verify_export runs it without grad
        return [outputs.logits, outputs.pred_boxes]

    return run


def _exportable(model: DETR, path: Path) -> ExportableDETR:
    """``model`` on the CPU in eval mode, wrapped for the exporters; creates ``path``'s folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return ExportableDETR(model.cpu().eval()).eval()


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence the exporters' progress prints, deprecation notes and tracer warnings (checked anyway)."""
    levels = {"onnx_ir": logging.WARNING, "onnxscript": logging.WARNING}
    levels["onnxscript.optimizer._constant_folding"] = logging.ERROR  # "Skipping constant folding" per op
    with ExitStack() as restore, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, level in levels.items():
            logger = logging.getLogger(name)
            restore.callback(logger.setLevel, logger.level)
            logger.setLevel(level)
        yield


def _onnx_runner(path: Path) -> Callable[[tuple[Tensor, ...]], list[Tensor]]:
    """The ``.onnx`` file in an onnxruntime CPU session, as a function of the model's inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]

    def run(inputs: tuple[Tensor, ...]) -> list[Tensor]:
        feeds = {name: tensor.numpy() for name, tensor in zip(names, inputs, strict=True)}
        return [torch.from_numpy(output) for output in session.run(list(OUTPUT_NAMES), feeds)]

    return run


def verify_export(
    run: Callable[[tuple[Tensor, ...]], Sequence[Tensor]], module: nn.Module, settings: ExportSettings
) -> dict[str, float]:
    """The max abs difference between ``run`` (the exported model) and ``module`` on each check input:
    the export size and, for a dynamic export, another size and batch (odd sizes, not stride multiples).

    Raises `ExportError` on a non-finite output, a shape that differs, or a difference above
    ``settings.atol``.
    """
    sizes = [(settings.batch_size, settings.height, settings.width)]
    if settings.dynamic:
        other_height, other_width = (3 * settings.height) // 4 + 7, (2 * settings.width) // 3 + 5
        sizes.append((settings.batch_size + 1, max(48, other_height), max(48, other_width)))
    differences = {}
    for seed, size in enumerate(sizes, start=1):
        label, inputs = "{}x{}x{}".format(*size), example_inputs(*size, settings.mask_input, seed)
        with torch.no_grad():
            expected, exported = module(*inputs), run(inputs)
        worst = 0.0
        for name, ours, theirs in zip(OUTPUT_NAMES, expected, exported, strict=True):
            if not torch.isfinite(theirs).all():
                raise ExportError(f"the exported model gives non-finite {name} on input {label}")
            if ours.shape != theirs.shape:
                raise ExportError(
                    f"{name} on input {label}: shape {tuple(theirs.shape)}, PyTorch {tuple(ours.shape)}"
                )
            worst = max(worst, float((ours - theirs).abs().max()))
        if worst > settings.atol:
            raise ExportError(
                f"the exported model differs from PyTorch by {worst:.2e} (> atol={settings.atol}) "
                f"on input {label}"
            )
        differences[label] = worst
    return differences


#: How to read the exported outputs, by the model's class scoring (its training loss).
_POSTPROCESSING = {
    "softmax": "softmax over the last axis, drop the last (no-object) column, max -> score and label; "
    "boxes are cxcywh relative to the unpadded image size",
    "sigmoid": "sigmoid of every logit but the last (unused) column, then the top {top_k} (query, class) "
    "scores of the flattened queries x classes -> score, label = index % classes, box of query = "
    "index // classes; boxes are cxcywh relative to the unpadded image size",
}


def write_export_info(result: ExportResult, detector: Detector, settings: ExportSettings, path: Path) -> None:
    """``export.json``: how to feed the model (resize, normalization, padding) and read its outputs."""
    model = detector.model
    fixed_size = [settings.batch_size, 3, settings.height, settings.width]
    size = ["batch", 3, "height", "width"] if settings.dynamic else fixed_size
    inputs = {"images": {"shape": size, "dtype": "float32"}}
    if settings.mask_input:
        inputs["mask"] = {"shape": [size[0], *size[2:]], "dtype": "bool"}
    info: dict[str, Any] = {
        "model_file": result.path.name,
        "format": result.format,
        "exporter": result.exporter,
        "torch": torch.__version__,
        "source": detector.source,
        "inputs": inputs,
        "outputs": {
            "pred_logits": {"shape": [size[0], model.num_queries, model.num_classes + 1], "dtype": "float32"},
            "pred_boxes": {"shape": [size[0], model.num_queries, 4], "dtype": "float32"},
        },
        "preprocessing": {
            "resize": {"shorter_side": detector.scale, "max_size": detector.max_size},
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "padding": "bottom/right with 0 after normalization; mask True on padded pixels",
        },
        "postprocessing": _POSTPROCESSING[detector.score].format(top_k=detector.top_k or model.num_queries),
        "class_names": {str(label): name for label, name in sorted(detector.class_names.items())},
        "max_abs_diff_to_pytorch": result.max_abs_diff,
    }
    write_json(path, info)
