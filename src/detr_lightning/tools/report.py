"""Markdown reports of training runs: ``python -m detr_lightning.tools.report RUN_DIR [...] [-o OUT.md]``.

Read only from the run folders (see `detr_lightning.runs`), per run: the command and config groups, when
it started and how long it took, the 12 pycocotools lines of ``metrics.json`` (val: the last validation;
test: the best checkpoint), AP per class, the best and last epochs of ``metrics.csv``, and the plots.
Several runs get a side-by-side table and a plot of their validation curves; a sweep folder stands for
its jobs plus its ``summary.csv``. Plots outside the report's folder are copied into ``plots/`` beside it.

Runs whose composed configuration (``.hydra/config.yaml``; else their overrides) differs only in the seed
and `RESULT_NEUTRAL_KEYS` are pooled into one *variant*, compared with the others over the fewest epochs
any run reached (runs stopped by ``trainer.max_time`` reach slightly different counts): see
`variants_table`. Writing into an existing file replaces only the text between the ``report:begin`` and
``report:end`` markers (see `compose_document`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detr_lightning.coco_summary import COCO_SUMMARY_KEYS as COCO_KEYS
from detr_lightning.coco_summary import coco_summary_lines
from detr_lightning.files import format_duration, read_csv_rows, to_float
from detr_lightning.runs import (
    EPOCH_METRICS_FILE,
    METRICS_FILE,
    METRICS_PLOT,
    PLOTS_DIR,
    PREDICTIONS_PLOT,
    SUMMARY_FILE,
    Run,
    best_of_epochs,
    command_line,
    differing_keys,
    epoch_number,
    epoch_series,
    find_job_dirs,
    first_reaching,
    is_run_dir,
    is_sweep_dir,
    read_run,
    read_sweep_config,
)

REPORT_FILE = "report.md"
BEGIN_MARKER = (
    "<!-- report:begin (written by python -m detr_lightning.tools.report: the text up to report:end is "
    "replaced when it runs again) -->"
)
END_MARKER = "<!-- report:end -->"
_BEGIN_PATTERN = re.compile(r"<!-- report:begin\b.*?-->", re.DOTALL)
COMPARISON_PLOT = "comparison.png"
VARIANTS_PLOT = "variants.png"
#: The validation curves plotted for several runs or variants: (metrics.csv column, title).
COMPARISON_FIGURES = [("val/map", "validation mAP"), ("val/map_50", "validation mAP@0.5")]
COMPARISON_CAPTION = "Validation mAP and mAP@0.5 per epoch, every run"
VARIANTS_CAPTION = "Validation mAP and mAP@0.5 per epoch: mean over seeds (line) and the seeds' range (band)"
#: The final figures of the comparison table, per split: (key after ``<split>/``, label).
MAIN_FIGURES = [("map", "mAP"), ("map_50", "mAP@0.5"), ("map_75", "mAP@0.75"), ("mar_100", "AR@100")]
#: Columns of the epochs table: (metrics.csv column, header).
EPOCH_COLUMNS = [("train/loss", "train loss"), ("val/loss", "val loss")]
EPOCH_COLUMNS += [(f"val/{key}", f"val {label}") for key, label in MAIN_FIGURES]
PLOT_CAPTIONS = {
    METRICS_PLOT: "Losses, validation COCO figures and learning rate per epoch",
    PREDICTIONS_PLOT: "Validation images: predictions (red, dashed, with scores) and ground truth (green)",
}
SPLITS = ("val", "test")
SPLIT_NOTES = {
    "train": {"val": "the last validation epoch", "test": "the best checkpoint on the test split"},
    "eval": {"val": "the evaluated checkpoint", "test": "the evaluated checkpoint"},
}
SEED_KEY = "seed"
#: Configuration keys (dotted prefixes) that do not change what a run computes, left out when pooling.
RESULT_NEUTRAL_KEYS = ("seed", "data.seed", "paths", "logger", "callbacks.progress_bar", "ckpt_path")
#: A seed suffix of a run folder's name (``demo_plain_s42``, ``run-seed7``), dropped from variant labels.
_SEED_SUFFIX = re.compile(r"[_-](?:s|seed)\d+$")
#: A plotted curve: label, ``(epoch, value)`` points and, for a band, the values at each point (or None).
Curve = tuple[str, list[tuple[int, float]], list[list[float]] | None]


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Sweep:
    """A multirun folder: its command, ``summary.csv`` rows and job runs."""

    path: Path
    command: str
    summary: list[dict[str, str]]
    runs: list[Run]


def read_sweep(path: Path, metric: str | None = None, mode: str | None = None) -> Sweep:
    """Read a multirun folder and its jobs (labelled ``<sweep folder>/<job>``)."""
    multirun = read_sweep_config(path).get("hydra") or {}
    task = [str(o) for o in (multirun.get("overrides") or {}).get("task") or []]
    job_name = str((multirun.get("job") or {}).get("name") or "train")
    runs = [
        read_run(job, f"{path.name}/{job.relative_to(path).as_posix()}", metric, mode)
        for job in find_job_dirs(path)
    ]
    return Sweep(path, command_line(job_name, task, multirun=True), read_csv_rows(path / SUMMARY_FILE), runs)


def collect(
    directories: Sequence[Path], metric: str | None = None, mode: str | None = None
) -> tuple[list[Sweep], list[Run]]:
    """The sweeps and the runs (sweep jobs included, in the order given) of the directories."""
    sweeps: list[Sweep] = []
    runs: list[Run] = []
    for folder in directories:
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder: pass a run folder (outputs/...) or a sweep folder")
        if is_sweep_dir(folder):
            sweeps.append(read_sweep(folder, metric, mode))
            runs.extend(sweeps[-1].runs)
        elif is_run_dir(folder):
            runs.append(read_run(folder, metric=metric, mode=mode))
        else:
            raise ValueError(
                f"{folder} is neither a run folder (with .hydra/, {METRICS_FILE} or "
                f"{EPOCH_METRICS_FILE}) nor a sweep folder (with {SUMMARY_FILE} or multirun.yaml)"
            )
    _unique_labels(runs)
    return sweeps, runs


def _unique_labels(runs: list[Run]) -> None:
    """Labels that tell the runs apart: the folder name, else parent/name, else a number appended."""
    for run in runs:
        if sum(other.label == run.label for other in runs) > 1 and "/" not in run.label:
            run.label = f"{run.path.parent.name}/{run.path.name}"
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"


# --------------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """The runs of one configuration, one per seed."""

    label: str
    runs: list[Run]

    @property
    def seeds(self) -> list[str]:
        """Each run's seed: its ``seed`` override, else its configuration's, else ``–``."""
        seeds = [run.override_values().get(SEED_KEY, run.config.get(SEED_KEY)) for run in self.runs]
        return ["–" if seed is None else str(seed) for seed in seeds]

    def epochs_reached(self) -> int:
        """Epochs every seed of the variant has figures for."""
        return min(len(run.epochs) for run in self.runs)

    def values_at(self, key: str, epoch: int) -> list[float]:
        """Each seed's ``key`` at ``epoch`` (0-based), seeds without a figure there left out."""
        values = [epoch_values(run, key).get(epoch) for run in self.runs]
        return [value for value in values if value is not None]

    def mean_curve(self, key: str, epochs: int) -> list[float | None]:
        """The mean over seeds of ``key`` at epochs ``0 .. epochs-1`` (None where no seed has it)."""
        return [_mean(self.values_at(key, epoch)) for epoch in range(epochs)]

    def curve(self, key: str) -> Curve:
        """The mean curve of ``key`` over the epochs every seed reached, with the seeds' range when
        there are several."""
        mean = self.mean_curve(key, self.epochs_reached())
        points = [(epoch, value) for epoch, value in enumerate(mean) if value is not None]
        spans = [self.values_at(key, epoch) for epoch, _ in points] if len(self.runs) > 1 else None
        return self.label, points, spans


