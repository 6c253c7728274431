"""What a run folder (``outputs/...``) or a sweep's job folder (``multirun/.../<job>``) holds, read back.

A run folder holds ``.hydra/`` (``config.yaml`` as composed, ``overrides.yaml``, ``hydra.yaml``),
``metrics.json`` (final COCO figures), ``metrics.csv`` (one row per epoch), ``plots/`` and, for a job of
a multirun, ``job_status.json``. Every reader here returns empty values for a missing or unreadable file:
a folder may be half-written (a killed or running job).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import re
import shlex
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detr_lightning.files import is_number, read_csv_rows, read_json, to_float

METRICS_FILE = "metrics.json"  # written by callbacks.CocoEvaluator
EPOCH_METRICS_FILE = "metrics.csv"  # written by callbacks.EpochMetricsCSV
JOB_STATUS_FILE = "job_status.json"  # written by sweep.run_sweep_job
SUMMARY_FILE = "summary.csv"  # a sweep folder's, written by sweep.SweepSummary
PLOTS_DIR = "plots"  # written by callbacks.plots.TrainingPlots
METRICS_PLOT = "metrics.png"
PREDICTIONS_PLOT = "val_predictions.png"
log = logging.getLogger(__name__)
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


@dataclass
class Run:
    """What a run folder says; missing files leave their fields empty.

    ``metric``/``mode`` say what "best epoch" means: the run's ``optimized_metric``/``_mode`` unless given.
    ``duration_measured`` is False when ``duration_s`` is estimated from file times.
    """

    path: Path
    label: str
    job_name: str = "train"
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # config groups, as hydra.yaml records them
    config: dict[str, Any] = field(default_factory=dict)  # .hydra/config.yaml, not resolved
    status: str | None = None  # of job_status.json: running, ok, failed or interrupted
    error: str = ""  # of job_status.json
    started: str | None = None
    duration_s: float | None = None
    duration_measured: bool = False
    final: dict[str, float] = field(default_factory=dict)  # the numbers of metrics.json
    epochs: list[dict[str, str]] = field(default_factory=list)  # the rows of metrics.csv
    plots: list[Path] = field(default_factory=list)
    metric: str = "val/map"
    mode: str = "max"

    @property
    def command(self) -> str:
        return command_line(self.job_name, self.overrides)

    def override_values(self) -> dict[str, str]:
        return override_values(self.overrides)


def read_run(path: Path, label: str | None = None, metric: str | None = None, mode: str | None = None) -> Run:
    """Read a run folder. ``label`` defaults to the folder's name (``<sweep>/<job>`` for a sweep's job)."""
    if label is None:
        label = f"{path.parent.name}/{path.name}" if is_sweep_dir(path.parent) else path.name
    hydra = _mapping(_read_yaml(path / ".hydra" / "hydra.yaml")).get("hydra") or {}
    config = _mapping(_read_yaml(path / ".hydra" / "config.yaml"))
    status = read_json(path / JOB_STATUS_FILE)
    killed_error = _killed_error(status)
    job_name = str((hydra.get("job") or {}).get("name") or "train")
    overrides = _read_yaml(path / ".hydra" / "overrides.yaml")
    if not isinstance(overrides, list):
        overrides = (hydra.get("overrides") or {}).get("task") or status.get("overrides") or []
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    plots = [path / PLOTS_DIR / name for name in (METRICS_PLOT, PREDICTIONS_PLOT)]
    return Run(
        path=path,
        label=label,
        job_name=job_name,
        overrides=[str(override) for override in overrides],
        choices={
            str(group): str(option)
            for group, option in choices.items()
            if option is not None and not str(group).startswith("hydra/")
        },
        config=config,
        status="failed" if killed_error else status.get("status"),
        error=killed_error or str(status.get("error", "")),
        started=_started(path, job_name, status),
        duration_s=_duration(path, status),
        duration_measured=is_number(status.get("duration_s")),
        final={k: float(v) for k, v in read_json(path / METRICS_FILE).items() if is_number(v)},
        epochs=read_epoch_rows(path),
        plots=[plot for plot in plots if plot.is_file()],
        metric=metric or str(config.get("optimized_metric") or "val/map"),
        mode=mode or str(config.get("optimized_metric_mode") or "max"),
    )


def command_line(job_name: str, overrides: Iterable[str], multirun: bool = False) -> str:
    """The command that ran a job: ``python train.py [-m] OVERRIDES`` (quoted for a shell)."""
    return shlex.join(["python", f"{job_name}.py", *(["-m"] if multirun else []), *overrides])


def override_values(overrides: Iterable[str]) -> dict[str, str]:
    """``{key: value}`` of ``key=value`` overrides (``+``/``++`` dropped, ``~key`` kept with no value)."""
    pairs = (override.partition("=") for override in overrides)
    return {key.lstrip("+"): value for key, _, value in pairs}


def differing_keys(values: Sequence[Mapping[str, str]]) -> list[str]:
    """The keys whose values differ between the mappings (e.g. `override_values` of runs: the swept
    parameters), in order of first appearance."""
    keys = dict.fromkeys(key for mapping in values for key in mapping)
    return [key for key in keys if len({mapping.get(key) for mapping in values}) > 1]


def is_sweep_dir(path: Path) -> bool:
    """Whether ``path`` is a multirun folder (``summary.csv`` or ``multirun.yaml``)."""
    return (path / SUMMARY_FILE).is_file() or (path / "multirun.yaml").is_file()


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds any file a run leaves."""
    names = (".hydra/overrides.yaml", METRICS_FILE, EPOCH_METRICS_FILE, JOB_STATUS_FILE)
    return any((path / name).is_file() for name in names)


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (with ``.hydra/overrides.yaml`` or ``job_status.json``), in job order
    (``2`` before ``10``)."""
    job_dirs = {marker.parent.parent for marker in sweep_dir.glob("**/.hydra/overrides.yaml")}
    job_dirs |= {marker.parent for marker in sweep_dir.glob(f"**/{JOB_STATUS_FILE}")}
    job_dirs.discard(sweep_dir)  # a run folder used as sweep folder: only its sub-folders are jobs

    def natural_key(job_dir: Path) -> list[Any]:
        parts = re.split(r"(\d+)", job_dir.relative_to(sweep_dir).as_posix())
        return [int(part) if part.isdigit() else part for part in parts]

    return sorted(job_dirs, key=natural_key)


def read_sweep_config(sweep_dir: Path) -> dict[str, Any]:
    """The sweep's ``multirun.yaml``, not resolved (empty when missing or unreadable)."""
    return _mapping(_read_yaml(sweep_dir / "multirun.yaml"))


