"""Benchmarks: ``python -m detr_lightning.bench {train-step,inference,data,metric} [options]``.

Each benchmark prints a few human-readable lines and, last, one JSON line with its figures (so a
script can ``tail -n 1``). Figures go into ``BENCHMARKS.md`` with the date, machine and command.

- ``train-step``: model + criterion + backward + AdamW step (backbone group, clip 0.1) of DETR-R50
  (6+6 layers, 100 queries, 91 classes, aux loss) on two images (3, 512, 512) and (3, 512, 681) with
  2 and 3 boxes. ``--impl huggingface`` runs the Hugging Face ``DetrForObjectDetection`` on the same
  work as a baseline (``pip install -e .[bench]``).
- ``inference``: batch 1 on an 800x1066 image (median latency) and batch 8 (images/s).
- ``data``: images/s through the dataset, training transforms and collate on generated 416x416 JPEGs.
- ``metric``: seconds of COCO mAP over 2,000 images x 100 detections, faster_coco_eval vs pycocotools.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_lightning.speed import apply_speed_options, reuse_freed_host_memory

PRECISIONS = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

#: Official DETR-R50 training recipe (main.py defaults).
R50_MODEL = {"num_classes": 91, "backbone": "resnet50", "num_queries": 100, "aux_loss": True}
TRAIN_SHAPES = [(3, 512, 512), (3, 512, 681)]
TRAIN_NUM_BOXES = [2, 3]


# ---------------------------------------------------------------------------- machine and timing
def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores torch uses, GPU name and the torch version: the figures' context."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors, or on CPU the process's peak resident set (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (use --device cpu)")
    return device


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def emit(name: str, figures: dict[str, Any]) -> None:
    """Print the benchmark's one JSON line (always last)."""
    print(json.dumps({"benchmark": name, **figures}, sort_keys=False), flush=True)


def summarize(times: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(times), 5), "min_s": round(min(times), 5)}