def epoch_values(run: Run, key: str) -> dict[int, float]:
    """``{epoch: value}`` of ``key`` in the run's ``metrics.csv`` rows (NaN and blanks left out)."""
    return dict(epoch_series(run.epochs, key))


def run_settings(run: Run) -> dict[str, str]:
    """The settings that make a variant: the flattened composed configuration (else the overrides),
    less `RESULT_NEUTRAL_KEYS`."""
    values = _flatten(run.config) if run.config else run.override_values()
    neutral = tuple(f"{key}." for key in RESULT_NEUTRAL_KEYS)  # a key, or a key below it
    return {key: value for key, value in values.items() if not f"{key}.".startswith(neutral)}


def group_by_seed(runs: Sequence[Run]) -> list[Variant]:
    """The runs pooled by equal `run_settings`, in the order of each variant's first run.

    A variant is labelled by its runs' folder names less a seed suffix (``demo_plain_s42`` and
    ``demo_plain_s43``: ``demo_plain``), or what those names share, or else its overrides.
    """
    pooled: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    for run in runs:
        pooled.setdefault(tuple(sorted(run_settings(run).items())), []).append(run)
    variants = []
    for members in pooled.values():
        names = [_SEED_SUFFIX.sub("", run.label) for run in members]
        shared = names[0] if len(set(names)) == 1 else os.path.commonprefix(names).rstrip("_-/ ")
        overrides = " ".join(f"{k}={v}" for k, v in members[0].override_values().items() if k != SEED_KEY)
        variants.append(Variant(shared or overrides or "(no overrides)", members))
    labels = [variant.label for variant in variants]
    for variant in variants:
        if labels.count(variant.label) > 1:
            variant.label = f"{variant.label} ({', '.join(run.label for run in variant.runs)})"
    return variants


