"""Seeds pooled in reports: runs that differ only in ``seed`` are one *variant* of an A/B comparison.

Runs are pooled by their composed configuration (``.hydra/config.yaml``; else their overrides) less the
seed and `RESULT_NEUTRAL_KEYS`. A variant's curve is the per-epoch mean over its seeds. Variants are
compared over the same epoch budget, the fewest epochs any run reached (runs stopped by
``trainer.max_time`` reach slightly different counts); the first variant is the reference, and each
variant gets the epoch at which its mean curve first reaches the reference's figure at the end of the
budget ("the same mAP in fewer epochs").
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detr_lightning.runs import Run, epoch_series, first_reaching

SEED_KEY = "seed"
VARIANTS_PLOT = "variants.png"
VARIANTS_CAPTION = "Validation mAP and mAP@0.5 per epoch: mean over seeds (line) and the seeds' range (band)"
#: Configuration keys (dotted prefixes) that do not change what a run computes, left out when pooling.
RESULT_NEUTRAL_KEYS = ("seed", "data.seed", "paths", "logger", "callbacks.progress_bar", "ckpt_path")
#: A seed suffix of a run folder's name (``demo_plain_s42``, ``run-seed7``), dropped from variant labels.
_SEED_SUFFIX = re.compile(r"[_-](?:s|seed)\d+$")


def format_figure(value: float | None) -> str:
    """A COCO figure or loss in a report: 3 decimals; ``n/a`` for COCOeval's -1, ``–`` when absent."""
    if value is None or math.isnan(value):
        return "–"
    return "n/a" if value < 0 else f"{value:.3f}"


@dataclass
class Variant:
    """The runs of one configuration, one per seed."""

    label: str
    runs: list[Run]

    @property
    def seeds(self) -> list[str]:
        return [run_seed(run) for run in self.runs]

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


def epoch_values(run: Run, key: str) -> dict[int, float]:
    """``{epoch: value}`` of ``key`` in the run's ``metrics.csv`` rows (NaN and blanks left out)."""
    return dict(epoch_series(run.epochs, key))


def run_seed(run: Run) -> str:
    """The run's seed: its ``seed`` override, else its configuration's, else ``–``."""
    seed = run.override_values().get(SEED_KEY, run.config.get(SEED_KEY))
    return "–" if seed is None else str(seed)


def run_settings(run: Run) -> dict[str, str]:
    """The settings that make a variant: the flattened composed configuration (else the overrides),
    less the seed and `RESULT_NEUTRAL_KEYS`."""
    values = _flatten(run.config) if run.config else run.override_values()
    return {
        key: value
        for key, value in values.items()
        if not any(key == neutral or key.startswith(f"{neutral}.") for neutral in RESULT_NEUTRAL_KEYS)
    }


def variant_key(run: Run) -> tuple[tuple[str, str], ...]:
    """What must be equal for two runs to be seeds of one variant (see the module docstring)."""
    return tuple(sorted(run_settings(run).items()))


def group_by_seed(runs: Sequence[Run]) -> list[Variant]:
    """The runs pooled by `variant_key`, in the order of each variant's first run.

    A variant is labelled by its runs' folder names less a seed suffix (``demo_plain_s42`` and
    ``demo_plain_s43``: ``demo_plain``), or what those names share, or else its overrides.
    """
    pooled: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    for run in runs:
        pooled.setdefault(variant_key(run), []).append(run)
    variants = []
    for members in pooled.values():
        names = [_SEED_SUFFIX.sub("", run.label) for run in members]
        shared = names[0] if len(set(names)) == 1 else os.path.commonprefix(names).rstrip("_-/ ")
        overrides = {k: v for k, v in members[0].override_values().items() if k != SEED_KEY}
        label = shared or " ".join(f"{k}={v}" for k, v in overrides.items()) or "(no overrides)"
        variants.append(Variant(label, members))
    labels = [variant.label for variant in variants]
    for variant in variants:
        if labels.count(variant.label) > 1:
            variant.label = f"{variant.label} ({', '.join(run.label for run in variant.runs)})"
    return variants


def has_seed_groups(variants: Sequence[Variant]) -> bool:
    """Whether pooling means anything: some variant has several seeds."""
    return any(len(variant.runs) > 1 for variant in variants)


