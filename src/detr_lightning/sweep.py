"""Hydra multirun sweeps: each job's outcome in its folder, and a ranked summary of the whole sweep.

`run_sweep_job` records each job of ``python train.py -m ...`` in ``<job dir>/job_status.json`` (``running``,
then ``ok``, ``failed`` or ``interrupted``; the ``optimized_value`` returned to the sweeper) and keeps a
failing job from stopping the sweep. After each job the Hydra callback `SweepSummary` writes the sweep's
``summary.csv`` (swept values, best epoch of the optimized metric, final figures; best job first, unfinished
jobs last); when the sweep ends it prints it with the best job as a single-run command.
``python -m detr_lightning.tools.sweep_summary SWEEP_DIR`` does the same for a stopped sweep.
"""

from __future__ import annotations

import csv
import gc
import logging
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from rich.text import Text

from detr_lightning.files import atomic_writer, format_duration, read_json, write_json
from detr_lightning.runs import (
    JOB_STATUS_FILE,
    SUMMARY_FILE,
    best_of_epochs,
    command_line,
    differing_keys,
    find_job_dirs,
    override_values,
    read_epoch_rows,
    read_run,
)

log = logging.getLogger(__name__)

MODES = ("max", "min")
#: Final figures of ``metrics.json`` shown beside the best value (when the jobs have them).
DEFAULT_FINAL_METRICS = ("test/map", "test/map_50")
STATUS_STYLES = {"ok": "green", "failed": "red", "interrupted": "yellow", "incomplete": "yellow"}
#: Hydra's own overrides (``hydra.sweep.dir=...``, ``hydra=...``, ``+hydra/launcher=...``).
_HYDRA_OVERRIDE = re.compile(r"[+~]*hydra([./=]|$)")


# ---------------------------------------------------------------------------------------------- one job
def is_multirun() -> bool:
    """Whether the running Hydra job is part of a multirun (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_sweep_job(
    task: Callable[[DictConfig], dict[str, float]],
    cfg: DictConfig,
    *,
    user_error: Callable[[BaseException], BaseException | None],
) -> dict[str, float] | None:
    """Run ``task(cfg)`` as one job of a multirun and record its outcome in ``<job dir>/job_status.json``.

    A job that raises is logged (with its traceback, unless ``user_error`` finds a user error in it),
    recorded as ``failed`` with the error on one line, and returns None: the sweep goes on with the next
    job. Ctrl-C or an exit is recorded as ``interrupted`` and stops the sweep.
    """
    hydra_config = HydraConfig.get()
    job_dir = Path(hydra_config.runtime.output_dir)
    record: dict[str, Any] = {
        "status": "running",
        "overrides": list(hydra_config.overrides.task),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # Who runs it: a job whose process is gone without recording its end was killed (runs.read_run).
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),  # set by a launcher (Ray, SLURM)
    }
    write_job_status(job_dir, record)
    start = time.monotonic()
    try:
        metrics = task(cfg)
        record["status"] = "ok"
        return metrics
    except Exception as error:
        if (shown := user_error(error)) is not None:
            log.error("job %s failed: %s", hydra_config.job.num, shown)
        else:
            log.exception("job %s failed, the sweep goes on", hydra_config.job.num)
        record.update(status="failed", error=one_line(shown or error, with_type=shown is None))
        return None
    except BaseException as error:  # Ctrl-C, SystemExit: the sweep stops here
        record.update(status="interrupted", error=one_line(error, with_type=True))
        raise
    finally:
        record["duration_s"] = round(time.monotonic() - start, 1)
        write_job_status(job_dir, record)
        # End an open W&B run: the next job's WandbLogger would log into it (it reuses ``wandb.run``). Then
        # stop this process's W&B service: a launcher's worker process (Ray) may be killed once the sweep
        # ends, and a service still attached then fails at exit with a traceback.
        wandb = sys.modules.get("wandb")  # never imported here: only a job that logged to W&B has a run open
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=1 if record["status"] != "ok" else 0)
            wandb.teardown()
        # The job's trainer, model and data sit in reference cycles (and in a failed job's traceback):
        # free them, and the memory they hold, before the next job of this process starts.
        gc.collect()


def optimized_value(cfg: DictConfig, metrics: dict[str, float] | None) -> float | None:
    """What ``train.py`` returns to a sweeper: the best ``cfg.optimized_metric`` over the epochs of the
    job's ``metrics.csv`` (as for ``best.ckpt`` and the sweep summary), else its final value in ``metrics``.
    None for a failed job (``metrics`` None), a metric never logged or no ``optimized_metric``: the Optuna
    sweeper counts a trial without a float as failed and goes on (it stops the whole search on a NaN)."""
    name = cfg.optimized_metric
    if not name or metrics is None:
        return None
    mode = str(cfg.optimized_metric_mode)  # max | min, checked by the config schema
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    best = best_of_epochs(read_epoch_rows(job_dir), name, mode)
    if best is not None:
        return best[0]
    if name not in metrics:
        log.warning(
            "optimized_metric=%s was never logged, so the sweeper counts the job as failed; logged: %s. "
            "Fix: set optimized_metric to one of these.",
            name,
            ", ".join(sorted(metrics)) or "nothing",
        )
        return None
    return float(metrics[name])


def record_optimized_value(value: float | None) -> float | None:
    """Add ``value`` (what ``train.py`` returns to the sweeper) to the running job's ``job_status.json``
    as ``"optimized_value"`` (null for None, NaN or infinity, which JSON cannot hold), and return it."""
    if rank_zero_only.rank == 0:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        record = read_json(job_dir / JOB_STATUS_FILE)
        record["optimized_value"] = float(value) if value is not None and math.isfinite(value) else None
        write_job_status(job_dir, record)
    return value


def write_job_status(job_dir: Path, record: dict[str, Any]) -> None:
    """Write ``job_status.json`` into ``job_dir`` (global rank 0 only: DDP ranks share the folder)."""
    if rank_zero_only.rank == 0:
        write_json(job_dir / JOB_STATUS_FILE, record, indent=2)


def one_line(error: BaseException, with_type: bool) -> str:
    """The error's message on one line (``Type: message`` with ``with_type``; the type when it has none)."""
    message = " ".join(str(error).split())
    if not message:
        return type(error).__name__
    return f"{type(error).__name__}: {message}" if with_type else message