def common_budget(variants: Sequence[Variant]) -> int:
    """The epoch budget of the comparison: the fewest epochs any run reached."""
    return min(variant.epochs_reached() for variant in variants)


def variants_table(
    variants: Sequence[Variant], metric: str, mode: str
) -> tuple[list[str], list[list[str]], int]:
    """Header, rows and epoch budget of the variants table: per variant its seeds, each curve of
    `COMPARISON_FIGURES` at the last epoch of the budget (mean, then each seed), the mean of each seed's
    best ``metric`` within the budget, and the first epoch its mean ``metric`` curve reaches the first
    variant's (the reference's) at that last epoch ("the same mAP in fewer epochs")."""
    budget = common_budget(variants)
    last = budget - 1
    reference = variants[0].mean_curve(metric, budget)[last]
    header = ["variant", "seeds"]
    header += [f"`{key}` at epoch {last} (mean; per seed)" for key, _ in COMPARISON_FIGURES]
    header += [
        f"best `{metric}` within the budget (mean over seeds)",
        f"first epoch at `{variants[0].label}`'s `{metric}` at epoch {last} ({format_figure(reference)})",
    ]
    rows = []
    best = max if mode == "max" else min
    for variant in variants:
        row = [f"`{variant.label}`", ", ".join(variant.seeds)]
        for key, _ in COMPARISON_FIGURES:
            values = variant.values_at(key, last)
            per_seed = "; ".join(format_figure(value) for value in values)
            row.append(f"{format_figure(_mean(values))} ({per_seed})" if values else "–")
        within = [[v for e, v in epoch_values(run, metric).items() if e <= last] for run in variant.runs]
        row.append(format_figure(_mean([best(values) for values in within if values])))
        reached = None
        if reference is not None:
            reached = first_reaching(enumerate(variant.mean_curve(metric, budget)), reference, mode)
        half = " (within half the budget)" if reached is not None and reached + 1 <= budget / 2 else ""
        rows.append([*row, _reached_text(reached) + half])
    return header, rows, budget


