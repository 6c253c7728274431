"""``python -m detr_lightning.tools.bench train-e2e``: training images/s of ``train.py`` itself, end to end.

Each setting (``train.py`` overrides: by default ``baseline`` none, ``fast`` ``speed=gpu``) runs as its own
``python train.py ...`` process, the settings interleaved round after round, on the same data (by default
a generated COCO-like set, ``python -m detr_lightning.data.demo --realistic``). The run is the real one
(data check, official augmentation, DETR-R50, validation with the COCO evaluator, checkpoints, CSV logger)
in the frame `RUN_FRAME`, with ``trainer.max_steps`` as asked and the `E2ETimer` callback, which writes
the run's figures to a JSON file. BENCHMARKS.md ("GPU end-to-end") says what each figure is. Between
steps, the time is split net of what is timed apart, so that ``window_s = step_s + data_s +
epoch_boundary_s + logger_s + validation_s + checkpoint_s``.
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
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from detr_lightning.files import atomic_writer, format_duration, read_json, write_json

REPO_ROOT = Path(__file__).resolve().parents[3]
TIMER_TARGET = f"{__name__}.E2ETimer"
TIMER_OPTIONS = ("warmup_steps", "steps", "profile_steps", "flop_steps", "sync_steps")  # from the CLI
RESULT_FILE = "e2e.json"
DEFAULT_SETTINGS = ("baseline=", "fast=speed=gpu")
#: The frame of every run: random weights, no test split, no progress bar.
RUN_FRAME = (
    "model.pretrained=null",
    "model.pretrained_backbone=false",
    "test=false",
    "callbacks.progress_bar=null",
)
#: A run's figures that the summary takes the median of, in the order of runs.tsv's columns.
SUMMARY_KEYS = tuple(
    """train_images_per_s e2e_images_per_s step_median_s step_s matching_s step_logging_s data_s
    epoch_boundary_s logger_s validation_s checkpoint_s first_steps_s peak_allocated_mib peak_reserved_mib
    compiled_frames recompiled_in_window graph_breaks gpu_busy_fraction nvml_utilization_mean batch_shapes
    steps_with_new_shapes padded_fraction gflop_per_image""".split()
)


# ------------------------------------------------------------------------------------------ the callback
def synchronize(device: torch.device) -> None:
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
    """``torch.cuda.utilization`` (NVML: % of time a kernel ran) sampled in a thread from construction."""

    def __init__(self, device: torch.device, interval_s: float) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(device, interval_s), daemon=True)
        self._thread.start()

    def _sample(self, device: torch.device, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.samples.append(float(torch.cuda.utilization(device)))
            except Exception:  # no pynvml or NVML here, or it went away: the samples so far stand
                return

    def stop(self) -> float | None:
        """The mean utilization as a fraction; None without a sample."""
        self._stop.set()
        self._thread.join()
        return round(statistics.mean(self.samples) / 100, 4) if self.samples else None


class E2ETimer(Callback):
    """Times a ``train.py`` run's steady-state training loop; writes its figures to the JSON file ``out``.

    Steps count from 0: ``warmup_steps`` untimed, ``steps`` timed, then ``profile_steps`` under
    ``torch.profiler`` (CUDA only) and ``flop_steps`` under the FLOP counter (eager models only):
    ``trainer.max_steps`` should be their sum. ``sync_steps``: synchronize the device after every step
    (exact step times, a sync more per step). ``nvml_interval_s``: NVML's sampling period (0: off).
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
        self.out, self.warmup_steps, self.sync_steps = Path(out), warmup_steps, sync_steps
        self.nvml_interval_s = nvml_interval_s
        # The first step after the timed ones, after the profiled ones and after the FLOP-counted ones.
        self.window_end = warmup_steps + steps
        self.profile_end = self.window_end + profile_steps
        self.flop_end = self.profile_end + flop_steps
        self.device = torch.device("cpu")
        self.step = 0  # train batches started
        self.region = "gap"  # "step" | "validation" | "gap" (between steps): where a wrapped call counts
        self.in_window = False
        self.seconds: defaultdict[str, float] = defaultdict(float)  # "region:kind" -> seconds in the window
        self.step_times: list[float] = []
        self.validations: list[dict[str, Any]] = []
        self.window_shapes: set[tuple[int, ...]] = set()  # padded batch shapes of the timed steps
        self.seen_shapes: set[tuple[int, ...]] = set()  # those of every step so far
        self.new_shapes = self.images = self.pixels = self.flops = self.flop_images = 0
        self.padded = torch.zeros(())
        self.figures: dict[str, Any] = {}
        self._started: dict[str, float] = {}  # perf_counter() as the first step, this step... began
        self._window_s: float | None = None
        self._last_end = 0.0
        self._timed_in_gap = 0.0  # validation, checkpoints and logger writes since the last step ended
        self._new_epoch = False
        self._unwrap = ExitStack()
        self._depth = 0  # wrapped calls in progress: only the outermost counts
        self._profiler: Any = None
        self._flop_counter: Any = None
        self._nvml: _NvmlSampler | None = None

    def _wrap(self, owner: Any, name: str, kind: str, sync: bool = False) -> None:
        """Time every call of ``owner.name`` (an instance attribute shadows the method) as ``kind``."""
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            outermost = self._depth == 0
            self._depth += 1
            if sync and outermost:
                synchronize(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                if outermost and self.in_window:
                    seconds = time.perf_counter() - start
                    self.seconds[f"{self.region}:{kind}"] += seconds
                    if self.region == "gap":
                        self._timed_in_gap += seconds

        object.__setattr__(owner, name, timed)
        self._unwrap.callback(object.__delattr__, owner, name)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.device = trainer.strategy.root_device
        matcher = getattr(getattr(pl_module, "criterion", None), "matcher", None)
        if hasattr(matcher, "match_layers"):
            self._wrap(matcher, "match_layers", "matching", sync=True)
        self._wrap(pl_module, "log", "logging")
        self._wrap(pl_module, "log_dict", "logging")
        for logger in trainer.loggers:
            self._wrap(logger, "log_metrics", "logger")
            self._wrap(logger, "save", "logger")
        self._wrap(trainer, "save_checkpoint", "checkpoint", sync=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unwrap.close()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.device = pl_module.device
        if self.step == self.warmup_steps:
            synchronize(self.device)  # the timed window starts with the device idle
            now = self._started["window"] = time.perf_counter()
            self.figures["first_steps_s"] = round(now - self._started.get("first_step", now), 3)  # warm-up
            self.figures["dynamo_before_window"] = _dynamo_counts()
            if self.device.type == "cuda" and self.nvml_interval_s > 0:
                self._nvml = _NvmlSampler(self.device, self.nvml_interval_s)
            self.in_window = True
        if self.step == self.window_end and self.profile_end > self.window_end and self.device.type == "cuda":
            self._start_profiler()
        if self.step == self.profile_end and self.flop_end > self.profile_end:
            self._start_flop_counter(pl_module)
        now = self._started["step"] = time.perf_counter()
        self._started.setdefault("first_step", now)
        if self.in_window and self.step > self.warmup_steps:
            gap = "gap:epoch_boundary" if self._new_epoch else "gap:data"
            self.seconds[gap] += now - self._last_end - self._timed_in_gap
        self._new_epoch = False
        images, mask, targets = batch
        shape = tuple(images.shape)
        if self.in_window:
            self.new_shapes += shape not in self.seen_shapes
            self.window_shapes.add(shape)
            self.padded = self.padded.to(mask.device) + mask.sum()  # stays on the device: no sync
            self.pixels += mask.numel()
            self.images += len(targets)
        self.seen_shapes.add(shape)
        if self._flop_counter is not None:
            self.flop_images += len(targets)
        self.region = "step"

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        last_timed = self.step == self.window_end - 1
        if self.sync_steps or last_timed:
            synchronize(self.device)
        now = time.perf_counter()
        self.region = "gap"
        if self.in_window:
            self.step_times.append(now - self._started["step"])
        if last_timed:
            self._window_s = now - self._started["window"]
            self.in_window = False
            self.figures["dynamo_after_window"] = _dynamo_counts()
            self.figures["nvml_utilization_mean"] = self._nvml.stop() if self._nvml else None
            # Written now too: the timed figures survive a failure in the steps after them.
            write_json(self.out, self.result())
        if self.step == self.profile_end - 1 and self._profiler is not None:
            self._stop_profiler()
        if self.step == self.flop_end - 1 and self._flop_counter is not None:
            self._flop_counter.__exit__(None, None, None)
            self.flops, self._flop_counter = self._flop_counter.get_total_flops(), None
        self._last_end, self._timed_in_gap = now, 0.0
        self.step += 1

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._new_epoch = True

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            synchronize(pl_module.device)
            self.region = "validation"
            self._started["validation"] = time.perf_counter()
            self.validations.append({"s": 0.0, "images": 0, "in_window": self.in_window})

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        if not trainer.sanity_checking:
            self.validations[-1]["images"] += len(batch[2])

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            synchronize(pl_module.device)
            self.validations[-1]["s"] = seconds = time.perf_counter() - self._started["validation"]
            if self.in_window:
                self._timed_in_gap += seconds
            self.region = "gap"

    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        synchronize(self.device)
        try:
            self._profiler = profile(activities=[ProfilerActivity.CUDA]).__enter__()
        except Exception as error:  # the figures of the timed steps are kept whatever the profiler does
            self.figures["profile_error"] = repr(error)
        self._started["profile"] = time.perf_counter()

    def _stop_profiler(self) -> None:
        synchronize(self.device)
        wall_s = time.perf_counter() - self._started["profile"]
        profiler, self._profiler = self._profiler, None
        try:
            profiler.__exit__(None, None, None)
            with tempfile.TemporaryDirectory() as tmp:
                trace_path = Path(tmp) / "trace.json"
                profiler.export_chrome_trace(str(trace_path))
                trace = json.loads(trace_path.read_text())
        except Exception as error:
            self.figures["profile_error"] = repr(error)
            return
        self.figures["gpu_busy_fraction"] = round(busy_fraction(trace, wall_s), 4)
        self.figures["profile_wall_s"] = round(wall_s, 4)

    def _start_flop_counter(self, pl_module: LightningModule) -> None:
        if getattr(getattr(pl_module, "model", pl_module), "_compiled_call_impl", None) is not None:
            return  # the counter does not see inside compiled graphs
        from torch.utils.flop_counter import FlopCounterMode

        self._flop_counter = FlopCounterMode(display=False).__enter__()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        write_json(self.out, self.result())

    def result(self) -> dict[str, Any]:
        """The figures of the run (BENCHMARKS.md, "GPU end-to-end")."""
        figures = {"warmup_steps": self.warmup_steps, "timed_steps": len(self.step_times), **self.figures}
        validation_s = sum(v["s"] for v in self.validations if v["in_window"])
        if self._window_s is not None:
            window_s, seconds = self._window_s, self.seconds
            before, after = figures["dynamo_before_window"], figures["dynamo_after_window"]
            figures.update(
                images=self.images,
                window_s=round(window_s, 4),
                train_images_per_s=round(
                    self.images / (window_s - validation_s - seconds["gap:checkpoint"]), 3
                ),
                e2e_images_per_s=round(self.images / window_s, 3),
                step_s=round(sum(self.step_times), 4),
                step_median_s=round(statistics.median(self.step_times), 5),
                matching_s=round(seconds["step:matching"], 4),
                step_logging_s=round(seconds["step:logging"], 4),
                data_s=round(seconds["gap:data"], 4),
                epoch_boundary_s=round(seconds["gap:epoch_boundary"], 4),
                logger_s=round(seconds["gap:logger"] + seconds["gap:logging"], 4),
                validation_s=round(validation_s, 4),
                checkpoint_s=round(seconds["gap:checkpoint"], 4),
                batch_shapes=len(self.window_shapes),
                steps_with_new_shapes=self.new_shapes,
                padded_fraction=round(float(self.padded) / max(self.pixels, 1), 4),
                compiled_frames=after["frames"],
                recompiled_in_window=after["frames"] - before["frames"],
                graph_breaks=after["graph_breaks"],
            )
        figures["validations"] = [{**v, "s": round(v["s"], 4)} for v in self.validations]
        if self.flops and self.flop_images:
            figures["gflop_per_image"] = round(self.flops / self.flop_images / 1e9, 2)
        if self.device.type == "cuda":
            figures["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            figures["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
            figures["gpu"] = torch.cuda.get_device_name(self.device)
        figures["device"] = str(self.device)
        return figures


# ------------------------------------------------------------------------------------------ the driver
def _progress(message: str) -> None:
    print(f"train-e2e: {message}", flush=True)


def parse_setting(text: str) -> tuple[str, list[str]]:
    """``NAME=OVERRIDES`` (space-separated ``train.py`` overrides, possibly none) -> ``(NAME, overrides)``."""
    name, _, overrides = text.partition("=")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--setting {text!r}: give NAME=OVERRIDES, NAME in letters, digits, '-' and '_'")
    return name, shlex.split(overrides)


def run_overrides(args: argparse.Namespace, overrides: Sequence[str], run_dir: Path) -> list[str]:
    """The ``train.py`` overrides of one run: the frame, the timer, ``--override`` and the setting's own."""
    timer = {"_target_": TIMER_TARGET, "out": run_dir / RESULT_FILE}
    timer.update({option: getattr(args, option) for option in TIMER_OPTIONS})
    return [
        "trainer=gpu" if torch.device(args.device).type == "cuda" else "trainer=cpu",
        f"data.root={args.data}",
        f"paths.output_dir={run_dir}",
        f"trainer.max_steps={args.warmup_steps + args.steps + args.profile_steps + args.flop_steps}",
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
    GlobalHydra.instance().clear()  # the context below restores this cleared state on exit
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)  # ${hydra:...} resolves as under train.py
    with open_dict(cfg):
        del cfg["hydra"]  # as train.py's task sees its config
    train(cfg)


def _run_train_py(overrides: list[str], log_path: Path, timeout: float) -> str | None:
    """``python train.py OVERRIDES`` in a process of its own, output to ``log_path``: what failed, if any."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DETR_LIGHTNING_OFFLINE": "1", "WANDB_MODE": "disabled"}
    argv = [sys.executable, str(REPO_ROOT / "train.py"), *overrides]
    with log_path.open("w") as log:
        print("$", shlex.join(argv), file=log, flush=True)
        try:
            run = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return f"stopped after {format_duration(timeout)}"
    return f"exit status {run.returncode}; log in logs/{log_path.name}" if run.returncode else None


def run_setting(
    args: argparse.Namespace, name: str, overrides: list[str], round_: int, timeout: float
) -> dict[str, Any]:
    """One run of one setting (stopped after ``timeout`` seconds): its figures (or its error) as a dict."""
    run_name = f"{name}_r{round_}"
    run_dir = args.out_dir / "runs" / run_name
    (run_dir / RESULT_FILE).unlink(missing_ok=True)  # never a former run's figures
    command = run_overrides(args, overrides, run_dir)
    start = time.perf_counter()
    if args.in_process:
        _run_in_process(command)
        error = None
    else:
        error = _run_train_py(
            [*command, f"hydra.run.dir={run_dir}"], args.out_dir / "logs" / f"{run_name}.log", timeout
        )
    row: dict[str, Any] = {"setting": name, "round": round_, "overrides": " ".join(overrides)}
    row["run_s"] = round(time.perf_counter() - start, 1)
    row.update(read_json(run_dir / RESULT_FILE))  # written when the timed steps end, again when fit ends
    if error:  # the timed figures, if any, are kept: what failed came after them
        row["error"] = error
    if not args.keep_checkpoints:  # DETR-R50 with its AdamW state: about 0.5 GB a file
        for checkpoint in run_dir.glob("checkpoints/*.ckpt"):
            checkpoint.unlink()
    shown = (*SUMMARY_KEYS[:4], "data_s", "validation_s", "recompiled_in_window", "error")
    _progress(f"{name} round {round_}: " + ", ".join(f"{key} {row[key]}" for key in shown if key in row))
    return row


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
    for name, figures in summary.items():
        if not figures.get("train_images_per_s"):
            continue
        if first.get("gflop_per_image"):
            tflops = first["gflop_per_image"] * figures["train_images_per_s"] / 1e3
            figures["model_tflop_s"] = round(tflops, 4)
            if peak_tflops:
                figures["fraction_of_peak"] = round(tflops / peak_tflops, 4)
        if name != names[0] and first.get("train_images_per_s"):
            speedup = figures["train_images_per_s"] / first["train_images_per_s"]
            figures[f"speedup_vs_{names[0]}"] = round(speedup, 3)
    return summary


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = ["setting", "round", *SUMMARY_KEYS, "run_s", "overrides", "error"]
    lines = ["\t".join(columns)]
    lines += ["\t".join("" if row.get(c) is None else str(row.get(c)) for c in columns) for row in rows]
    with atomic_writer(path) as handle:
        handle.write("\n".join(lines) + "\n")


def bench_train_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark: the settings interleaved over ``--rounds``; figures to ``--out-dir``."""
    from detr_lightning.data.demo import REALISTIC_DEMO_OPTIONS, ensure_demo_dataset

    if not (REPO_ROOT / "train.py").is_file() or not (REPO_ROOT / "conf").is_dir():
        raise SystemExit(f"train-e2e runs the repository's train.py and conf/; not found under {REPO_ROOT}")
    settings = [parse_setting(text) for text in (args.setting or DEFAULT_SETTINGS)]
    names = [name for name, _ in settings]
    if len(set(names)) != len(names):
        raise SystemExit(f"--setting names must differ: {names}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.data is None:  # a given folder is used as it is (train.py's data check reads it)
        args.data, start = args.out_dir / "coco_like", time.perf_counter()
        # A test split of 2 images: the layout needs one with images; test=false leaves it unused.
        sizes = {"num_train": args.train_images, "num_val": args.val_images, "num_test": 2}
        ensure_demo_dataset(args.data, **sizes, processes=args.processes, **REALISTIC_DEMO_OPTIONS)
        _progress(f"data generated at {args.data} ({time.perf_counter() - start:.1f} s)")
    rows: list[dict[str, Any]] = []
    deadline = time.perf_counter() + (args.budget_s if args.budget_s is not None else float("inf"))
    for round_ in range(args.rounds):  # ABBA...: each setting runs first as often as last
        for name, overrides in settings if round_ % 2 == 0 else settings[::-1]:
            left = deadline - time.perf_counter()
            # What this run should take: the setting's longest run so far, else the longest of any.
            earlier = [row for row in rows if row["setting"] == name] or rows
            if left <= 0 or max((row["run_s"] for row in earlier), default=0.0) > left:
                _progress(f"{name} round {round_} skipped: {left:.0f} s of the budget left")
                continue
            rows.append(run_setting(args, name, overrides, round_, timeout=min(args.run_timeout, left)))
            with (args.out_dir / "runs.jsonl").open("a") as file:
                file.write(json.dumps(rows[-1]) + "\n")
            write_tsv(args.out_dir / "runs.tsv", rows)
    figures = {
        "settings": {name: " ".join(overrides) for name, overrides in settings},
        "common_overrides": " ".join(args.override),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "rounds": args.rounds,
        "summary": summarize(rows, names, args.peak_tflops),
    }
    write_json(args.out_dir / "summary.json", figures)
    return figures


def positive_int(text: str) -> int:
    """An ``argparse`` type: a whole number of 1 or more."""
    if (value := int(text)) < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train-e2e`` options."""
    add = parser.add_argument
    add("--setting", action="append", help="NAME=OVERRIDES, repeatable (default: baseline= fast=speed=gpu)")
    add("--override", action="append", default=[], help="a train.py override for every setting, repeatable")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="trainer=gpu or trainer=cpu")
    add("--data", type=Path, default=None, help="COCO-format folder (default: a generated COCO-like set)")
    add("--train-images", type=positive_int, default=600, help="generated train images (without --data)")
    add("--val-images", type=positive_int, default=50, help="generated val images")
    add("--processes", type=positive_int, default=4, help="processes drawing the generated set")
    add("--steps", type=positive_int, default=100, help="timed training steps per run")
    add("--warmup-steps", type=int, default=20, help="untimed steps first (compilation, tuning)")
    add("--profile-steps", type=int, default=5, help="extra steps under torch.profiler (GPU busy fraction)")
    add("--flop-steps", type=int, default=2, help="extra steps under the FLOP counter (eager runs)")
    add("--sync-steps", action="store_true", help="synchronize the device after each step")
    add("--rounds", type=positive_int, default=1, help="interleaved rounds of all settings")
    add("--run-timeout", type=float, default=1800, help="seconds before a run is stopped")
    add("--budget-s", type=float, default=None, help="seconds for all runs: skip those that would not fit")
    add("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (deleted by default)")
    add("--peak-tflops", type=float, default=None, help="the device's peak, for fraction_of_peak")
    add("--out-dir", type=Path, default=Path("bench_e2e"), help="runs.jsonl, runs.tsv, summary.json, runs/")
    add("--in-process", action="store_true", help="run train.py's flow in this process (tests)")
