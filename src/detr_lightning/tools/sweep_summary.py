"""``python -m detr_lightning.tools.sweep_summary SWEEP_DIR``: write ``summary.csv`` of a sweep folder and
print it with the best job as a single-run command, as the `SweepSummary` Hydra callback does when a sweep
ends (e.g. for a stopped sweep)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detr_lightning.runs import JOB_STATUS_FILE, SUMMARY_FILE, find_job_dirs, read_run, read_sweep_config
from detr_lightning.sweep import MODES, print_summary, summarize_sweep, write_summary_csv


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m detr_lightning.tools.sweep_summary",
        description="Write summary.csv of a Hydra sweep folder and print it (e.g. for a stopped sweep).",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir): multirun/...")
    parser.add_argument("--metric", help="figure to rank by; default: optimized_metric of the sweep's config")
    parser.add_argument("--mode", choices=MODES, help="its direction; default: optimized_metric_mode or max")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(
            f"{args.sweep_dir} is not a folder: pass a sweep folder, e.g. multirun/train/<date_time>"
        )
    saved = {k: v for k, v in saved_settings(args.sweep_dir).items() if isinstance(v, str)}
    metric = args.metric or saved.get("optimized_metric") or "val/map"
    mode = args.mode or saved.get("optimized_metric_mode") or "max"
    jobs = summarize_sweep(args.sweep_dir, metric, mode)
    if not jobs:
        parser.error(f"no job folders (with .hydra/overrides.yaml or {JOB_STATUS_FILE}) in {args.sweep_dir}")
    csv_path = write_summary_csv(jobs, args.sweep_dir / SUMMARY_FILE, metric)
    print_summary(jobs, metric, mode, csv_path=csv_path)


def saved_settings(sweep_dir: Path) -> dict[str, Any]:
    """The sweep's config: its ``multirun.yaml``, else (a sweeper plugin such as Optuna's writes none)
    the ``.hydra/config.yaml`` of its first job; not resolved, empty when neither is readable."""
    config = read_sweep_config(sweep_dir)
    if "optimized_metric" not in config:
        job_dirs = find_job_dirs(sweep_dir)
        config = {**(read_run(job_dirs[0]).config if job_dirs else {}), **config}
    return config


if __name__ == "__main__":
    main()