# ------------------------------------------------------------------------------------------------ plots
def save_curves(
    target: Path, curves: dict[str, list[Curve]], figsize: tuple[float, float], budget: int | None = None
) -> None:
    """Write the PNG ``target``: a panel per `COMPARISON_FIGURES` key over the epochs, with its ``curves``
    (those without points left out) and the last epoch of the ``budget`` marked."""
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(COMPARISON_FIGURES))
    for axis, (key, title) in zip(panels, COMPARISON_FIGURES, strict=True):
        for label, points, spans in curves[key]:
            if not points:
                continue
            (line,) = axis.plot(*zip(*points, strict=True), marker=".", label=label)
            if spans is not None:
                epochs, lows, highs = [e for e, _ in points], [min(v) for v in spans], [max(v) for v in spans]
                axis.fill_between(epochs, lows, highs, color=line.get_color(), alpha=0.15)
        if budget is not None:
            axis.axvline(budget - 1, color="grey", linestyle="--", linewidth=1)
        axis.set(title=f"{title} ({key})", xlabel="epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)


# -------------------------------------------------------------------------------------------- rendering
class Renderer:
    """Markdown of runs and sweeps, with image links relative to ``out_dir`` (plots outside it copied).

    Without ``out_dir`` (standard output) links are relative to the working directory and no plot is
    drawn. ``brief`` leaves out the section of each run. Sections are lists of blocks (a heading, a
    paragraph, a table, ...), which the document separates by blank lines.
    """

    def __init__(self, out_dir: Path | None, brief: bool = False) -> None:
        self.out_dir = out_dir.resolve() if out_dir is not None else None
        self.brief = brief
        self.several_runs = False

    def document_body(self, sweeps: Sequence[Sweep], runs: Sequence[Run], command: str) -> str:
        self.several_runs = len(runs) > 1
        blocks = [BEGIN_MARKER]
        variants = group_by_seed(runs)
        if any(len(variant.runs) > 1 for variant in variants):
            blocks += self.variants_section(variants)
        elif len(runs) > 1:
            blocks += self.comparison(runs)
        for sweep in sweeps:
            blocks += self.sweep_section(sweep)
        if not self.brief:
            for run in runs:
                blocks += self.run_section(run)
        blocks += [f"_Written by `{command}` from the files of the run folders._", END_MARKER]
        return "\n\n".join(blocks)

    def comparison(self, runs: Sequence[Run]) -> list[str]:
        values = [run.override_values() for run in runs]
        rows = [[f"`{key}`", *(_cell(v.get(key, "")) for v in values)] for key in differing_keys(values)]
        if any(run.status for run in runs):
            rows.append(["status", *(run.status or "" for run in runs)])
        rows.append(["epochs", *(str(len(run.epochs)) for run in runs)])
        for metric in sorted({run.metric for run in runs}):
            best = [_best_text(run, metric, run.mode) for run in runs]
            rows.append([f"best `{metric}` over the epochs", *best])
        for split in SPLITS:
            if any(f"{split}/map" in run.final for run in runs):
                for key, label in MAIN_FIGURES:
                    figures = [format_figure(run.final.get(f"{split}/{key}")) for run in runs]
                    rows.append([f"{split} {label} (`{split}/{key}`)", *figures])
        reference, metric, mode = runs[0], runs[0].metric, runs[0].mode
        reference_best = best_of_epochs(reference.epochs, metric, mode)
        if reference_best is not None:
            target = reference_best[0]
            label = f"first epoch at `{reference.label}`'s best `{metric}` ({format_figure(target)})"
            reached = [first_reaching(epoch_series(run.epochs, metric), target, mode) for run in runs]
            rows.append([label, *map(_reached_text, reached)])
        rows.append(["duration", *map(_duration_text, runs)])
        intro = (
            f"Final figures from each run's `{METRICS_FILE}` (val: the last validation, test: the best "
            f"checkpoint), best epochs from `{EPOCH_METRICS_FILE}`; the first run is the reference."
        )
        blocks = ["## Comparison", intro, _table(["", *(_cell(f"`{run.label}`") for run in runs)], rows)]
        if self.out_dir is not None and any(run.epochs for run in runs):
            curves = {
                key: [(run.label, epoch_series(run.epochs, key), None) for run in runs]
                for key, _ in COMPARISON_FIGURES
            }
            save_curves(self.out_dir / PLOTS_DIR / COMPARISON_PLOT, curves, figsize=(11, 4))
            blocks.append(f"![{COMPARISON_CAPTION}]({PLOTS_DIR}/{COMPARISON_PLOT})")
        return blocks

    def variants_section(self, variants: Sequence[Variant]) -> list[str]:
        metric, mode = variants[0].runs[0].metric, variants[0].runs[0].mode
        header, rows, budget = variants_table(variants, metric, mode)
        intro = (
            f"Runs whose configuration differs only in `{SEED_KEY}` (or in output paths, loggers and the "
            "progress bar) are one variant. Every figure is taken within the same "
            f"budget of {budget} epochs (0 to {budget - 1}: the fewest any run reached); the first variant "
            "is the reference."
        )
        blocks = ["## Variants (seeds pooled)", intro, _table(header, rows)]
        if self.out_dir is not None:
            curves = {key: [variant.curve(key) for variant in variants] for key, _ in COMPARISON_FIGURES}
            save_curves(self.out_dir / PLOTS_DIR / VARIANTS_PLOT, curves, figsize=(12, 4.5), budget=budget)
            blocks.append(f"![{VARIANTS_CAPTION}]({PLOTS_DIR}/{VARIANTS_PLOT})")
        settings = [run_settings(variant.runs[0]) for variant in variants]
        keys = differing_keys(settings)
        if keys:
            rows = [
                [f"`{variant.label}`", *(_cell(values.get(key, "")) for key in keys)]
                for variant, values in zip(variants, settings, strict=True)
            ]
            source = "composed configs" if all(run.config for run in variants[0].runs) else "overrides"
            blocks.append(f"Settings that differ between the variants ({source}):")
            blocks.append(_table(["variant", *(f"`{key}`" for key in keys)], rows))
        header = ["run", "variant", "seed", "epochs", f"best `{metric}`", "last `val/map_50`"]
        header += ["test mAP@0.5 (best checkpoint)", "duration"]
        rows, commands = [], []
        for variant in variants:
            for run, seed in zip(variant.runs, variant.seeds, strict=True):
                figures = [_best_text(run, metric, mode), format_figure(_last_value(run, "val/map_50"))]
                figures += [format_figure(run.final.get("test/map_50")), _duration_text(run)]
                rows.append([f"`{run.label}`", f"`{variant.label}`", seed, str(len(run.epochs)), *figures])
                commands.append(run.command)
        blocks += ["Every run (all its epochs):", _table(header, rows), "Commands:", _fence("bash", commands)]
        return blocks

    def sweep_section(self, sweep: Sweep) -> list[str]:
        blocks = [
            f"## Sweep `{sweep.path.name}`",
            f"Command: `{sweep.command}`",
            f"Folder: `{_shown_path(sweep.path)}`, {len(sweep.runs)} jobs.",
        ]
        if not sweep.summary:
            command = f"python -m detr_lightning.tools.sweep_summary {_shown_path(sweep.path)}"
            return [*blocks, f"No `{SUMMARY_FILE}`: `{command}` writes it."]
        with_errors = any(row.get("error") for row in sweep.summary)
        columns = [c for c in sweep.summary[0] if c != "overrides" and (with_errors or c != "error")]
        rows = [[_summary_cell(column, row.get(column, "")) for column in columns] for row in sweep.summary]
        return [*blocks, f"Summary (`{SUMMARY_FILE}`, best first):", _table(columns, rows)]

    def run_section(self, run: Run) -> list[str]:
        facts = [["command", _cell(f"`{run.command}`")]]
        if run.choices:
            facts.append(["config groups", _cell(", ".join(f"{k}={v}" for k, v in run.choices.items()))])
        facts += [["started", run.started or "–"], ["duration", _duration_text(run)]]
        if run.status:
            facts.append(["status", run.status])
        facts.append(["folder", _cell(f"`{_shown_path(run.path)}`")])
        blocks = [f"## Run `{run.label}`", _table(["", ""], facts)]
        blocks += self.coco_section(run) + self.per_class_section(run) + self.epochs_section(run)
        if run.plots:
            blocks.append("### Plots")
            blocks += [
                f"![{PLOT_CAPTIONS.get(plot.name, plot.stem)}]({self.link(plot, run)})" for plot in run.plots
            ]
        return blocks

    def coco_section(self, run: Run) -> list[str]:
        heading = f"### COCO box figures (`{METRICS_FILE}`)"
        notes = SPLIT_NOTES.get(run.job_name, SPLIT_NOTES["train"])
        lines = []
        for split in SPLITS:
            figures = {key: run.final.get(f"{split}/{key}") for key in COCO_KEYS}
            if None not in figures.values():
                lines += [f"{split}: {notes[split]}", *coco_summary_lines(figures)]
        if not lines:
            return [heading, f"No `{METRICS_FILE}` figures: the run has not finished (or failed)."]
        return [heading, _fence("text", lines)]

    def per_class_section(self, run: Run) -> list[str]:
        splits = [split for split in SPLITS if any(k.startswith(f"{split}/ap/") for k in run.final)]
        prefixes = [f"{split}/ap/" for split in splits]
        names = dict.fromkeys(k[len(p) :] for p in prefixes for k in run.final if k.startswith(p))
        if not names:
            return []
        rows = [
            [_cell(name), *(format_figure(run.final.get(f"{split}/ap/{name}")) for split in splits)]
            for name in names
        ]
        return ["### AP per class", _table(["class", *(f"{split} AP@[.50:.95]" for split in splits)], rows)]

    def epochs_section(self, run: Run) -> list[str]:
        if not run.epochs:
            return []
        columns = [(key, header) for key, header in EPOCH_COLUMNS if any(row.get(key) for row in run.epochs)]
        numbered = [(epoch_number(row, index), row) for index, row in enumerate(run.epochs)]
        chosen: list[tuple[str, int, dict[str, str]]] = []
        best = best_of_epochs(run.epochs, run.metric, run.mode)
        if best is not None:
            epoch, row = next((epoch, row) for epoch, row in numbered if epoch == best[1])
            chosen.append((f"best `{run.metric}` ({run.mode})", epoch, row))
        chosen.append(("last", *numbered[-1]))
        rows = [
            [label, str(epoch), *(format_figure(to_float(row.get(key))) for key, _ in columns)]
            for label, epoch, row in chosen
        ]
        header = ["", "epoch", *(header for _, header in columns)]
        return [f"### Epochs (`{EPOCH_METRICS_FILE}`, {len(run.epochs)} rows)", _table(header, rows)]

    def link(self, plot: Path, run: Run) -> str:
        """The plot's link from the report: relative when inside the report's folder, else copied there."""
        if self.out_dir is None:
            return _shown_path(plot)
        if plot.resolve().is_relative_to(self.out_dir):
            return plot.resolve().relative_to(self.out_dir).as_posix()
        target_dir = self.out_dir / PLOTS_DIR
        if self.several_runs:
            target_dir = target_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", run.label)
        target_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, target_dir / plot.name)
        return (target_dir / plot.name).relative_to(self.out_dir).as_posix()


