"""``python -m detr_lightning.tools.sweep_summary SWEEP_DIR``: write ``summary.csv`` of a sweep folder and
print it, as the `SweepSummary` Hydra callback does when a sweep ends (e.g. for a stopped sweep)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from detr_lightning.runs import JOB_STATUS_FILE, SUMMARY_FILE, read_sweep_config
from detr_lightning.sweep import MODES, print_summary, summarize_sweep, write_summary_csv


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m detr_lightning.tools.sweep_summary",
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
    saved = {k: v for k, v in read_sweep_config(args.sweep_dir).items() if isinstance(v, str)}
    metric = args.metric or saved.get("optimized_metric") or "val/map"
    mode = args.mode or saved.get("optimized_metric_mode") or "max"
    jobs = summarize_sweep(args.sweep_dir, metric, mode)
    if not jobs:
        parser.error(f"no job folders (with .hydra/overrides.yaml or {JOB_STATUS_FILE}) in {args.sweep_dir}")
    csv_path = write_summary_csv(jobs, args.sweep_dir / SUMMARY_FILE, metric)
    print_summary(jobs, metric, mode, csv_path=csv_path)


if __name__ == "__main__":
    main()