def common_budget(variants: Sequence[Variant]) -> int:
    """The epoch budget of the comparison: the fewest epochs any run reached."""
    return min(variant.epochs_reached() for variant in variants)


def first_epoch_at_least(curve: Sequence[float | None], target: float, mode: str = "max") -> int | None:
    """The first epoch (0-based) of a curve whose value reaches ``target`` (``mode`` min: falls to it),
    or None; epochs without a value are skipped."""
    return first_reaching(((e, v) for e, v in enumerate(curve) if v is not None), target, mode)


def variants_table(
    variants: Sequence[Variant], keys: Sequence[tuple[str, str]], metric: str, mode: str
) -> tuple[list[str], list[list[str]], int]:
    """Header, rows and epoch budget of the variants table.

    Per variant: its seeds; each ``keys`` figure at the last epoch of the budget (mean, then each seed);
    the mean over seeds of each seed's best ``metric`` within the budget; the first epoch at which the
    variant's mean ``metric`` curve reaches the reference's (first variant's) mean at the end of the
    budget, and whether that is within half the budget.
    """
    budget = common_budget(variants)
    last = budget - 1
    reference = variants[0].mean_curve(metric, budget)[last]
    header = ["variant", "seeds"]
    header += [f"`{key}` at epoch {last} (mean; per seed)" for key, _ in keys]
    header += [f"best `{metric}` within the budget (mean over seeds)"]
    header += [
        f"first epoch at `{variants[0].label}`'s `{metric}` at epoch {last} ({format_figure(reference)})"
    ]
    rows = []
    best = max if mode == "max" else min
    for variant in variants:
        row = [f"`{variant.label}`", ", ".join(variant.seeds)]
        for key, _ in keys:
            values = variant.values_at(key, last)
            per_seed = "; ".join(format_figure(value) for value in values)
            row.append(f"{format_figure(_mean(values))} ({per_seed})" if values else "–")
        within = [
            [v for epoch, v in epoch_values(run, metric).items() if epoch <= last] for run in variant.runs
        ]
        row.append(format_figure(_mean([best(values) for values in within if values])))
        reached = None
        if reference is not None:
            reached = first_epoch_at_least(variant.mean_curve(metric, budget), reference, mode)
        if reached is None:
            row.append("not reached")
        else:
            half = " (within half the budget)" if reached + 1 <= budget / 2 else ""
            row.append(f"epoch {reached}{half}")
        rows.append(row)
    return header, rows, budget


def variants_plot(
    variants: Sequence[Variant], keys: Sequence[tuple[str, str]], budget: int, target: Path
) -> None:
    """Write one panel per ``keys`` figure: each variant's mean curve with its seeds' min-max band, and
    the end of the common budget marked."""

    def draw(axis: Any, key: str) -> None:
        for variant in variants:
            epochs = range(variant.epochs_reached())
            mean = variant.mean_curve(key, len(epochs))
            points = [(epoch, value) for epoch, value in zip(epochs, mean, strict=True) if value is not None]
            if not points:
                continue
            (line,) = axis.plot(*zip(*points, strict=True), marker=".", label=variant.label)
            if len(variant.runs) > 1:
                spans = [variant.values_at(key, epoch) for epoch, _ in points]
                lows, highs = [min(values) for values in spans], [max(values) for values in spans]
                axis.fill_between(
                    [epoch for epoch, _ in points], lows, highs, color=line.get_color(), alpha=0.15
                )
        axis.axvline(budget - 1, color="grey", linestyle="--", linewidth=1)

    save_curves(keys, draw, target, figsize=(12, 4.5))


def save_curves(
    keys: Sequence[tuple[str, str]],
    draw: Callable[[Any, str], None],
    target: Path,
    figsize: tuple[float, float],
) -> None:
    """Write the PNG ``target``: one panel per ``(key, title)`` of ``keys``, over the epochs, its curves
    drawn by ``draw(axis, key)``."""
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    for axis, (key, title) in zip(figure.subplots(1, len(keys)), keys, strict=True):
        draw(axis, key)
        axis.set_title(f"{title} ({key})")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"a.b.c": "value"}`` of a nested mapping (lists and scalars as their text; numbers as floats,
    so ``2`` from a command line equals ``2.0`` from a config file)."""
    if isinstance(tree, dict):
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        tree = float(tree)
    return {prefix.rstrip("."): str(tree)}