# ---------------------------------------------------------------------------------------------- document
def compose_document(
    existing: str | None, body: str, title: str | None, notes: str | None, default_title: str
) -> str:
    """The whole file: title, introduction and the generated ``body`` (markers included).

    - ``existing`` with the markers: everything outside them is kept (``title`` replaces the first
      ``# `` line, ``notes`` the text between it and the generated part);
    - ``existing`` without them: its text (first ``# `` line aside) becomes the introduction;
    - no ``existing``: ``# title``, ``notes`` if given, then the body.

    A ``notes`` text that starts with a ``# `` line brings its title (``title`` still wins).
    """
    if notes is not None:
        notes_title, notes_body = _split_title(notes)
        if notes_title is not None:
            title, notes = title or notes_title, notes_body
    head, tail = existing or "", "\n"
    begin = _BEGIN_PATTERN.search(head)
    end = head.find(END_MARKER, begin.end()) if begin else -1
    if begin and end >= 0:
        head, tail = head[: begin.start()], head[end + len(END_MARKER) :]
        if title is None and notes is None:
            return head + body + tail
    old_title, intro = _split_title(head)
    intro = (notes if notes is not None else intro).strip("\n")
    head = f"# {title or old_title or default_title}\n\n" + (f"{intro}\n\n" if intro.strip() else "")
    return head + body + tail