# ---------------------------------------------------------------------------- inputs
def train_batch(
    device: torch.device, channels_last: bool, seed: int = 0
) -> tuple[Tensor, Tensor, list[dict]]:
    """The train-step batch: padded ``(2, 3, 512, 681)`` images, ``(2, 512, 681)`` mask, targets."""
    from detr_lightning.batching import pad_images_to_batch

    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(shape, generator=generator) for shape in TRAIN_SHAPES]
    batch, mask = pad_images_to_batch(images)
    targets = []
    for num_boxes in TRAIN_NUM_BOXES:
        centres = torch.rand(num_boxes, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(num_boxes, 2, generator=generator) * 0.3 + 0.1
        targets.append(
            {
                "labels": torch.randint(1, 91, (num_boxes,), generator=generator).to(device),
                "boxes": torch.cat([centres, sizes], dim=1).to(device),
            }
        )
    batch = batch.to(device)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch, mask.to(device), targets


# ---------------------------------------------------------------------------- our model's execution
def execution_options(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Our DETR run the official way (``--no-fold-norm``, ``--attention-weights``) or with the levers
    (``--channels-last``, ``--fast-dropout``), in place; the numbers are the same either way."""
    from detr_lightning.models.backbone import AppliedFrozenBatchNorm2d, FrozenNormConv2d

    if not args.fold_norm:  # the official layout: frozen norms run after their convolutions
        for layer in model.modules():
            if isinstance(layer, FrozenNormConv2d):
                layer.__class__ = torch.nn.Conv2d
            elif isinstance(layer, AppliedFrozenBatchNorm2d):
                layer.__class__ = FrozenBatchNorm2d
    if args.attention_weights:  # the official attention: weights materialized, no fused SDPA kernel
        for layer in model.modules():
            if hasattr(layer, "need_weights"):
                layer.need_weights = True
    apply_speed_options(
        model, channels_last=args.channels_last, fast_dropout=getattr(args, "fast_dropout", False)
    )


# ---------------------------------------------------------------------------- train-step
def build_our_train_step(args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], Tensor], Any]:
    """One training step of our DETR exactly as the Lightning module trains it."""
    from detr_lightning.lit_module import DETRLitModule

    module = DETRLitModule(
        model={**R50_MODEL, "dropout": 0.1},
        optimizer={"lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4, "fused": args.fused or None},
    )
    module.to(device)
    execution_options(module.model, args)
    model, criterion = module.model, module.criterion
    model.train()
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    forward = compiled(model, args)
    images, mask, targets = train_batch(device, args.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")

    phases = PhaseTimer(device, enabled=args.breakdown)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with phases("forward"), autocast(device, args.precision):
            outputs = forward(images, mask)
        with phases("loss"):
            loss = criterion.weighted_total(criterion(outputs, targets))
        with phases("backward"):
            scaler.scale(loss).backward()
        with phases("optimizer"):
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    step.phases = phases  # type: ignore[attr-defined]

    return step, model


def huggingface_detr() -> torch.nn.Module:
    """The Hugging Face ``DetrForObjectDetection`` with the official R50 settings and random weights.

    Dropout 0.1 everywhere the official model has it (Hugging Face's defaults leave the attention-weight
    and FFN-activation dropouts at 0, less work than the official step).

    Its ResNet-50 comes from ``transformers`` (no timm, no download). The trainable set is the official
    one (conv1 and layer1 frozen, layer2-4 trained): this transformers version leaves its whole ResNet
    frozen with a transformers backbone, which would skip most of the backward pass.
    """
    try:
        from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    except ImportError as error:
        raise SystemExit("--impl huggingface needs transformers: pip install -e '.[bench]'") from error
    config = DetrConfig(
        backbone_config=ResNetConfig(out_features=["stage4"]),
        num_labels=91,
        num_queries=100,
        auxiliary_loss=True,
        # The official recipe's dropout 0.1 is also on the attention weights and the FFN activation.
        attention_dropout=0.1,
        activation_dropout=0.1,
    )
    model = DetrForObjectDetection(config)
    for name, parameter in model.model.backbone.named_parameters():
        if any(f"stages.{stage}." in name for stage in (1, 2, 3)):
            parameter.requires_grad_(True)
    return model


def build_huggingface_train_step(
    args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[], Tensor], Any]:
    """The same step with the Hugging Face DETR (ResNet-50 from ``transformers``, random weights)."""
    model = huggingface_detr().to(device).train()
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": rest}, {"params": backbone, "lr": 1e-5}], lr=1e-4, weight_decay=1e-4
    )
    params = backbone + rest
    forward = compiled(model, args)
    images, mask, targets = train_batch(device, args.channels_last)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    pixel_mask = (~mask).long()

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            loss = forward(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        return loss.detach()

    return step, model


def compiled(model: torch.nn.Module, args: argparse.Namespace) -> Callable[..., Any]:
    """``torch.compile(model)`` with ``--compile-mode`` when ``--compile`` is given, else the model."""
    if not args.compile:
        return model
    return torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)


class PhaseTimer:
    """Seconds per named phase of a step (synchronizing the device around each), when enabled."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds.setdefault(name, []).append(time.perf_counter() - start)

    def medians(self) -> dict[str, float]:
        return {f"{name}_median_s": round(statistics.median(v), 5) for name, v in self.seconds.items()}


def step_flops(step: Callable[[], Tensor]) -> int:
    """Floating-point operations of one step (forward + backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def bench_train_step(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    builder = build_huggingface_train_step if args.impl == "huggingface" else build_our_train_step
    flops = None
    if args.flops:  # counted in eager mode (the FLOP counter does not see inside compiled graphs)
        eager_step, _ = builder(argparse.Namespace(**{**vars(args), "compile": False}), device)
        flops = step_flops(eager_step)
        del eager_step
    torch.manual_seed(0)
    step, _ = builder(args, device)
    reset_peak_memory(device)
    times = time_calls(step, args.steps, args.warmup, device)
    phases = getattr(step, "phases", None)
    figures = {
        "impl": args.impl,
        "precision": args.precision,
        "compile": args.compile and args.compile_mode,
        "channels_last": args.channels_last,
        "fused": args.fused,
        **(
            {
                "fold_norm": args.fold_norm,
                "attention_weights": args.attention_weights,
                "fast_dropout": args.fast_dropout,
            }
            if args.impl == "ours"
            else {}
        ),
        "steps": args.steps,
        **summarize(times),
        "images_per_s": round(len(TRAIN_SHAPES) / statistics.median(times), 3),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
    }
    if phases is not None and phases.enabled:
        figures.update(phases.medians())  # includes warm-up steps' phases; the medians ignore them
    if flops:
        figures["gflop_per_step"] = round(flops / 1e9, 1)
        figures["achieved_tflop_s"] = round(flops / statistics.median(times) / 1e12, 3)
    figures.update(machine_info(device))
    print(f"train-step ({args.impl}, {args.precision}): median {figures['median_s']:.4f} s/step")
    return figures


# ---------------------------------------------------------------------------- inference
def bench_inference(args: argparse.Namespace) -> dict[str, Any]:
    from detr_lightning.models import PostProcess, build_detr

    device = resolve_device(args.device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.impl == "huggingface":
        model = huggingface_detr().to(device).eval()

        def detect(images: Tensor, mask: Tensor) -> dict[str, Tensor]:
            outputs = model(pixel_values=images, pixel_mask=(~mask).long())
            return {"pred_logits": outputs.logits, "pred_boxes": outputs.pred_boxes}

        forward = compiled(detect, args)
    else:
        model = build_detr(**R50_MODEL).to(device).eval()
        execution_options(model, args)
        forward = compiled(model, args)
    postprocess = PostProcess()  # the same post-processing for both: softmax, top class, boxes to pixels

    def runner(batch_size: int) -> Callable[[], Any]:
        images = torch.randn(batch_size, 3, 800, 1066, device=device).contiguous(memory_format=memory_format)
        mask = torch.zeros(batch_size, 800, 1066, dtype=torch.bool, device=device)
        sizes = torch.tensor([[800, 1066]] * batch_size, device=device)

        @torch.inference_mode()
        def infer() -> Any:
            with autocast(device, args.precision):
                outputs = forward(images, mask)
            return postprocess(outputs, sizes)

        return infer

    reset_peak_memory(device)
    latency = time_calls(runner(1), args.steps, args.warmup, device)
    throughput_steps = max(1, args.steps // 2)
    batched = time_calls(runner(args.batch_size), throughput_steps, min(args.warmup, 1), device)
    figures = {
        "impl": args.impl,
        "precision": args.precision,
        "compile": args.compile and args.compile_mode,
        "channels_last": args.channels_last,
        **(
            {"fold_norm": args.fold_norm, "attention_weights": args.attention_weights}
            if args.impl == "ours"
            else {}
        ),
        "batch1_median_s": round(statistics.median(latency), 5),
        "batch1_min_s": round(min(latency), 5),
        f"batch{args.batch_size}_images_per_s": round(args.batch_size / statistics.median(batched), 3),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        **machine_info(device),
    }
    print(f"inference: batch 1 median {figures['batch1_median_s']:.4f} s")
    return figures


# ---------------------------------------------------------------------------- data
def write_jpeg_folder(root: Path, num_images: int, size: int = 416, boxes_per_image: int = 4) -> Path:
    """A COCO-format folder (``train/`` + ``_annotations.coco.json``) of random ``size``-square JPEGs."""
    from torchvision.io import encode_jpeg, write_file

    split = root / "train"
    split.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    images, annotations = [], []
    for index in range(num_images):
        pixels = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
        name = f"{index:05d}.jpg"
        write_file(str(split / name), encode_jpeg(pixels, quality=90))
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
        for _ in range(boxes_per_image):
            x, y = (torch.rand(2, generator=generator) * (size * 0.6)).tolist()
            w, h = (torch.rand(2, generator=generator) * (size * 0.3) + 8).tolist()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (split / "_annotations.coco.json").write_text(json.dumps(coco))
    return root


def bench_data(args: argparse.Namespace) -> dict[str, Any]:
    """The training loader exactly as ``train.py`` builds it (official augmentation, collate)."""
    from detr_lightning.data import CocoDataModule

    figures: dict[str, Any] = {"images": args.images, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpeg_folder(Path(tmp), args.images)
        for workers in args.workers:
            split = {"ann_file": root / "train" / "_annotations.coco.json", "img_dir": root / "train"}
            datamodule = CocoDataModule(
                root,
                train=split,
                val=split,
                batch_size=args.batch_size,
                num_workers=workers,
                pin_memory=False,
                check_images=False,
            )
            datamodule.setup("fit")
            start = time.perf_counter()
            count = sum(len(batch.targets) for batch in datamodule.train_dataloader())
            seconds = time.perf_counter() - start
            figures[f"workers{workers}_images_per_s"] = round(count / seconds, 2)
            print(f"data: {workers} workers, {count / seconds:.1f} images/s")
    figures.update(machine_info(torch.device("cpu")))
    return figures


# ---------------------------------------------------------------------------- metric
def synthetic_detections(
    num_images: int, per_image: int, num_classes: int = 5, seed: int = 0
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Ground truth (1-10 boxes per image) and ``per_image`` detections (jittered truth + false positives),
    boxes in COCO ``xywh`` pixels as the project's metric takes them."""
    from torchvision.ops import box_convert

    generator = torch.Generator().manual_seed(seed)
    predictions, targets = [], []
    for _ in range(num_images):
        count = int(torch.randint(1, 11, (1,), generator=generator))
        xy = torch.rand(count, 2, generator=generator) * 500
        wh = torch.rand(count, 2, generator=generator) * 200 + 4
        truth = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        targets.append({"boxes": box_convert(truth, "xyxy", "xywh"), "labels": labels})
        repeats = torch.randint(0, count, (per_image,), generator=generator)
        jitter = torch.randn(per_image, 4, generator=generator) * 8
        boxes = truth[repeats] + jitter
        false = torch.rand(per_image, generator=generator) < 0.4
        random_xy = torch.rand(per_image, 2, generator=generator) * 500
        boxes[false] = torch.cat([random_xy, random_xy + 50], dim=1)[false]
        boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], dim=1)
        predicted_labels = torch.where(
            false, torch.randint(0, num_classes, (per_image,), generator=generator), labels[repeats]
        )
        predictions.append(
            {
                "boxes": box_convert(boxes, "xyxy", "xywh"),
                "scores": torch.rand(per_image, generator=generator),
                "labels": predicted_labels,
            }
        )
    return predictions, targets