def run_data_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved ``data`` settings of a run folder's ``.hydra/config.yaml``; None without them (a
    warning says why when they cannot be read). ``paths.root_dir`` is the training run's working directory
    (of ``.hydra/hydra.yaml``), so relative data paths resolve as they did then."""
    run_dir = run_dir.resolve()
    config_file, hydra_file = run_dir / ".hydra" / "config.yaml", run_dir / ".hydra" / "hydra.yaml"
    if not config_file.is_file():
        return None
    try:
        config = OmegaConf.load(config_file)
        if "data" not in config:
            return None
        hydra_config = OmegaConf.load(hydra_file) if hydra_file.is_file() else OmegaConf.create()
        cwd = OmegaConf.select(hydra_config, "hydra.runtime.cwd")
        if "paths" in config:
            config.paths.root_dir = str(cwd or Path.cwd())
            config.paths.output_dir = str(run_dir)
        data = OmegaConf.to_container(config.data, resolve=True)
    except (OmegaConfBaseException, OSError, ValueError) as error:
        log.warning("Cannot read the data settings of %s (%s); using defaults.", config_file, error)
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------- epochs
def read_epoch_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's ``metrics.csv``, one per epoch, as text."""
    return read_csv_rows(run_dir / EPOCH_METRICS_FILE)