def check_mode(mode: str, key: str) -> str:
    """``mode`` when it is ``max`` or ``min``; a ValueError naming ``key`` otherwise."""
    if mode not in MODES:
        raise ValueError(f"{key}={mode!r} is not a direction: set {key} to max (mAP, ...) or min (a loss)")
    return mode


# ------------------------------------------------------------------------------------------ job folders
@dataclass
class JobResult:
    """What the summary says about one job of a sweep."""

    job: str  # the job folder, relative to the sweep folder (0, 1, ... by default)
    status: str  # ok, failed, interrupted or incomplete (no end recorded: killed or running)
    overrides: list[str]
    best: float | None = None  # best optimized metric over the epochs (the final one without metrics.csv)
    best_epoch: int | None = None  # None when best comes from metrics.json
    epochs: int = 0  # rows of metrics.csv
    final: dict[str, float] = field(default_factory=dict)  # the figures of metrics.json
    duration_s: float | None = None
    error: str = ""  # the one-line error of a job that did not end ok
    job_name: str = "train"  # the entry point that ran it (train.py)


def read_job(job_dir: Path, sweep_dir: Path, metric: str, mode: str) -> JobResult:
    """Read one job folder; missing or unreadable files leave their fields empty."""
    run = read_run(job_dir, metric=metric, mode=mode)
    best, best_epoch = best_of_epochs(run.epochs, metric, mode) or (None, None)
    if best is None and not math.isnan(run.final.get(metric, math.nan)):
        best = run.final[metric]
    status, error = run.status or "incomplete", run.error
    if status == "running":
        status, error = "incomplete", "started but no end recorded: the job was killed, or is still running"
    elif run.status is None:
        error = f"no {JOB_STATUS_FILE}: the job was killed before training, or never ran train.py"
    return JobResult(
        job=job_dir.relative_to(sweep_dir).as_posix(),
        status=status,
        overrides=run.overrides,
        best=best,
        best_epoch=best_epoch,
        epochs=len(run.epochs),
        final=run.final,
        duration_s=run.duration_s if run.duration_measured else None,
        error=error,
        job_name=run.job_name,
    )