def bench_metric(args: argparse.Namespace) -> dict[str, Any]:
    from detr_lightning.metrics import build_map_metric

    predictions, targets = synthetic_detections(args.images, args.detections)
    figures: dict[str, Any] = {"images": args.images, "detections_per_image": args.detections}
    results = {}
    for backend in ("faster_coco_eval", "pycocotools"):
        metric = build_map_metric(backend=backend, class_metrics=False, sync_on_compute=False)
        start = time.perf_counter()
        metric.update(predictions, targets)
        results[backend] = {k: v for k, v in metric.compute().items() if v.numel() == 1 and k != "classes"}
        seconds = time.perf_counter() - start
        figures[f"{backend}_s"] = round(seconds, 3)
        print(f"metric: {backend} {seconds:.2f} s, mAP {float(results[backend]['map']):.4f}")
    differences = [
        abs(float(results["faster_coco_eval"][k]) - float(results["pycocotools"][k]))
        for k in results["pycocotools"]
    ]
    figures["speedup"] = round(figures["pycocotools_s"] / figures["faster_coco_eval_s"], 2)
    figures["max_abs_difference"] = max(differences)
    figures["map"] = round(float(results["faster_coco_eval"]["map"]), 6)
    figures.update(machine_info(torch.device("cpu")))
    return figures


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m detr_lightning.bench", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="name", required=True)

    def model_options(p: argparse.ArgumentParser, steps: int) -> None:
        p.add_argument("--steps", type=int, default=steps, help="timed steps")
        p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
        p.add_argument("--precision", choices=sorted(PRECISIONS), default="32")
        p.add_argument("--compile", action="store_true", help="torch.compile the model")
        p.add_argument(
            "--compile-mode",
            default="default",
            choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        )
        p.add_argument("--channels-last", action="store_true", help="channels_last backbone and images")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
        p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
        p.add_argument(
            "--no-fold-norm",
            dest="fold_norm",
            action="store_false",
            help="frozen norms after the convolutions",
        )
        p.add_argument(
            "--attention-weights", action="store_true", help="materialize attention weights (official path)"
        )
        p.add_argument(
            "--reuse-freed-memory",
            action="store_true",
            help="glibc keeps freed tensor memory for reuse (speed.reuse_freed_memory)",
        )

    train = sub.add_parser("train-step", help="one DETR-R50 training step on a batch of 2")
    model_options(train, steps=10)
    train.add_argument("--impl", choices=["ours", "huggingface"], default="ours")
    train.add_argument("--fused", action="store_true", help="fused AdamW kernel")
    train.add_argument(
        "--fast-dropout",
        action="store_true",
        help="CPU dropout masks from NumPy's PCG64 (speed.fast_dropout)",
    )
    train.add_argument(
        "--breakdown", action="store_true", help="also time forward/loss/backward/optimizer (adds syncs)"
    )
    train.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")

    infer = sub.add_parser("inference", help="DETR-R50 on 800x1066: batch-1 latency, batch-8 images/s")
    model_options(infer, steps=10)
    infer.add_argument("--batch-size", type=int, default=8)
    infer.add_argument("--impl", choices=["ours", "huggingface"], default="ours")

    data = sub.add_parser("data", help="images/s through dataset + train transforms + collate")
    data.add_argument("--images", type=int, default=200)
    data.add_argument("--batch-size", type=int, default=2)
    data.add_argument("--workers", type=int, nargs="+", default=[0, 2])

    metric = sub.add_parser("metric", help="COCO mAP: faster_coco_eval vs pycocotools")
    metric.add_argument("--images", type=int, default=2000)
    metric.add_argument("--detections", type=int, default=100)
    return parser.parse_args(argv)


BENCHMARKS = {
    "train-step": bench_train_step,
    "inference": bench_inference,
    "data": bench_data,
    "metric": bench_metric,
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    requested = getattr(args, "reuse_freed_memory", None)  # None: a benchmark without the option
    reused = reuse_freed_host_memory() if requested else requested
    figures = BENCHMARKS[args.name](args)
    if reused is not None:
        figures["reuse_freed_memory"] = reused
    emit(args.name, figures)


if __name__ == "__main__":
    main()
