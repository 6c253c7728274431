"""Benchmarks: ``python -m detr_lightning.tools.bench {train-step,inference,data,metric,train-e2e} ...``.

Each prints a few lines and, last, one JSON line of figures (``tail -n 1``); BENCHMARKS.md has them. The
model benchmarks run DETR-R50 (6+6 layers, 100 queries, 91 classes, aux loss, dropout 0.1): ours, ours
the official code's way (``--no-fold-norm --attention-weights``: frozen norms after their convolutions,
attention weights materialized), or the Hugging Face ``DetrForObjectDetection`` (``--impl huggingface``,
``pip install -e '.[bench]'``). ``train-e2e`` is `detr_lightning.tools.e2e`.
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
from torch import Tensor, nn

from detr_lightning.batching import pad_images_to_batch
from detr_lightning.models import PostProcess, ResNetBackbone, build_detr
from detr_lightning.speed import COMPILE_MODES, apply_speed_options
from detr_lightning.tools import e2e

PRECISIONS = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
R50_MODEL = {"num_classes": 91, "backbone": "resnet50", "num_queries": 100, "aux_loss": True}
TRAIN_SHAPES = [(3, 512, 512), (3, 512, 681)]
TRAIN_NUM_BOXES = [2, 3]


def machine_info(device: torch.device) -> dict[str, Any]:
    """The figures' context: CPU model, cores, torch threads and version, GPU, glibc malloc settings."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        models = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line]
        cpu = models[0].split(":", 1)[1].strip() if models else cpu
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    info.update(torch=torch.__version__, device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    if malloc:  # the opt-in of BENCHMARKS.md, "glibc malloc"
        info["malloc_env"] = malloc
    return info


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_calls(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    e2e.synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        e2e.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors, or on CPU the process's peak resident set (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def resolve_device(name: str) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (use --device cpu)")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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
        e2e.synchronize(self.device)
        start = time.perf_counter()
        yield
        e2e.synchronize(self.device)
        self.seconds.setdefault(name, []).append(time.perf_counter() - start)

    def medians(self) -> dict[str, float]:
        return {f"{name}_median_s": round(statistics.median(v), 5) for name, v in self.seconds.items()}


def prepare(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``--channels-last`` and ``--compile``, as the training run's ``speed`` options, in place."""
    return apply_speed_options(
        model, channels_last=args.channels_last, compile=args.compile, compile_mode=args.compile_mode
    )


def prepare_ours(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Our DETR with the official code's execution if asked, then channels_last / compile, in place."""
    if not args.fold_norm:  # the official layout: frozen norms run after their convolutions
        model.backbone[0] = ResNetBackbone(R50_MODEL["backbone"], fold_frozen_norm=False)
    if args.attention_weights:  # the official attention: weights materialized, no fused SDPA kernel
        for layer in model.modules():
            if hasattr(layer, "need_weights"):
                layer.need_weights = True
    return prepare(model, args)


def huggingface_detr() -> nn.Module:
    """The Hugging Face ``DetrForObjectDetection`` with the official R50 settings and random weights.

    Dropout 0.1 also on the attention weights and the FFN activation, and layer2-4 of its ResNet-50
    trainable, as in the official model (transformers' defaults: 0, and its whole backbone frozen).
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
        attention_dropout=0.1,
        activation_dropout=0.1,
    )
    model = DetrForObjectDetection(config)
    for name, parameter in model.model.backbone.named_parameters():
        if any(f"stages.{stage}." in name for stage in (1, 2, 3)):
            parameter.requires_grad_(True)
    return model


def model_figures(args: argparse.Namespace) -> dict[str, Any]:
    figures = {"impl": args.impl, "precision": args.precision, "compile": args.compile and args.compile_mode}
    figures["channels_last"] = args.channels_last
    if args.impl == "ours":
        figures.update(fold_norm=args.fold_norm, attention_weights=args.attention_weights)
    return figures


def train_batch(device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor, list[dict]]:
    """Padded images ``(2, 3, 512, 681)``, their ``(2, 512, 681)`` mask and the targets."""
    generator = torch.Generator().manual_seed(0)
    batch, mask = pad_images_to_batch([torch.randn(shape, generator=generator) for shape in TRAIN_SHAPES])
    targets = []
    for num_boxes in TRAIN_NUM_BOXES:
        centres = torch.rand(num_boxes, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(num_boxes, 2, generator=generator) * 0.3 + 0.1
        labels = torch.randint(1, 91, (num_boxes,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centres, sizes], 1).to(device)})
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return batch.to(device).contiguous(memory_format=memory_format), mask.to(device), targets


def build_train_step(
    args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[], Tensor], PhaseTimer]:
    """One training step (forward, loss, backward, clipping at 0.1, AdamW with the backbone's own group):
    ours exactly as the Lightning module trains, or the Hugging Face DETR's."""
    images, mask, targets = train_batch(device, args.channels_last)
    if args.impl == "ours":
        from detr_lightning.lit_module import DETRLitModule

        module = DETRLitModule(
            model={**R50_MODEL, "dropout": 0.1},
            optimizer={"lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4, "fused": args.fused or None},
        )
        model = prepare_ours(module.model, args)
        module.to(device).train()
        optimizer = module.configure_optimizers()["optimizer"]

        def forward() -> Any:
            return model(images, mask)

        def loss_of(outputs: Any) -> Tensor:
            return module.criterion.weighted_total(module.criterion(outputs, targets))

    else:
        model = prepare(huggingface_detr(), args).to(device).train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if "backbone" not in n]},
            {"params": [p for n, p in named if "backbone" in n], "lr": 1e-5},
        ]
        optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4, fused=args.fused or None)
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

        def forward() -> Any:  # the Hugging Face model computes its loss in its forward
            return model(pixel_values=images, pixel_mask=(~mask).long(), labels=labels)

        def loss_of(outputs: Any) -> Tensor:
            return outputs.loss

    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    phases = PhaseTimer(device, enabled=args.breakdown)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with phases("forward"), autocast(device, args.precision):
            outputs = forward()
        with phases("loss"):
            loss = loss_of(outputs)
        with phases("backward"):
            scaler.scale(loss).backward()
        with phases("optimizer"):
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    return step, phases


def step_flops(step: Callable[[], Tensor]) -> int:
    """Floating-point operations of one step (forward + backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def bench_train_step(args: argparse.Namespace) -> dict[str, Any]:
    device, flops = args.device, None
    if args.flops:  # counted in eager mode (the FLOP counter does not see inside compiled graphs)
        torch.manual_seed(0)
        eager = argparse.Namespace(**{**vars(args), "compile": False})
        flops = step_flops(build_train_step(eager, device)[0])
    torch.manual_seed(0)
    step, phases = build_train_step(args, device)
    reset_peak_memory(device)
    times = time_calls(step, args.steps, args.warmup, device)
    median = statistics.median(times)
    figures = {
        **model_figures(args),
        "fused": args.fused,
        "steps": args.steps,
        "median_s": round(median, 5),
        "min_s": round(min(times), 5),
        "images_per_s": round(len(TRAIN_SHAPES) / median, 3),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        **phases.medians(),  # warm-up steps included; the medians ignore them
    }
    if flops:
        figures.update(gflop_per_step=round(flops / 1e9, 1), achieved_tflop_s=round(flops / median / 1e12, 3))
    print(f"train-step ({args.impl}, {args.precision}): median {median:.4f} s/step")
    return figures


def bench_inference(args: argparse.Namespace) -> dict[str, Any]:
    """An 800x1066 image at batch 1 (latency) and at ``--batch-size`` (images/s), postprocessing included."""
    device = args.device
    torch.manual_seed(0)
    if args.impl == "huggingface":
        hf_model = prepare(huggingface_detr(), args).to(device).eval()

        def forward(images: Tensor, mask: Tensor) -> dict[str, Tensor]:
            outputs = hf_model(pixel_values=images, pixel_mask=(~mask).long())
            return {"pred_logits": outputs.logits, "pred_boxes": outputs.pred_boxes}

    else:
        forward = prepare_ours(build_detr(**R50_MODEL), args).to(device).eval()
    postprocess = PostProcess()  # the same for both: softmax, top class, boxes to pixels
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

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
    batched = time_calls(runner(args.batch_size), max(1, args.steps // 2), min(args.warmup, 1), device)
    figures = {
        **model_figures(args),
        "batch1_median_s": round(statistics.median(latency), 5),
        "batch1_min_s": round(min(latency), 5),
        f"batch{args.batch_size}_images_per_s": round(args.batch_size / statistics.median(batched), 3),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
    }
    print(f"inference: batch 1 median {figures['batch1_median_s']:.4f} s")
    return figures


def bench_data(args: argparse.Namespace) -> dict[str, Any]:
    """The training loader as ``train.py`` builds it (official augmentation, collate), over generated
    416x416 demo images."""
    from detr_lightning.data import CocoDataModule, ensure_demo_dataset

    figures: dict[str, Any] = {"images": args.images, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_demo_dataset(
            Path(tmp) / "data", num_train=args.images, num_val=1, num_test=1, min_side=416, max_side=416
        )
        for workers in args.workers:
            loader = {"batch_size": args.batch_size, "num_workers": workers, "pin_memory": False}
            datamodule = CocoDataModule(root, check_images=False, **loader)
            datamodule.setup("fit")
            start = time.perf_counter()
            count = sum(len(batch.targets) for batch in datamodule.train_dataloader())
            images_per_s = count / (time.perf_counter() - start)
            figures[f"workers{workers}_images_per_s"] = round(images_per_s, 2)
            print(f"data: {workers} workers, {images_per_s:.1f} images/s")
    return figures


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
        boxes = truth[repeats] + torch.randn(per_image, 4, generator=generator) * 8
        false = torch.rand(per_image, generator=generator) < 0.4
        random_xy = torch.rand(per_image, 2, generator=generator) * 500
        boxes[false] = torch.cat([random_xy, random_xy + 50], dim=1)[false]
        boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], dim=1)
        random_labels = torch.randint(0, num_classes, (per_image,), generator=generator)
        scores = torch.rand(per_image, generator=generator)
        predicted = torch.where(false, random_labels, labels[repeats])
        predictions.append(
            {"boxes": box_convert(boxes, "xyxy", "xywh"), "scores": scores, "labels": predicted}
        )
    return predictions, targets


def bench_metric(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of COCO mAP over synthetic detections: faster_coco_eval against pycocotools."""
    from detr_lightning.metrics import build_map_metric

    predictions, targets = synthetic_detections(args.images, args.detections)
    figures: dict[str, Any] = {"images": args.images, "detections_per_image": args.detections}
    results = {}
    for backend in ("faster_coco_eval", "pycocotools"):
        metric = build_map_metric(backend=backend, class_metrics=False, sync_on_compute=False)
        start = time.perf_counter()
        metric.update(predictions, targets)
        scalars = metric.compute()
        results[backend] = {k: float(v) for k, v in scalars.items() if v.numel() == 1 and k != "classes"}
        figures[f"{backend}_s"] = round(time.perf_counter() - start, 3)
        print(f"metric: {backend} {figures[f'{backend}_s']:.2f} s, mAP {results[backend]['map']:.4f}")
    fast, reference = results["faster_coco_eval"], results["pycocotools"]
    figures["speedup"] = round(figures["pycocotools_s"] / figures["faster_coco_eval_s"], 2)
    figures["max_abs_difference"] = max(abs(fast[k] - reference[k]) for k in reference)
    figures["map"] = round(fast["map"], 6)
    return figures


BENCHMARKS = {
    "train-step": bench_train_step,
    "inference": bench_inference,
    "data": bench_data,
    "metric": bench_metric,
    "train-e2e": e2e.bench_train_e2e,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m detr_lightning.tools.bench", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="name", required=True)
    model = argparse.ArgumentParser(add_help=False)  # the options of both model benchmarks
    add = model.add_argument
    add("--impl", choices=["ours", "huggingface"], default="ours")
    add("--steps", type=e2e.positive_int, default=10, help="timed steps")
    add("--warmup", type=int, default=2, help="untimed steps first")
    add("--precision", choices=sorted(PRECISIONS), default="32")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--compile-mode", default="default", choices=COMPILE_MODES)
    add("--channels-last", action="store_true", help="channels_last backbone and images")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add("--threads", type=int, default=None, help="torch.set_num_threads")
    add("--no-fold-norm", dest="fold_norm", action="store_false", help="frozen norms after the convolutions")
    add("--attention-weights", action="store_true", help="materialize attention weights (official path)")

    train = sub.add_parser("train-step", parents=[model], help="one DETR-R50 training step on a batch of 2")
    train.add_argument("--fused", action="store_true", help="fused AdamW kernel")
    train.add_argument(
        "--breakdown", action="store_true", help="also time forward/loss/backward/optimizer (adds syncs)"
    )
    train.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    infer = sub.add_parser("inference", parents=[model], help="DETR-R50 on 800x1066: latency, images/s")
    infer.add_argument("--batch-size", type=e2e.positive_int, default=8)

    data = sub.add_parser("data", help="images/s through dataset + train transforms + collate")
    data.add_argument("--images", type=e2e.positive_int, default=200)
    data.add_argument("--batch-size", type=e2e.positive_int, default=2)
    data.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    metric = sub.add_parser("metric", help="COCO mAP: faster_coco_eval vs pycocotools")
    metric.add_argument("--images", type=e2e.positive_int, default=2000)
    metric.add_argument("--detections", type=e2e.positive_int, default=100)
    e2e_help = "images/s of train.py end to end: baseline and speed=gpu interleaved"
    e2e.add_arguments(sub.add_parser("train-e2e", help=e2e_help))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    args.device = resolve_device(getattr(args, "device", "cpu"))  # data and metric run on the CPU
    figures = BENCHMARKS[args.name](args)
    # Always the last line; the machine's figures last in it.
    print(json.dumps({"benchmark": args.name, **figures, **machine_info(args.device)}), flush=True)


if __name__ == "__main__":
    main()
