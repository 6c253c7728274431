"""Hydra multirun sweeps: every job's outcome in its folder, and a ranked summary of the whole sweep.

``python train.py -m ...`` runs each job through :func:`run_sweep_job`, which records the job in
``<job dir>/job_status.json`` (``running``, then ``ok``, ``failed`` or ``interrupted``) and keeps a failing
job from stopping the sweep. The Hydra callback :class:`SweepSummary` (``conf/hydra/callbacks``) reads
every job folder of the sweep after each job and at the end: ``.hydra/overrides.yaml``, ``metrics.csv``
(the best value of the optimized metric over the epochs, and its epoch), ``metrics.json`` (final figures,
e.g. the test mAP of the best checkpoint) and ``job_status.json``. It writes ``summary.csv`` into the sweep
folder, best job first and jobs that did not finish last, and prints it as a table when the sweep ends.

``python -m detr_lightning.sweep SWEEP_DIR`` writes and prints the summary of a sweep that was stopped.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from detr_lightning.callbacks.coco_evaluator import METRICS_FILE
from detr_lightning.training import USER_ERRORS

log = logging.getLogger(__name__)

JOB_STATUS_FILE = "job_status.json"
EPOCH_METRICS_FILE = "metrics.csv"  # written by detr_lightning.callbacks.EpochMetricsCSV
SUMMARY_FILE = "summary.csv"
MODES = ("max", "min")
#: Final figures of ``metrics.json`` shown beside the best value (when the jobs have them).
DEFAULT_FINAL_METRICS = ("test/map", "test/map_50")


# ---------------------------------------------------------------------------------------------- one job
def is_multirun() -> bool:
    """Whether the running Hydra job is part of a multirun (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_sweep_job(task: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> dict[str, float] | None:
    """Run ``task(cfg)`` as one job of a multirun and record its outcome in ``<job dir>/job_status.json``.

    A job that raises is logged to its own log (with the traceback, except for user errors, whose message
    says it all), recorded as ``failed`` with the error on one line, and returns None so that the sweep
    goes on with the next job. Ctrl-C or an exit is recorded as ``interrupted`` and stops the sweep.
    """
    hydra_config = HydraConfig.get()
    job_dir = Path(hydra_config.runtime.output_dir)
    record: dict[str, Any] = {
        "status": "running",
        "overrides": list(hydra_config.overrides.task),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_job_status(job_dir, record)
    start = time.monotonic()
    try:
        metrics = task(cfg)
        record["status"] = "ok"
        return metrics
    except Exception as error:
        if isinstance(error, USER_ERRORS):
            log.error("job %s failed: %s", hydra_config.job.num, error)
        else:
            log.exception("job %s failed, the sweep goes on", hydra_config.job.num)
        record.update(status="failed", error=one_line(error, with_type=not isinstance(error, USER_ERRORS)))
        return None
    except BaseException as error:  # Ctrl-C, SystemExit: the sweep stops here
        record.update(status="interrupted", error=one_line(error, with_type=True))
        raise
    finally:
        record["duration_s"] = round(time.monotonic() - start, 1)
        write_job_status(job_dir, record)
        _finish_wandb_run(failed=record["status"] != "ok")
        # The job's trainer, model and data sit in reference cycles (and in a failed job's traceback):
        # free them, and the memory they hold, before the next job of this process starts.
        gc.collect()


def optimized_value(cfg: DictConfig, metrics: dict[str, float] | None) -> float | None:
    """What ``train.py`` returns to a sweeper: the best ``cfg.optimized_metric`` of this job, as a float.

    Best over the epochs of the job's ``metrics.csv`` (in the direction ``cfg.optimized_metric_mode``, max
    by default), as for ``best.ckpt`` and the sweep summary; else its final value in ``metrics``. NaN for a
    failed job (``metrics`` None) or a metric that was never logged, so sweepers count the trial as failed;
    None when no ``optimized_metric`` is set.
    """
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if metrics is None:
        return math.nan
    mode = check_mode(cfg.get("optimized_metric_mode", "max"), "optimized_metric_mode")
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    best = best_of_epochs(read_epoch_rows(job_dir / EPOCH_METRICS_FILE), name, mode)
    if best is not None:
        return best[0]
    if name not in metrics:
        log.warning(
            "optimized_metric=%s was never logged, so the sweeper gets NaN; logged: %s. "
            "Fix: set optimized_metric to one of these.",
            name,
            ", ".join(sorted(metrics)) or "nothing",
        )
        return math.nan
    return float(metrics[name])


def write_job_status(job_dir: Path, record: dict[str, Any]) -> None:
    """Write ``job_status.json`` into ``job_dir`` (global rank 0 only: DDP ranks share the folder)."""
    if rank_zero_only.rank == 0:
        _write_atomically(job_dir / JOB_STATUS_FILE, json.dumps(record, indent=2) + "\n")


def one_line(error: BaseException, with_type: bool) -> str:
    """The error's message on one line (``Type: message`` with ``with_type``)."""
    message = " ".join(str(error).split())
    if not with_type:
        return message or type(error).__name__
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def check_mode(mode: str, key: str) -> str:
    """``mode`` when it is ``max`` or ``min``; a ValueError naming ``key`` otherwise."""
    if mode not in MODES:
        raise ValueError(f"{key}={mode!r} is not a direction: set {key} to max (mAP, ...) or min (a loss)")
    return mode


def _finish_wandb_run(failed: bool) -> None:
    """End an open W&B run: the next job's WandbLogger would log into it (it reuses ``wandb.run``)."""
    wandb = sys.modules.get("wandb")  # never imported here: only a job that logged to W&B has a run open
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


# ------------------------------------------------------------------------------------------ job folders
@dataclass
class JobResult:
    """What the summary says about one job of a sweep.

    Attributes:
        job: the job folder, relative to the sweep folder (``0``, ``1``, ... by default).
        status: ``ok``, ``failed``, ``interrupted`` or ``incomplete`` (no end recorded: killed or running).
        overrides: the job's command-line overrides, ``key=value`` as Hydra saved them.
        best: best value of the optimized metric over the epochs (the final one without ``metrics.csv``).
        best_epoch: the epoch of ``best`` (None when it comes from ``metrics.json``).
        epochs: rows of ``metrics.csv``.
        final: the figures of ``metrics.json`` (last validation, test of the best checkpoint).
        duration_s: wall time of the job, when it ended.
        error: the one-line error of a job that did not end ``ok``.
    """

    job: str
    status: str
    overrides: list[str]
    best: float | None = None
    best_epoch: int | None = None
    epochs: int = 0
    final: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    error: str = ""

    def override_values(self) -> dict[str, str]:
        """``{key: value}`` of the overrides (``+``/``++`` prefixes dropped, ``~key`` kept with no value)."""
        pairs = (override.partition("=") for override in self.overrides)
        return {key.lstrip("+"): value for key, _, value in pairs}


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (with ``.hydra/overrides.yaml`` or ``job_status.json``), in job order."""
    markers = [*sweep_dir.glob("**/.hydra/overrides.yaml"), *sweep_dir.glob(f"**/{JOB_STATUS_FILE}")]
    job_dirs = {
        marker.parent.parent if marker.parent.name == ".hydra" else marker.parent for marker in markers
    }
    job_dirs.discard(sweep_dir)  # a run folder used as sweep folder: only its sub-folders are jobs
    return sorted(job_dirs, key=lambda job_dir: _natural_key(job_dir.relative_to(sweep_dir).as_posix()))


def read_job(job_dir: Path, sweep_dir: Path, metric: str, mode: str) -> JobResult:
    """Read one job folder; missing or unreadable files leave their fields empty."""
    status_record = _read_json(job_dir / JOB_STATUS_FILE)
    final = {k: float(v) for k, v in _read_json(job_dir / METRICS_FILE).items() if _is_number(v)}
    rows = read_epoch_rows(job_dir / EPOCH_METRICS_FILE)
    result = JobResult(
        job=job_dir.relative_to(sweep_dir).as_posix(),
        status=str(status_record.get("status", "incomplete")),
        overrides=_read_overrides(job_dir) or [str(o) for o in status_record.get("overrides", [])],
        epochs=len(rows),
        final=final,
        duration_s=status_record.get("duration_s"),
        error=str(status_record.get("error", "")),
    )
    best = best_of_epochs(rows, metric, mode)
    if best is not None:
        result.best, result.best_epoch = best
    elif metric in final and not math.isnan(final[metric]):
        result.best = final[metric]
    if result.status == "running":
        result.status = "incomplete"
        result.error = "started but no end recorded: the job was killed, or is still running"
    elif not status_record:
        result.error = f"no {JOB_STATUS_FILE}: the job was killed before training, or never ran train.py"
    return result


def read_epoch_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` (one per epoch); none when it is missing or unreadable."""
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def epoch_series(rows: list[dict[str, str]], metric: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of ``metric`` over epoch rows, blanks and NaN left out (a row without an
    ``epoch`` column counts by its position)."""
    series = []
    for index, row in enumerate(rows):
        value = _to_float(row.get(metric))
        if value is None or math.isnan(value):
            continue
        epoch = _to_float(row.get("epoch"))
        series.append((int(epoch) if epoch is not None else index, value))
    return series


def best_of_epochs(rows: list[dict[str, str]], metric: str, mode: str) -> tuple[float, int | None] | None:
    """The best value of ``metric`` over epoch rows and the first epoch that reached it; None without one."""
    best: tuple[float, int | None] | None = None
    for epoch, value in epoch_series(rows, metric):
        if best is None or (value > best[0] if mode == "max" else value < best[0]):
            best = (value, epoch)
    return best


def first_reaching(series: Iterable[tuple[int, float]], target: float, mode: str) -> int | None:
    """The first epoch of ``(epoch, value)`` pairs whose value is as good as ``target`` or better
    (``mode``: max|min), or None."""
    for epoch, value in series:
        if value >= target if mode == "max" else value <= target:
            return epoch
    return None


def first_epoch_reaching(rows: list[dict[str, str]], metric: str, target: float, mode: str) -> int | None:
    """The first epoch whose ``metric`` is as good as ``target`` or better (``mode``: max|min), or None."""
    return first_reaching(epoch_series(rows, metric), target, mode)


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
    values = [job.override_values() for job in jobs]
    keys: list[str] = []
    for job_values in values:
        keys.extend(key for key in job_values if key not in keys)
    return [key for key in keys if len({job_values.get(key) for job_values in values}) > 1]


def summary_columns(jobs: Sequence[JobResult], metric: str, final_metrics: Sequence[str]) -> list[str]:
    """The columns of ``summary.csv``."""
    shown_finals = [name for name in final_metrics if any(name in job.final for job in jobs)]
    return [
        "rank",
        "job",
        "status",
        *swept_keys(jobs),
        f"best {metric}",
        "best_epoch",
        "epochs",
        *shown_finals,
        "duration_s",
        "error",
        "overrides",
    ]


def summary_rows(
    jobs: Sequence[JobResult], metric: str, final_metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One ``summary.csv`` row per job, in the order of ``jobs``; empty cells for what a job lacks."""
    keys = swept_keys(jobs)
    rows = []
    for rank, job in enumerate(jobs, start=1):
        values = job.override_values()
        row: dict[str, Any] = {"rank": rank, "job": job.job, "status": job.status}
        row.update({key: values.get(key, "") for key in keys})
        row[f"best {metric}"] = _blank_if_none(job.best)
        row["best_epoch"] = _blank_if_none(job.best_epoch)
        row["epochs"] = job.epochs
        row.update({name: job.final[name] for name in final_metrics if name in job.final})
        row["duration_s"] = _blank_if_none(job.duration_s)
        row["error"] = job.error
        row["overrides"] = " ".join(job.overrides)
        rows.append(row)
    return rows


def write_summary_csv(
    jobs: Sequence[JobResult], path: Path, metric: str, final_metrics: Sequence[str] = DEFAULT_FINAL_METRICS
) -> Path:
    """Write ``summary.csv`` (atomically: a reader never sees half a file) and return its path."""
    columns = summary_columns(jobs, metric, final_metrics)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(summary_rows(jobs, metric, final_metrics))
    _write_atomically(path, buffer.getvalue())
    return path


STATUS_STYLES = {"ok": "green", "failed": "red", "interrupted": "yellow", "incomplete": "yellow"}


def summary_table(
    jobs: Sequence[JobResult], metric: str, mode: str, final_metrics: Sequence[str] = DEFAULT_FINAL_METRICS
) -> Table:
    """The summary as a rich table: the swept parameters, best ``metric`` and its epoch, and the errors."""
    keys = swept_keys(jobs)
    finals = [name for name in final_metrics if any(name in job.final for job in jobs)]
    # Text, not markup: overrides and errors hold brackets (`a=[1,2]`, `shape [2, 3]`).
    table = Table(title=Text(f"Sweep summary: {len(jobs)} jobs, best {metric} ({mode}) first"))
    table.add_column("#", justify="right")
    table.add_column("job")
    table.add_column("status")
    for key in keys or ["overrides"]:
        table.add_column(Text(key), max_width=80, no_wrap=True, overflow="ellipsis")
    table.add_column(Text(f"best {metric}"), justify="right")
    table.add_column("epoch", justify="right")
    for name in finals:
        table.add_column(Text(name), justify="right")
    table.add_column("time", justify="right")
    show_errors = any(job.error for job in jobs)
    if show_errors:
        table.add_column("error (whole in summary.csv)", max_width=80, no_wrap=True, overflow="ellipsis")
    for rank, job in enumerate(jobs, start=1):
        values = job.override_values()
        cells: list[Any] = [rank, job.job]
        cells += [values.get(key, "") for key in keys] if keys else [" ".join(job.overrides)]
        cells += [_format_figure(job.best), _blank_if_none(job.best_epoch)]
        cells += [_format_figure(job.final.get(name)) for name in finals]
        cells.append(_format_duration(job.duration_s))
        if show_errors:
            cells.append(job.error)
        texts = [Text(str(cell)) for cell in cells]
        texts.insert(2, Text(job.status, style=STATUS_STYLES.get(job.status, "yellow")))
        table.add_row(*texts)
    return table


def print_summary(
    jobs: Sequence[JobResult],
    metric: str,
    mode: str,
    final_metrics: Sequence[str] = DEFAULT_FINAL_METRICS,
    csv_path: Path | None = None,
    console: Console | None = None,
) -> None:
    """Print :func:`summary_table`, captioned with the path of ``summary.csv``."""
    console = console or Console()
    table = summary_table(jobs, metric, mode, final_metrics)
    if csv_path is not None:
        table.caption = Text(str(csv_path))
    if not console.is_terminal:  # a log file or a pipe: the whole table, not squeezed into 80 columns
        unbounded = console.options.update_width(sys.maxsize)
        console.width = max(console.width, console.measure(table, options=unbounded).maximum)
    console.print(table)


# ------------------------------------------------------------------------------------- Hydra callback
class SweepSummary(Callback):
    """Hydra callback: ``summary.csv`` in the sweep folder after every job, and a table when the sweep ends.

    Registered under ``hydra.callbacks`` (``conf/hydra/callbacks/sweep_summary.yaml``); it does nothing in
    single runs. Rewriting the file after every job keeps it current while a long sweep runs and leaves it
    behind when the sweep is stopped. Only global rank 0 writes (DDP ranks may start their own sweep).

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
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs, csv_path = self.write(sweep_dir)
        print_summary(jobs, self.metric, self.mode, self.final_metrics, csv_path)
        log.info("Sweep summary of %d jobs: %s", len(jobs), csv_path)

    def write(self, sweep_dir: Path) -> tuple[list[JobResult], Path]:
        """Summarize ``sweep_dir`` into its ``summary.csv``; the jobs (ranked) and the file's path."""
        jobs = summarize_sweep(sweep_dir, self.metric, self.mode)
        return jobs, write_summary_csv(jobs, sweep_dir / SUMMARY_FILE, self.metric, self.final_metrics)


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
    """``python -m detr_lightning.sweep SWEEP_DIR``: write and print the summary of a sweep folder."""
    parser = argparse.ArgumentParser(
        prog="python -m detr_lightning.sweep",
        description="Write summary.csv of a Hydra sweep folder and print it (e.g. for a stopped sweep).",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir): multirun/...")
    parser.add_argument("--metric", help="figure to rank by; default: optimized_metric of multirun.yaml")
    parser.add_argument("--mode", choices=MODES, help="its direction; default: optimized_metric_mode or max")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(
            f"{args.sweep_dir} is not a folder: pass a sweep folder, e.g. multirun/train/<date_time>"
        )
    saved = _read_multirun_config(args.sweep_dir)
    metric = args.metric or saved.get("optimized_metric") or "val/map"
    mode = args.mode or saved.get("optimized_metric_mode") or "max"
    jobs = summarize_sweep(args.sweep_dir, metric, mode)
    if not jobs:
        parser.error(f"no job folders (with .hydra/overrides.yaml or {JOB_STATUS_FILE}) in {args.sweep_dir}")
    csv_path = write_summary_csv(jobs, args.sweep_dir / SUMMARY_FILE, metric)
    print_summary(jobs, metric, mode, csv_path=csv_path)


# ---------------------------------------------------------------------------------------------- helpers
def _natural_key(text: str) -> list[Any]:
    """Sort key that puts job ``2`` before job ``10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _read_overrides(job_dir: Path) -> list[str]:
    try:
        overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
    except Exception:  # missing, unreadable or not YAML: the job folder may be half-written
        return []
    return [str(override) for override in overrides] if OmegaConf.is_list(overrides) else []


def _read_multirun_config(sweep_dir: Path) -> dict[str, Any]:
    """The top-level plain values of the sweep's ``multirun.yaml`` (empty when it is missing)."""
    try:
        saved = OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml"), resolve=False)
    except Exception:
        return {}
    return {k: v for k, v in saved.items() if isinstance(v, str)} if isinstance(saved, dict) else {}


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def _to_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _blank_if_none(value: Any) -> Any:
    return "" if value is None else value


def format_figure(value: float | None) -> str:
    """A COCO figure or loss in a markdown report: 3 decimals; ``n/a`` for COCOeval's -1, ``–`` when
    absent."""
    if value is None or math.isnan(value):
        return "–"
    if value < 0:
        return "n/a"
    return f"{value:.3f}"


def _format_figure(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


if __name__ == "__main__":
    main()