def _split_title(text: str) -> tuple[str | None, str]:
    lines = text.lstrip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        return lines[0][2:].strip(), "\n".join(lines[1:])
    return None, text


def build_report(
    directories: Sequence[Path],
    out: Path | None,
    title: str | None = None,
    notes: str | None = None,
    metric: str | None = None,
    mode: str | None = None,
    command: str = "python -m detr_lightning.tools.report",
    brief: bool = False,
) -> str:
    """The report's text (and the plots beside ``out``); ``out`` None: links relative to the working
    directory. What ``out`` holds outside the markers is kept."""
    sweeps, runs = collect(directories, metric, mode)
    if not runs:
        raise ValueError(f"no runs in {', '.join(map(str, directories))}")
    body = Renderer(out.parent if out is not None else None, brief).document_body(sweeps, runs, command)
    default_title = "Training report: " + (runs[0].label if len(runs) == 1 else f"{len(runs)} runs")
    existing = out.read_text() if out is not None and out.is_file() else None
    return compose_document(existing, body, title, notes, default_title)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m detr_lightning.tools.report RUN_DIR [RUN_DIR ...] [-o OUT.md]``."""
    parser = argparse.ArgumentParser(
        prog="python -m detr_lightning.tools.report",
        description="Write a markdown report of training runs (run folders and/or multirun sweep folders).",
    )
    add = parser.add_argument
    add("directories", nargs="+", type=Path, help="run folders (outputs/...), sweep folders")
    add("-o", "--output", help=f"markdown file, '-': stdout (default: <DIR>/{REPORT_FILE})")
    add("--title", help="the '# ' title (default: OUT's, else 'Training report: ...')")
    add("--notes", type=Path, help="a markdown file: the introduction, above the report")
    add("--metric", help="picks the best epoch (default: the run's optimized_metric)")
    add("--mode", choices=("max", "min"), help="its direction (default: the run's)")
    add("--brief", action="store_true", help="no section per run: only comparisons, summaries")
    args = parser.parse_args(argv)
    # The command that writes the report again, as the file says: --notes is a one-off (the introduction
    # stays in the file, outside the markers), so it is left out.
    arguments = _without_option(list(sys.argv[1:] if argv is None else argv), "--notes")
    command = " ".join(["python -m detr_lightning.tools.report", *map(shlex.quote, arguments)])
    if args.output is None and len(args.directories) > 1:
        parser.error(
            "several folders: say where the report goes with -o OUT.md (or -o - for standard output)"
        )
    out = Path(args.output or args.directories[0] / REPORT_FILE) if args.output != "-" else None
    try:
        notes = args.notes.read_text() if args.notes is not None else None
        text = build_report(
            args.directories, out, args.title, notes, args.metric, args.mode, command, args.brief
        )
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"Report written to {out}")


# ---------------------------------------------------------------------------------------------- helpers
def format_figure(value: float | None) -> str:
    """A COCO figure or loss in a report: 3 decimals; ``n/a`` for COCOeval's -1, ``–`` when absent."""
    if value is None or math.isnan(value):
        return "–"
    return "n/a" if value < 0 else f"{value:.3f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _fence(language: str, lines: Sequence[str]) -> str:
    return "\n".join([f"```{language}", *lines, "```"])