def epoch_number(row: dict[str, str], index: int) -> int:
    """The epoch of a ``metrics.csv`` row: its ``epoch`` column, else its position ``index``."""
    epoch = to_float(row.get("epoch"))
    return int(epoch) if epoch is not None else index


def epoch_series(rows: list[dict[str, str]], metric: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of ``metric`` over epoch rows, blanks and NaN left out."""
    values = [(epoch_number(row, index), to_float(row.get(metric))) for index, row in enumerate(rows)]
    return [(epoch, value) for epoch, value in values if value is not None and not math.isnan(value)]


def best_of_epochs(rows: list[dict[str, str]], metric: str, mode: str) -> tuple[float, int] | None:
    """The best value of ``metric`` over epoch rows (``mode``: max|min) and the first epoch that reached
    it; None without one."""
    series = epoch_series(rows, metric)
    if not series:
        return None
    epoch, value = (max if mode == "max" else min)(series, key=lambda pair: pair[1])  # the first of ties
    return value, epoch


def first_reaching(series: Iterable[tuple[int, float | None]], target: float, mode: str) -> int | None:
    """The first epoch of ``(epoch, value)`` pairs (`epoch_series`, or ``enumerate`` of a curve; None
    values skipped) whose value is as good as ``target`` or better (``mode``: max|min), or None."""
    reached = (e for e, v in series if v is not None and (v >= target if mode == "max" else v <= target))
    return next(reached, None)


# ---------------------------------------------------------------------------------------------- helpers
def _read_yaml(path: Path) -> Any:
    """The YAML file as plain lists and dicts, interpolations kept as text; None when unreadable."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # missing, unreadable or not YAML: the folder may be half-written
        return None


def _mapping(content: Any) -> dict[str, Any]:
    return content if isinstance(content, dict) else {}


def _killed_error(status: dict[str, Any]) -> str | None:
    """The error of a job recorded as ``running`` on this machine that has no process any more: it was
    killed (out of memory, SIGKILL, a lost launcher worker) before it could record its end. None for any
    other job; other machines' jobs (SLURM) cannot be checked from here and stay ``running``."""
    pid, host = status.get("pid"), status.get("host")
    if status.get("status") != "running" or host != socket.gethostname() or not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return (
            f"killed: its process ({pid} on {host}) ended without recording an end "
            "(out of memory, SIGKILL or a lost launcher worker); see the job's log"
        )
    except PermissionError:  # it exists, under another user
        pass
    return None


def _started(path: Path, job_name: str, status: dict[str, Any]) -> str | None:
    """When the run started: from ``job_status.json``, else the first line of its log, else file times."""
    if status.get("started"):
        return str(status["started"]).replace("T", " ")
    with contextlib.suppress(OSError), (path / f"{job_name}.log").open() as handle:
        if match := _LOG_TIME.match(handle.readline()):
            return match.group(1)
    for name in (".hydra/config.yaml", EPOCH_METRICS_FILE, METRICS_FILE):
        if (path / name).is_file():
            stamp = datetime.datetime.fromtimestamp((path / name).stat().st_mtime)
            return stamp.strftime("%Y-%m-%d %H:%M:%S")
    return None


def _duration(path: Path, status: dict[str, Any]) -> float | None:
    """Seconds the run took: from ``job_status.json``, else from ``config.yaml`` to ``metrics.json``."""
    if is_number(status.get("duration_s")):
        return float(status["duration_s"])
    try:
        start = (path / ".hydra" / "config.yaml").stat().st_mtime
        end = (path / METRICS_FILE).stat().st_mtime
    except OSError:
        return None
    return max(end - start, 0.0)