def summarize_sweep(sweep_dir: Path, metric: str, mode: str = "max") -> list[JobResult]:
    """Every job of ``sweep_dir``: finished jobs by their best ``metric`` (best first), then the others."""
    check_mode(mode, "mode")
    jobs = [read_job(job_dir, sweep_dir, metric, mode) for job_dir in find_job_dirs(sweep_dir)]
    sign = -1.0 if mode == "max" else 1.0
    # sorted() is stable: ties keep the job order of find_job_dirs.
    return sorted(jobs, key=lambda job: (job.status != "ok", job.best is None, sign * (job.best or 0.0)))


# ---------------------------------------------------------------------------------------------- summary
def swept_keys(jobs: Sequence[JobResult]) -> list[str]:
    """Override keys whose values differ between the jobs (the swept parameters), in command-line order."""
    return differing_keys([override_values(job.overrides) for job in jobs])


def write_summary_csv(
    jobs: Sequence[JobResult], path: Path, metric: str, final_metrics: Sequence[str] = DEFAULT_FINAL_METRICS
) -> Path:
    """Write ``summary.csv`` (atomically: a reader never sees half a file) and return its path: one row per
    job, in the order of ``jobs``, all with the same columns (only the ``final_metrics`` that some job has);
    empty cells for what a job lacks."""
    keys, finals = swept_keys(jobs), _shown_finals(jobs, final_metrics)
    rows: list[dict[str, Any]] = []
    for rank, job in enumerate(jobs, start=1):
        values = override_values(job.overrides)
        row: dict[str, Any] = {"rank": rank, "job": job.job, "status": job.status}
        row.update({key: values.get(key, "") for key in keys})
        row.update({f"best {metric}": job.best, "best_epoch": job.best_epoch, "epochs": job.epochs})
        row.update({name: job.final.get(name) for name in finals})
        row.update(duration_s=job.duration_s, error=job.error, overrides=" ".join(job.overrides))
        rows.append({column: "" if value is None else value for column, value in row.items()})
    with atomic_writer(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


def summary_table(jobs: Sequence[JobResult], metric: str, mode: str, final_metrics: Sequence[str]) -> Table:
    """The summary as a rich table: the swept parameters, best ``metric`` and its epoch, and the errors."""
    keys, finals = swept_keys(jobs), _shown_finals(jobs, final_metrics)
    show_errors = any(job.error for job in jobs)
    right, clipped = {"justify": "right"}, {"max_width": 80, "no_wrap": True, "overflow": "ellipsis"}
    columns = [("#", right), ("job", {}), ("status", {}), *((key, clipped) for key in keys or ["overrides"])]
    columns += [(f"best {metric}", right), ("epoch", right), *((name, right) for name in finals)]
    columns += [("time", right), *([("error (whole in summary.csv)", clipped)] if show_errors else [])]
    # Text, not markup: overrides and errors hold brackets (`a=[1,2]`, `shape [2, 3]`).
    table = Table(title=Text(f"Sweep summary: {len(jobs)} jobs, best {metric} ({mode}) first"))
    for header, options in columns:
        table.add_column(Text(header), **options)
    for rank, job in enumerate(jobs, start=1):
        values = override_values(job.overrides)
        cells: list[Any] = [rank, job.job]
        cells += [values.get(key, "") for key in keys] if keys else [" ".join(job.overrides)]
        cells += [_format_figure(job.best), "" if job.best_epoch is None else job.best_epoch]
        cells += [_format_figure(job.final.get(name)) for name in finals]
        cells.append("" if job.duration_s is None else format_duration(job.duration_s))
        cells += [job.error] if show_errors else []
        texts = [Text(str(cell)) for cell in cells]
        texts.insert(2, Text(job.status, style=STATUS_STYLES.get(job.status, "yellow")))
        table.add_row(*texts)
    return table


def single_run_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides without Hydra's own (sweep folder, sweeper, launcher), which say how the sweep
    ran, not what the job trained."""
    return [override for override in overrides if not _HYDRA_OVERRIDE.match(override)]


def best_job(jobs: Sequence[JobResult]) -> JobResult | None:
    """The first job of ``jobs`` (ranked, as `summarize_sweep` returns them) that finished with a value of
    the metric; None without one."""
    return next((job for job in jobs if job.status == "ok" and job.best is not None), None)


def print_summary(
    jobs: Sequence[JobResult],
    metric: str,
    mode: str,
    final_metrics: Sequence[str] = DEFAULT_FINAL_METRICS,
    csv_path: Path | None = None,
) -> None:
    """Print :func:`summary_table`, captioned with ``csv_path``, and then the :func:`best_job` as a single-run
    command, ``python train.py OVERRIDES`` quoted for a shell (without ``-m`` and Hydra's own overrides)."""
    console = Console()
    table = summary_table(jobs, metric, mode, final_metrics)
    if csv_path is not None:
        table.caption = Text(str(csv_path))
    if not console.is_terminal:  # a log file or a pipe: the whole table, not squeezed into 80 columns
        unbounded = console.options.update_width(sys.maxsize)
        console.width = max(console.width, console.measure(table, options=unbounded).maximum)
    console.print(table)
    best = best_job(jobs)
    if best is not None:
        console.print(Text(f"Best job ({best.job}, {metric} {_format_figure(best.best)}) as a single run:"))
        command = command_line(best.job_name, single_run_overrides(best.overrides))
        # One line, never wrapped by rich: it pastes into a shell as it is.
        console.print(Text(command), soft_wrap=True)


# ------------------------------------------------------------------------------------- Hydra callback
class SweepSummary(Callback):
    """Hydra callback (``conf/hydra/callbacks/sweep_summary.yaml``): ``summary.csv`` in the sweep folder
    after every job, current while a long sweep runs and left behind when it is stopped, and the table when
    the sweep ends. Nothing in single runs; only global rank 0 writes (DDP ranks may start their own sweep).

    Args:
        metric: the figure jobs are ranked by (``optimized_metric``), best over each job's epochs.
        mode: ``max`` or ``min``, the direction in which ``metric`` improves.
        final_metrics: figures of each job's ``metrics.json`` shown as columns, when some job has them.
    """

    def __init__(
        self, metric: str = "val/map", mode: str = "max", final_metrics: Sequence[str] = DEFAULT_FINAL_METRICS
    ) -> None:
        self.metric = metric
        self.mode = check_mode(mode, "optimized_metric_mode")  # what conf/hydra/callbacks passes as mode
        self.final_metrics = list(final_metrics)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or rank_zero_only.rank != 0:
            return
        # The job's own folder is concrete where the sweep folder may hold ${now:...} (a remote launcher).
        job_dir = Path(config.hydra.runtime.output_dir)
        depth = len(Path(str(config.hydra.sweep.subdir)).parts)
        self.write(job_dir.parents[depth - 1] if depth else job_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:
            return
        jobs, csv_path = self.write(Path(str(config.hydra.sweep.dir)))
        print_summary(jobs, self.metric, self.mode, self.final_metrics, csv_path)
        log.info("Sweep summary of %d jobs: %s", len(jobs), csv_path)

    def write(self, sweep_dir: Path) -> tuple[list[JobResult], Path]:
        """Summarize ``sweep_dir`` into its ``summary.csv``; the jobs (ranked) and the file's path."""
        jobs = summarize_sweep(sweep_dir, self.metric, self.mode)
        return jobs, write_summary_csv(jobs, sweep_dir / SUMMARY_FILE, self.metric, self.final_metrics)


def _shown_finals(jobs: Sequence[JobResult], final_metrics: Sequence[str]) -> list[str]:
    return [name for name in final_metrics if any(name in job.final for job in jobs)]


def _format_figure(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