def _without_option(arguments: list[str], option: str) -> list[str]:
    """``arguments`` less ``option VALUE`` and ``option=VALUE``."""
    kept: list[str] = []
    value_next = False
    for argument in arguments:
        if not value_next and argument != option and not argument.startswith(f"{option}="):
            kept.append(argument)
        value_next = argument == option and not value_next
    return kept


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _summary_cell(column: str, value: str) -> str:
    number = to_float(value) if column.startswith("best ") or "/" in column else None
    return format_figure(number) if number is not None and value.strip() else _cell(value)


def _shown_path(path: Path) -> str:
    """The path relative to the working directory when it is below it, else as given."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    return resolved.relative_to(cwd).as_posix() if resolved.is_relative_to(cwd) else path.as_posix()


def _duration_text(run: Run) -> str:
    if run.duration_s is None:
        return "–"
    text = format_duration(run.duration_s)
    return text if run.duration_measured else f"about {text} (file times)"


def _best_text(run: Run, metric: str, mode: str) -> str:
    best = best_of_epochs(run.epochs, metric, mode)
    return "–" if best is None else f"{format_figure(best[0])} (epoch {best[1]})"


def _reached_text(epoch: int | None) -> str:
    return "not reached" if epoch is None else f"epoch {epoch}"


def _last_value(run: Run, key: str) -> float | None:
    """``key`` at the run's last epoch that has it."""
    values = epoch_values(run, key)
    return values[max(values)] if values else None


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"a.b.c": "value"}`` of a nested mapping (lists and scalars as their text; numbers as floats,
    so ``2`` from a command line equals ``2.0`` from a config file)."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        tree = float(tree)
    return {prefix.rstrip("."): str(tree)}


if __name__ == "__main__":
    main()
