"""``python -m detr_lightning.tools.bench train-e2e``: training images/s of ``train.py`` itself, end to end.

Each setting (a list of ``train.py`` overrides: ``baseline`` none, ``fast`` ``speed=gpu``) runs as its own
``python train.py ...`` process, the settings interleaved round after round, on the same data (by default
a generated COCO-like set: ``python -m detr_lightning.data.demo --realistic``). The run is the real one
(data check, the official multi-scale augmentation, DETR-R50, the validation epoch with the COCO
evaluator, checkpoints, the CSV logger), with these changes for every setting alike: no weights to
download (``model.pretrained=null``, ``model.pretrained_backbone=false``: speed does not depend on the
weights), no test split, no progress bar, ``trainer.max_steps`` as asked, and the `E2ETimer` callback.

`E2ETimer` times the steps after ``warmup_steps`` (compilation, cudnn tuning and worker start-up fall
before them) and writes one JSON file of figures:

- ``train_images_per_s``: images of the timed steps / their wall time less validation and checkpoints;
  ``e2e_images_per_s`` counts those too.
- Where the time went, in seconds over the timed window: ``step_s`` (``on_train_batch_start`` to
  ``on_train_batch_end``: forward, criterion, backward, optimizer), of it ``matching_s`` (the Hungarian
  matcher, the device synchronized when it starts) and ``step_logging_s`` (``LightningModule.log``);
  ``data_s`` (between the steps of an epoch: fetching the next batch, the host-to-device copy, the
  loop's bookkeeping); ``epoch_boundary_s`` (between an epoch's last step and the next one's first:
  epoch-end callbacks such as plots, a new loader iterator, whose workers start unless persistent, and
  its first batch); ``logger_s`` (the loggers' writes between steps); ``validation_s``
  (``on_validation_start`` to ``on_validation_end``, the COCO evaluation included); ``checkpoint_s``
  (``Trainer.save_checkpoint``). The gaps are net of the figures timed apart, so ``window_s`` is
  ``step_s + data_s + epoch_boundary_s + logger_s + validation_s + checkpoint_s``.
- GPU: peak memory allocated and reserved; ``gpu_busy_fraction``: the union of the GPU's kernels, copies
  and memsets over ``profile_steps`` extra steps (``torch.profiler``, CUDA activity only) / their wall
  time; ``nvml_utilization_mean``: NVML's utilization sampled during the timed window, if available.
- ``torch.compile``: dynamo's frames compiled (first compilations and recompilations), graphs and graph
  breaks, before and during the timed window (``torch._dynamo.utils.counters``).
- ``batch_shapes``: distinct padded batch shapes of the timed steps; ``steps_with_new_shapes``: timed
  steps whose shape no earlier step had (each may compile, record a CUDA graph or tune cudnn: a window
  with many is not yet steady); ``padded_fraction``: padding pixels / all pixels.
- ``gflop_per_image``: forward + backward FLOPs per training image counted over ``flop_steps`` extra
  steps (``torch.utils.flop_counter``; eager models only).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
TIMER_TARGET = f"{__name__}.E2ETimer"
DEFAULT_SETTINGS = ("baseline=", "fast=speed=gpu")
#: The frame of every run: offline weights, no test split, no progress bar (see the module docstring).
RUN_FRAME = (
    "model.pretrained=null",
    "model.pretrained_backbone=false",
    "test=false",
    "callbacks.progress_bar=null",
)
SUMMARY_KEYS = (
    "train_images_per_s",
    "e2e_images_per_s",
    "step_median_s",
    "step_s",
    "matching_s",
    "step_logging_s",
    "data_s",
    "epoch_boundary_s",
    "logger_s",
    "validation_s",
    "checkpoint_s",
    "first_steps_s",
    "peak_allocated_mib",
    "peak_reserved_mib",
    "compiled_frames",
    "recompiled_in_window",
    "graph_breaks",
    "gpu_busy_fraction",
    "nvml_utilization_mean",
    "batch_shapes",
    "steps_with_new_shapes",
    "padded_fraction",
    "gflop_per_image",
)


# ------------------------------------------------------------------------------------------ the callback
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dynamo_counts() -> dict[str, int]:
    """Frames dynamo compiled (each recompilation counts), graphs and graph breaks so far."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return {"frames": 0, "graphs": 0, "graph_breaks": 0}
    from torch._dynamo.utils import counters

    return {
        "frames": int(counters["frames"]["total"]),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def busy_fraction(trace: dict[str, Any], wall_s: float) -> float:
    """Union of the GPU activity intervals of a Chrome trace (``torch.profiler``'s export) / ``wall_s``."""
    intervals = sorted(
        (float(event["ts"]), float(event["ts"]) + float(event.get("dur", 0)))
        for event in trace.get("traceEvents", [])
        if event.get("ph") == "X"
        and str(event.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6 / wall_s if wall_s > 0 else 0.0


class _NvmlSampler:
    """``torch.cuda.utilization`` (NVML: % of time a kernel ran) sampled in a thread; None without NVML."""

    def __init__(self, device: torch.device, interval_s: float) -> None:
        self.device, self.interval_s = device, interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device.type != "cuda" or self.interval_s <= 0:
            return
        try:
            torch.cuda.utilization(self.device)
        except Exception:  # no pynvml / NVML here: the profiler's figure stands alone
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # NVML went away: the samples so far stand
                return

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return round(statistics.mean(self.samples) / 100, 4) if self.samples else None


class E2ETimer(lightning.Callback):
    """Times a ``train.py`` run's steady-state training loop (see the module docstring for the figures).

    Steps are counted from 0: ``[0, warmup_steps)`` untimed, then ``steps`` timed, ``profile_steps``
    under ``torch.profiler`` (CUDA only) and ``flop_steps`` under the FLOP counter (eager models only);
    ``trainer.max_steps`` should be their sum. The figures are written to ``out`` (JSON) at the end of fit.

    Args:
        out: JSON file to write.
        warmup_steps, steps, profile_steps, flop_steps: the step counts above.
        sync_steps: synchronize the device after every step (exact per-step times; adds a sync per step).
        nvml_interval_s: NVML sampling period (0: off).
    """

    def __init__(
        self,
        out: str,
        warmup_steps: int = 5,
        steps: int = 20,
        profile_steps: int = 0,
        flop_steps: int = 0,
        sync_steps: bool = False,
        nvml_interval_s: float = 0.1,
    ) -> None:
        self.out = Path(out)
        self.warmup_steps, self.steps = int(warmup_steps), int(steps)
        self.profile_steps, self.flop_steps = int(profile_steps), int(flop_steps)
        self.sync_steps, self.nvml_interval_s = sync_steps, nvml_interval_s
        self.device = torch.device("cpu")
        self.step = 0  # train batches started
        self.region = "gap"  # "step" | "validation" | "gap": where wrapped durations are counted
        self.in_window = False
        self.totals: dict[str, float] = {}
        self.step_times: list[float] = []
        self.gaps: dict[str, list[float]] = {"data": [], "epoch_boundary": []}  # net of what is timed apart
        self.validations: list[dict[str, float]] = []
        self.shapes: set[tuple[int, ...]] = set()  # padded batch shapes of the timed steps
        self.warmup_shapes: set[tuple[int, ...]] = set()
        self.new_shapes = 0  # timed steps whose shape no earlier step had (a compile, a graph, cudnn tuning)
        self.images = 0
        self.padded = torch.zeros(())
        self.pixels = 0
        self.flops = 0
        self.flop_images = 0
        self.figures: dict[str, Any] = {}
        self._restore: list[Callable[[], None]] = []
        self._last_end: float | None = None
        self._timed_in_gap = 0.0  # validation, checkpoints and logger writes since the last step ended
        self._new_epoch = False
        self._batch_start = 0.0
        self._first_start: float | None = None
        self._window: list[float] = []
        self._validation_start = 0.0
        self._validation_images = 0
        self._profiler: Any = None
        self._profile_start = 0.0
        self._flop_counter: Any = None
        self._nvml: _NvmlSampler | None = None
        self._depth = 0

    # ---------------------------------------------------------------- wrapping (timed regions)
    def _wrap(self, owner: Any, name: str, kind: str, sync: bool = False) -> None:
        """Time every call of ``owner.name`` (an instance attribute shadows the method) as ``kind``."""
        original = getattr(owner, name)
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            outermost = timer._depth == 0
            timer._depth += 1
            if sync and outermost:
                _synchronize(timer.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer._depth -= 1
                if outermost and timer.in_window:
                    seconds = time.perf_counter() - start
                    key = f"{timer.region}:{kind}"
                    timer.totals[key] = timer.totals.get(key, 0.0) + seconds
                    if timer.region == "gap":
                        timer._timed_in_gap += seconds

        object.__setattr__(owner, name, timed)
        self._restore.append(lambda: object.__delattr__(owner, name))

    def setup(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.device = trainer.strategy.root_device
        matcher = getattr(getattr(pl_module, "criterion", None), "matcher", None)
        if matcher is not None and hasattr(matcher, "match_layers"):
            self._wrap(matcher, "match_layers", "matching", sync=True)
        self._wrap(pl_module, "log", "logging")
        self._wrap(pl_module, "log_dict", "logging")
        for logger in trainer.loggers:
            self._wrap(logger, "log_metrics", "logger")
            self._wrap(logger, "save", "logger")
        self._wrap(trainer, "save_checkpoint", "checkpoint", sync=True)

    def teardown(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()

    # ---------------------------------------------------------------- steps
    def on_train_batch_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.device = pl_module.device
        if self.step == self.warmup_steps:  # the timed window starts here, with the device idle
            _synchronize(self.device)
            self._window = [time.perf_counter()]
            self.figures["first_steps_s"] = round(self._window[0] - (self._first_start or self._window[0]), 3)
            self.figures["dynamo_before_window"] = _dynamo_counts()
            self._nvml = _NvmlSampler(self.device, self.nvml_interval_s)
            self._nvml.start()
            self.in_window = True
        if self.step == self.warmup_steps + self.steps:
            self._start_profiler()
        if self.step == self.warmup_steps + self.steps + self.profile_steps:
            self._start_flop_counter(pl_module)
        now = time.perf_counter()
        self._first_start = self._first_start or now
        if self.in_window and self._last_end is not None and self.step > self.warmup_steps:
            kind = "epoch_boundary" if self._new_epoch else "data"
            self.gaps[kind].append(now - self._last_end - self._timed_in_gap)
        self._new_epoch = False
        if self.in_window:
            images, mask = batch[0], batch[1]
            shape = tuple(images.shape)
            self.new_shapes += shape not in self.warmup_shapes and shape not in self.shapes
            self.shapes.add(shape)
            self.padded = self.padded.to(mask.device) + mask.sum()  # stays on the device: no sync
            self.pixels += mask.numel()
            self.images += len(batch[2])
        elif self.step < self.warmup_steps:
            self.warmup_shapes.add(tuple(batch[0].shape))
        if self._flop_counter is not None:
            self.flop_images += len(batch[2])
        self.region = "step"
        self._batch_start = now

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        last_timed = self.step == self.warmup_steps + self.steps - 1
        if self.sync_steps or last_timed:
            _synchronize(self.device)
        now = time.perf_counter()
        self.region = "gap"
        if self.in_window:
            self.step_times.append(now - self._batch_start)
        if last_timed:
            self._window.append(now)
            self.in_window = False
            self.figures["dynamo_after_window"] = _dynamo_counts()
            self.figures["nvml_utilization_mean"] = self._nvml.stop() if self._nvml else None
            self._write()  # now too: the timed figures survive a failure in the steps after them
        if self.step == self.warmup_steps + self.steps + self.profile_steps - 1:
            self._stop_profiler()
        if self.step == self.warmup_steps + self.steps + self.profile_steps + self.flop_steps - 1:
            self._stop_flop_counter()
        self._last_end = now
        self._timed_in_gap = 0.0
        self.step += 1

    def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._new_epoch = True

    # ---------------------------------------------------------------- validation
    def on_validation_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        _synchronize(pl_module.device)
        self.region = "validation"
        self._validation_start = time.perf_counter()
        self._validation_images = 0

    def on_validation_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._validation_images += len(batch[2])

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        _synchronize(pl_module.device)
        seconds = time.perf_counter() - self._validation_start
        self.validations.append(
            {"s": seconds, "images": self._validation_images, "in_window": self.in_window}
        )
        if self.in_window:
            self._timed_in_gap += seconds
        self.region = "gap"

    # ---------------------------------------------------------------- profiler and FLOP counter
    def _start_profiler(self) -> None:
        if self.profile_steps <= 0 or self.device.type != "cuda":
            return
        from torch.profiler import ProfilerActivity, profile

        _synchronize(self.device)
        try:
            self._profiler = profile(activities=[ProfilerActivity.CUDA])
            self._profiler.__enter__()
        except Exception as error:  # the figures of the timed steps are kept whatever the profiler does
            self.figures["profile_error"] = repr(error)
            self._profiler = None
        self._profile_start = time.perf_counter()

    def _stop_profiler(self) -> None:
        if self._profiler is None:
            return
        _synchronize(self.device)
        wall_s = time.perf_counter() - self._profile_start
        profiler, self._profiler = self._profiler, None
        try:
            profiler.__exit__(None, None, None)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "trace.json"
                profiler.export_chrome_trace(str(path))
                trace = json.loads(path.read_text())
        except Exception as error:
            self.figures["profile_error"] = repr(error)
            return
        self.figures["gpu_busy_fraction"] = round(busy_fraction(trace, wall_s), 4)
        self.figures["profile_wall_s"] = round(wall_s, 4)

    def _start_flop_counter(self, pl_module: lightning.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        if self.flop_steps <= 0 or getattr(model, "_compiled_call_impl", None) is not None:
            return  # the counter does not see inside compiled graphs
        from torch.utils.flop_counter import FlopCounterMode

        self._flop_counter = FlopCounterMode(display=False)
        self._flop_counter.__enter__()

    def _stop_flop_counter(self) -> None:
        if self._flop_counter is None:
            return
        self._flop_counter.__exit__(None, None, None)
        self.flops = self._flop_counter.get_total_flops()
        self._flop_counter = None

    # ---------------------------------------------------------------- figures
    def on_fit_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._write()

    def _write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result(), indent=1) + "\n")

    def result(self) -> dict[str, Any]:
        """The figures of the run (see the module docstring)."""
        figures: dict[str, Any] = {"warmup_steps": self.warmup_steps, "timed_steps": len(self.step_times)}
        figures.update(self.figures)

        def total(region: str, *kinds: str) -> float:
            return sum(self.totals.get(f"{region}:{kind}", 0.0) for kind in kinds)

        validation_s = sum(v["s"] for v in self.validations if v["in_window"])
        if len(self._window) == 2:
            window_s = self._window[1] - self._window[0]
            checkpoint_s = total("gap", "checkpoint")
            train_s = window_s - validation_s - checkpoint_s
            figures.update(
                images=self.images,
                window_s=round(window_s, 4),
                train_images_per_s=round(self.images / train_s, 3),
                e2e_images_per_s=round(self.images / window_s, 3),
                step_s=round(sum(self.step_times), 4),
                step_median_s=round(statistics.median(self.step_times), 5),
                matching_s=round(total("step", "matching"), 4),
                step_logging_s=round(total("step", "logging"), 4),
                data_s=round(sum(self.gaps["data"]), 4),
                epoch_boundary_s=round(sum(self.gaps["epoch_boundary"]), 4),
                logger_s=round(total("gap", "logger", "logging"), 4),
                validation_s=round(validation_s, 4),
                checkpoint_s=round(checkpoint_s, 4),
                batch_shapes=len(self.shapes),
                steps_with_new_shapes=self.new_shapes,
                padded_fraction=round(float(self.padded) / max(self.pixels, 1), 4),
            )
            before, after = figures.get("dynamo_before_window", {}), figures.get("dynamo_after_window", {})
            figures.update(
                compiled_frames=after.get("frames"),
                recompiled_in_window=after.get("frames", 0) - before.get("frames", 0),
                graph_breaks=after.get("graph_breaks"),
            )
        figures["validations"] = [
            {"s": round(v["s"], 4), "images": v["images"], "in_window": v["in_window"]}
            for v in self.validations
        ]
        if self.flops and self.flop_images:
            figures["gflop_per_image"] = round(self.flops / self.flop_images / 1e9, 2)
        if self.device.type == "cuda":
            figures["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            figures["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
            figures["gpu"] = torch.cuda.get_device_name(self.device)
        figures["device"] = str(self.device)
        return figures


# ------------------------------------------------------------------------------------------ the driver
def parse_setting(text: str) -> tuple[str, list[str]]:
    """``NAME=OVERRIDES`` (space-separated ``train.py`` overrides, possibly none) -> ``(NAME, overrides)``."""
    name, _, overrides = text.partition("=")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--setting {text!r}: give NAME=OVERRIDES, NAME in letters, digits, '-' and '_'")
    return name, shlex.split(overrides)


def ensure_coco_like(root: Path, train_images: int, val_images: int, processes: int) -> Path:
    """The COCO-like set (``--realistic`` demo) at ``root``, written if absent."""
    from detr_lightning.data.demo import REALISTIC_DEMO_OPTIONS, ensure_demo_dataset

    start = time.perf_counter()
    # A test split of 2 images: the layout needs one with images; test=false leaves it unused.
    options = {"num_train": train_images, "num_val": val_images, "num_test": 2, "processes": processes}
    ensure_demo_dataset(root, **options, **REALISTIC_DEMO_OPTIONS)
    print(f"train-e2e: data at {root} ({time.perf_counter() - start:.1f} s)", flush=True)
    return root


def run_overrides(args: argparse.Namespace, overrides: Sequence[str], run_dir: Path) -> list[str]:
    """The ``train.py`` overrides of one run: the frame, the timer, the common and the setting's own."""
    timed = args.warmup_steps + args.steps + args.profile_steps + args.flop_steps
    timer = {
        "_target_": TIMER_TARGET,
        "out": str(run_dir / "e2e.json"),
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "profile_steps": args.profile_steps,
        "flop_steps": args.flop_steps,
        "sync_steps": args.sync_steps,
    }
    device = ["trainer=gpu"] if torch.device(args.device).type == "cuda" else ["trainer=cpu"]
    return [
        *device,
        f"data.root={args.data}",
        f"paths.output_dir={run_dir}",
        f"trainer.max_steps={timed}",
        *RUN_FRAME,
        *(f"+callbacks.e2e_timer.{key}={value}" for key, value in timer.items()),
        *args.override,
        *overrides,
    ]


def _run_in_process(overrides: list[str]) -> None:
    """``train.py``'s flow in this process (tests): compose ``conf/`` and call `training.train`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from detr_lightning.config import register_configs
    from detr_lightning.training import train

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)  # ${hydra:...} resolves as under train.py
        with open_dict(cfg):
            del cfg["hydra"]  # as train.py's task sees its config
        train(cfg)
    finally:
        GlobalHydra.instance().clear()


def run_setting(
    args: argparse.Namespace, name: str, overrides: list[str], round_: int, timeout: float
) -> dict[str, Any]:
    """One run of one setting (stopped after ``timeout`` seconds): its figures (or its error) as a dict."""
    run_dir = args.out_dir / "runs" / f"{name}_r{round_}"
    (run_dir / "e2e.json").unlink(missing_ok=True)  # never a former run's figures
    command = run_overrides(args, overrides, run_dir)
    row: dict[str, Any] = {"setting": name, "round": round_, "overrides": " ".join(overrides)}
    start = time.perf_counter()
    if args.in_process:
        _run_in_process(command)
        returncode = 0
    else:
        log_path = args.out_dir / "logs" / f"{name}_r{round_}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DETR_LIGHTNING_OFFLINE": "1", "WANDB_MODE": "disabled"}
        argv = [sys.executable, str(REPO_ROOT / "train.py"), *command, f"hydra.run.dir={run_dir}"]
        with log_path.open("w") as log:
            print("$", shlex.join(argv), file=log, flush=True)
            try:
                returncode = subprocess.run(
                    argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env
                ).returncode
            except subprocess.TimeoutExpired:
                returncode = -9
                row["error"] = f"stopped after {timeout:.0f} s"
    row["run_s"] = round(time.perf_counter() - start, 1)
    result = run_dir / "e2e.json"
    if result.is_file():  # written when the timed steps end, again when fit ends
        row.update(json.loads(result.read_text()))
    if returncode != 0:  # the timed figures, if any, are kept: what failed came after them
        row.setdefault("error", f"exit status {returncode}; log in logs/{name}_r{round_}.log")
    if not args.keep_checkpoints:  # DETR-R50 with its AdamW state: about 0.5 GB a file
        for checkpoint in run_dir.glob("checkpoints/*.ckpt"):
            checkpoint.unlink()
    print(f"train-e2e: {name} round {round_}: {_one_line(row)}", flush=True)
    return row


def _one_line(row: dict[str, Any]) -> str:
    keys = (*SUMMARY_KEYS[:4], "data_s", "validation_s", "recompiled_in_window", "error")
    return ", ".join(f"{key} {row[key]}" for key in keys if key in row)


def summarize(rows: list[dict[str, Any]], names: list[str], peak_tflops: float | None) -> dict[str, Any]:
    """Per setting: the median of its runs' figures and its speed-up over the first setting.

    ``model_tflop_s``: the first setting's FLOPs per image (its padding; counted in eager runs) x the
    setting's images/s: the model's useful work, whatever padding or recomputation a setting adds.
    """
    summary: dict[str, Any] = {}
    for name in names:
        runs = [row for row in rows if row["setting"] == name]
        done = [row for row in runs if "train_images_per_s" in row]
        figures: dict[str, Any] = {"runs": len(done), "failed": len(runs) - len(done)}
        for key in SUMMARY_KEYS:
            values = [row[key] for row in done if isinstance(row.get(key), int | float)]
            if values:
                figures[key] = round(statistics.median(values), 4)
        figures["train_images_per_s_runs"] = [row["train_images_per_s"] for row in done]
        summary[name] = figures
    first = summary[names[0]]
    for name in names:
        figures = summary[name]
        if first.get("gflop_per_image") and figures.get("train_images_per_s"):
            tflops = first["gflop_per_image"] * figures["train_images_per_s"] / 1e3
            figures["model_tflop_s"] = round(tflops, 4)
            if peak_tflops:
                figures["fraction_of_peak"] = round(tflops / peak_tflops, 4)
        if name != names[0] and first.get("train_images_per_s") and figures.get("train_images_per_s"):
            figures[f"speedup_vs_{names[0]}"] = round(
                figures["train_images_per_s"] / first["train_images_per_s"], 3
            )
    return summary


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = ["setting", "round", *SUMMARY_KEYS, "run_s", "overrides", "error"]
    lines = ["\t".join(columns)]
    lines += ["\t".join("" if row.get(c) is None else str(row.get(c)) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def bench_train_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark: the settings interleaved over ``--rounds``; figures to ``--out-dir``."""
    if not (REPO_ROOT / "train.py").is_file() or not (REPO_ROOT / "conf").is_dir():
        raise SystemExit(f"train-e2e runs the repository's train.py and conf/; not found under {REPO_ROOT}")
    settings = [parse_setting(text) for text in (args.setting or DEFAULT_SETTINGS)]
    names = [name for name, _ in settings]
    if len(set(names)) != len(names):
        raise SystemExit(f"--setting names must differ: {names}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.data = args.out_dir / "coco_like"
    ensure_coco_like(args.data, args.train_images, args.val_images, args.processes)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else float("inf")
    for round_ in range(args.rounds):  # ABBA...: each setting runs first as often as last
        for name, overrides in settings if round_ % 2 == 0 else settings[::-1]:
            left = budget - (time.perf_counter() - start)
            # A setting's longest run so far, else the longest of any: what this run should take.
            before = [row["run_s"] for row in rows if row["setting"] == name] or [
                row["run_s"] for row in rows
            ]
            if left <= 0 or (before and max(before) > left):  # would not end within --budget-s
                print(
                    f"train-e2e: {name} round {round_} skipped: {left:.0f} s of the budget left", flush=True
                )
                continue
            rows.append(run_setting(args, name, overrides, round_, timeout=min(args.run_timeout, left)))
            with (args.out_dir / "runs.jsonl").open("a") as file:
                file.write(json.dumps(rows[-1]) + "\n")
            write_tsv(args.out_dir / "runs.tsv", rows)
    summary = summarize(rows, names, args.peak_tflops)
    figures = {
        "settings": {name: " ".join(overrides) for name, overrides in settings},
        "common_overrides": " ".join(args.override),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "rounds": args.rounds,
        "summary": summary,
    }
    (args.out_dir / "summary.json").write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train-e2e`` options."""
    add = parser.add_argument
    add("--setting", action="append", help="NAME=OVERRIDES, repeatable (default: baseline= fast=speed=gpu)")
    add("--override", action="append", default=[], help="a train.py override for every setting, repeatable")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="trainer=gpu or trainer=cpu")
    add("--data", type=Path, default=None, help="COCO-format folder (default: a generated COCO-like set)")
    add("--train-images", type=int, default=600, help="generated train images (when --data is absent)")
    add("--val-images", type=int, default=50, help="generated val images")
    add("--processes", type=int, default=4, help="processes drawing the generated set")
    add("--steps", type=int, default=100, help="timed training steps per run")
    add("--warmup-steps", type=int, default=20, help="untimed steps first (compilation, tuning)")
    add("--profile-steps", type=int, default=5, help="extra steps under torch.profiler (GPU busy fraction)")
    add("--flop-steps", type=int, default=2, help="extra steps under the FLOP counter (eager runs)")
    add("--sync-steps", action="store_true", help="synchronize the device after each step")
    add("--rounds", type=int, default=1, help="interleaved rounds of all settings")
    add("--run-timeout", type=float, default=1800, help="seconds before a run is stopped")
    add(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for all runs: later ones that would not fit are skipped",
    )
    add("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (deleted by default)")
    add("--peak-tflops", type=float, default=None, help="the device's peak, for fraction_of_peak")
    add("--out-dir", type=Path, default=Path("bench_e2e"), help="runs.jsonl, runs.tsv, summary.json, runs/")
    add("--in-process", action="store_true", help="run train.py's flow in this process (tests)")
