"""Markdown reports of training runs: ``python -m detr_lightning.tools.report RUN_DIR [...] [-o OUT.md]``.

Read only from the run folders (see `detr_lightning.runs`), per run: the command and config groups, when
it started and how long it took, the 12 pycocotools lines of ``metrics.json`` (val: the last validation;
test: the best checkpoint), AP per class, the best and last epochs of ``metrics.csv``, and the plots.
Several runs get a side-by-side table and a plot of their validation curves; a sweep folder stands for
its jobs plus its ``summary.csv``; runs that differ only in ``seed`` are pooled into variants
(`report_variants`). Plots outside the report's folder are copied into ``plots/`` beside it.

Writing into an existing file replaces only the text between the ``report:begin`` and ``report:end``
markers; a file without them keeps its text as the introduction.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    first_epoch_reaching,
    is_run_dir,
    is_sweep_dir,
    read_run,
    read_sweep_config,
)
from detr_lightning.tools.report_variants import (
    SEED_KEY,
    VARIANTS_CAPTION,
    VARIANTS_PLOT,
    Variant,
    epoch_values,
    format_figure,
    group_by_seed,
    has_seed_groups,
    run_settings,
    save_curves,
    variants_plot,
    variants_table,
)

REPORT_FILE = "report.md"
BEGIN_MARKER = (
    "<!-- report:begin (written by python -m detr_lightning.tools.report: the text up to report:end is "
    "replaced when it runs again) -->"
)
END_MARKER = "<!-- report:end -->"
_BEGIN_PATTERN = re.compile(r"<!-- report:begin\b.*?-->", re.DOTALL)
#: The 12 figures of COCOeval.summarize(), in its order (keys of metrics.json after ``<split>/``).
COCO_KEYS = (
    "map map_50 map_75 map_small map_medium map_large mar_1 mar_10 mar_100 mar_small mar_medium mar_large"
).split()
COMPARISON_PLOT = "comparison.png"
#: The validation curves plotted for several runs: (metrics.csv column, title).
COMPARISON_FIGURES = [("val/map", "validation mAP"), ("val/map_50", "validation mAP@0.5")]
COMPARISON_CAPTION = "Validation mAP and mAP@0.5 per epoch, every run"
#: The final figures of the comparison table, per split: (key after ``<split>/``, label).
MAIN_FIGURES = [("map", "mAP"), ("map_50", "mAP@0.5"), ("map_75", "mAP@0.75"), ("mar_100", "AR@100")]
#: Columns of the epochs table: (metrics.csv column, header).
EPOCH_COLUMNS = [
    ("train/loss", "train loss"),
    ("val/loss", "val loss"),
    ("val/map", "val mAP"),
    ("val/map_50", "val mAP@0.5"),
    ("val/map_75", "val mAP@0.75"),
    ("val/mar_100", "val AR@100"),
]
PLOT_CAPTIONS = {
    METRICS_PLOT: "Losses, validation COCO figures and learning rate per epoch",
    PREDICTIONS_PLOT: "Validation images: predictions (red, dashed, with scores) and ground truth (green)",
}
SPLIT_NOTES = {
    "train": {"val": "the last validation epoch", "test": "the best checkpoint on the test split"},
    "eval": {"val": "the evaluated checkpoint", "test": "the evaluated checkpoint"},
}


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
    for directory in directories:
        if not directory.is_dir():
            raise ValueError(
                f"{directory} is not a folder: pass a run folder (outputs/...) or a sweep folder"
            )
        if is_sweep_dir(directory):
            sweeps.append(read_sweep(directory, metric, mode))
            runs.extend(sweeps[-1].runs)
        elif is_run_dir(directory):
            runs.append(read_run(directory, metric=metric, mode=mode))
        else:
            raise ValueError(
                f"{directory} is neither a run folder (with .hydra/, {METRICS_FILE} or "
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


# -------------------------------------------------------------------------------------------- rendering
def coco_lines(figures: dict[str, float], split: str) -> list[str] | None:
    """The 12 pycocotools summary lines of ``split`` from ``metrics.json`` figures; None when incomplete."""
    values = {key: figures.get(f"{split}/{key}") for key in COCO_KEYS}
    if any(value is None for value in values.values()):
        return None
    return coco_summary_lines(values)


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
        if has_seed_groups(variants):
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

    # ------------------------------------------------------------------ sections
    def comparison(self, runs: Sequence[Run]) -> list[str]:
        values = [run.override_values() for run in runs]
        rows = [[f"`{key}`", *(_cell(v.get(key, "")) for v in values)] for key in differing_keys(values)]
        if any(run.status for run in runs):
            rows.append(["status", *(run.status or "" for run in runs)])
        rows.append(["epochs", *(str(len(run.epochs)) for run in runs)])
        for metric in sorted({run.metric for run in runs}):
            rows.append(
                [f"best `{metric}` over the epochs", *(_best_text(run, metric, run.mode) for run in runs)]
            )
        for split in ("val", "test"):
            if any(f"{split}/map" in run.final for run in runs):
                for key, label in MAIN_FIGURES:
                    name = f"{split}/{key}"
                    rows.append(
                        [f"{split} {label} (`{name}`)", *(format_figure(run.final.get(name)) for run in runs)]
                    )
        reference = runs[0]
        reference_best = best_of_epochs(reference.epochs, reference.metric, reference.mode)
        if reference_best is not None:
            target = reference_best[0]
            reached = [
                first_epoch_reaching(run.epochs, reference.metric, target, reference.mode) for run in runs
            ]
            label = (
                f"first epoch at `{reference.label}`'s best `{reference.metric}` ({format_figure(target)})"
            )
            rows.append([label, *("not reached" if epoch is None else f"epoch {epoch}" for epoch in reached)])
        rows.append(["duration", *(_duration_text(run) for run in runs)])
        intro = (
            f"Final figures from each run's `{METRICS_FILE}` (val: the last validation, test: the best "
            f"checkpoint), best epochs from `{EPOCH_METRICS_FILE}`; the first run is the reference."
        )
        header = ["", *(_cell(f"`{run.label}`") for run in runs)]
        return ["## Comparison", intro, _table(header, rows), *self.comparison_plot(runs)]

    def comparison_plot(self, runs: Sequence[Run]) -> list[str]:
        """``plots/comparison.png`` beside the report, one line per run, and its link (nothing without an
        output folder or epoch figures)."""
        if self.out_dir is None or not any(run.epochs for run in runs):
            return []

        def draw(axis: Any, key: str) -> None:
            for run in runs:
                points = epoch_series(run.epochs, key)
                if points:
                    axis.plot(*zip(*points, strict=True), marker=".", label=run.label)

        save_curves(COMPARISON_FIGURES, draw, self.out_dir / PLOTS_DIR / COMPARISON_PLOT, figsize=(11, 4))
        return [f"![{COMPARISON_CAPTION}]({PLOTS_DIR}/{COMPARISON_PLOT})"]

    def variants_section(self, variants: Sequence[Variant]) -> list[str]:
        reference = variants[0].runs[0]
        metric, mode = reference.metric, reference.mode
        header, rows, budget = variants_table(variants, COMPARISON_FIGURES, metric, mode)
        intro = (
            f"Runs whose configuration differs only in `{SEED_KEY}` (or in output paths, loggers and the "
            "progress bar) are one variant. Every figure is taken within the same "
            f"budget of {budget} epochs (0 to {budget - 1}: the fewest any run reached); the first variant "
            "is the reference."
        )
        blocks = ["## Variants (seeds pooled)", intro, _table(header, rows)]
        if self.out_dir is not None:
            variants_plot(variants, COMPARISON_FIGURES, budget, self.out_dir / PLOTS_DIR / VARIANTS_PLOT)
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
        rows = []
        for variant in variants:
            for run, seed in zip(variant.runs, variant.seeds, strict=True):
                map_50 = epoch_values(run, "val/map_50")
                rows.append(
                    [
                        f"`{run.label}`",
                        f"`{variant.label}`",
                        seed,
                        str(len(run.epochs)),
                        _best_text(run, metric, mode),
                        format_figure(map_50[max(map_50)] if map_50 else None),
                        format_figure(run.final.get("test/map_50")),
                        _duration_text(run),
                    ]
                )
        header = ["run", "variant", "seed", "epochs", f"best `{metric}`", "last `val/map_50`"]
        header += ["test mAP@0.5 (best checkpoint)", "duration"]
        commands = [run.command for variant in variants for run in variant.runs]
        return [
            *blocks,
            "Every run (all its epochs):",
            _table(header, rows),
            "Commands:",
            _fence("bash", commands),
        ]

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
        for split in ("val", "test"):
            summary = coco_lines(run.final, split)
            if summary is not None:
                lines += [f"{split}: {notes[split]}", *summary]
        if not lines:
            return [heading, f"No `{METRICS_FILE}` figures: the run has not finished (or failed)."]
        return [heading, _fence("text", lines)]

    def per_class_section(self, run: Run) -> list[str]:
        splits = [split for split in ("val", "test") if any(k.startswith(f"{split}/ap/") for k in run.final)]
        prefixes = [f"{split}/ap/" for split in splits]
        names = dict.fromkeys(k[len(p) :] for p in prefixes for k in run.final if k.startswith(p))
        if not names:
            return []
        rows = [
            [_cell(name), *(format_figure(run.final.get(f"{split}/ap/{name}")) for split in splits)]
            for name in names
        ]
        header = ["class", *(f"{split} AP@[.50:.95]" for split in splits)]
        return ["### AP per class", _table(header, rows)]

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
        try:
            return plot.resolve().relative_to(self.out_dir).as_posix()
        except ValueError:
            pass
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
    return _head(title or old_title or default_title, notes if notes is not None else intro) + body + tail


def _split_title(text: str) -> tuple[str | None, str]:
    lines = text.lstrip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        return lines[0][2:].strip(), "\n".join(lines[1:])
    return None, text


def _head(title: str, intro: str) -> str:
    intro = intro.strip("\n")
    return f"# {title}\n\n" + (f"{intro}\n\n" if intro.strip() else "")


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
    parser.add_argument("directories", nargs="+", type=Path, help="run folders (outputs/...), sweep folders")
    parser.add_argument("-o", "--output", help=f"markdown file, '-': stdout (default: <DIR>/{REPORT_FILE})")
    parser.add_argument("--title", help="the '# ' title (default: OUT's, else 'Training report: ...')")
    parser.add_argument("--notes", type=Path, help="a markdown file: the introduction, above the report")
    parser.add_argument("--metric", help="picks the best epoch (default: the run's optimized_metric)")
    parser.add_argument("--mode", choices=("max", "min"), help="its direction (default: the run's)")
    parser.add_argument(
        "--brief", action="store_true", help="no section per run: only comparisons, summaries"
    )
    args = parser.parse_args(argv)
    # The command that writes the report again, as the file says: --notes is a one-off (the introduction
    # stays in the file, outside the markers), so it is left out.
    arguments = _without_option(list(sys.argv[1:] if argv is None else argv), "--notes")
    command = " ".join(["python -m detr_lightning.tools.report", *(shlex.quote(a) for a in arguments)])
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
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _duration_text(run: Run) -> str:
    if run.duration_s is None:
        return "–"
    text = format_duration(run.duration_s)
    return text if run.duration_measured else f"about {text} (file times)"


def _best_text(run: Run, metric: str, mode: str) -> str:
    best = best_of_epochs(run.epochs, metric, mode)
    return "–" if best is None else f"{format_figure(best[0])} (epoch {best[1]})"


if __name__ == "__main__":
    main()
