"""Training plots in the run directory: ``plots/metrics.png`` (the curves of every epoch) and
``plots/val_predictions.png`` (validation images with boxes), drawn off-screen with matplotlib's Agg.
`plot_metrics` and `plot_predictions` work without a Trainer, e.g. on the rows of a run's ``metrics.csv``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from detr_lightning.callbacks.epoch_csv import EpochMetricsCSV, epoch_row
from detr_lightning.callbacks.val_samples import ValidationImagesCallback, ValidationSample, box_captions
from detr_lightning.files import atomic_writer
from detr_lightning.runs import METRICS_PLOT, PLOTS_DIR, PREDICTIONS_PLOT, epoch_number, epoch_series

WANDB_KEYS = {METRICS_PLOT: "plots/metrics", PREDICTIONS_PLOT: "plots/val_predictions"}
#: Loss panels of ``metrics.png``: (name after ``train/``/``val/``, panel title).
LOSS_PANELS = [
    ("loss", "total loss"),
    ("loss_ce", "classification (loss_ce)"),
    ("loss_bbox", "box L1 (loss_bbox)"),
    ("loss_giou", "GIoU (loss_giou)"),
]
#: Curves of the COCO panel: (metrics.csv column, label).
COCO_CURVES = [
    ("val/map", "mAP"),
    ("val/map_50", "mAP@0.5"),
    ("val/map_75", "mAP@0.75"),
    ("val/mar_100", "AR@100"),
]
GROUND_TRUTH_COLOR = "#2ca02c"
PREDICTION_COLOR = "#d62728"
MAX_DRAWN_PREDICTIONS = 30  # per image, the highest scores: a low threshold stays legible
CELL_INCHES = 3.4  # the size of an image's cell in the grid

#: One image of `plot_predictions`: its pixels, predictions (already thresholded) and ground truth.
PredictionPanel = ValidationSample


class TrainingPlots(ValidationImagesCallback):
    """Keep ``plots/metrics.png`` and ``plots/val_predictions.png`` up to date in the run directory.

    ``metrics.png`` (``metrics``) is redrawn after every training epoch from the figures of ``metrics.csv``;
    the history is part of the checkpoint, so a resumed run plots its earlier epochs too.
    ``val_predictions.png`` (``predictions``; needs the project's datamodule) is drawn after every
    validation epoch: ``num_images`` images, their predictions scoring at least ``score_threshold``. Both go
    to ``output_dir`` (default ``<trainer.default_root_dir>/plots``) at ``dpi``, and with a `WandbLogger`
    and ``log_to_wandb`` to W&B under `WANDB_KEYS`. Global rank 0 draws and logs; a figure that cannot be
    drawn or logged is a warning, never a failure.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        metrics: bool = True,
        predictions: bool = True,
        num_images: int = 8,
        score_threshold: float = 0.5,
        log_to_wandb: bool = True,
        dpi: int = 100,
    ) -> None:
        super().__init__(num_images, score_threshold)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.metrics = metrics
        self.predictions = predictions
        self.log_to_wandb = log_to_wandb
        self.dpi = dpi
        self.rows: list[dict[str, Any]] = []  # an `epoch_row` per finished training epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.metrics or trainer.sanity_checking or not trainer.is_global_zero:
            return
        row = epoch_row(trainer)
        # Resumed from a checkpoint without this callback's rows: those EpochMetricsCSV restored fill them in.
        csv_rows = next((c.rows for c in trainer.callbacks if isinstance(c, EpochMetricsCSV)), [])
        by_epoch = {epoch_number(r, -1): r for r in csv_rows if epoch_number(r, -1) < row["epoch"]}
        by_epoch.update({epoch_number(r, -1): r for r in [*self.rows, row]})
        self.rows = [by_epoch[epoch] for epoch in sorted(by_epoch)]
        self._draw(trainer, METRICS_PLOT, lambda path: plot_metrics(self.rows, path, dpi=self.dpi))

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))

    def choose_images(self, trainer: Trainer) -> list[int]:
        if not self.predictions:
            return []
        try:
            return super().choose_images(trainer)
        except Exception as error:
            rank_zero_warn(
                f"TrainingPlots: no {PREDICTIONS_PLOT}: the validation images are unknown "
                f"({_describe(error)}). It needs the project's datamodule (coco_gt)."
            )
            return []

    def show(self, trainer: Trainer, samples: list[ValidationSample], names: dict[int, str]) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        title = f"Validation images, {f'epoch {trainer.current_epoch}' if fitting else str(trainer.state.fn)}"

        def plot(path: Path) -> Path:
            return plot_predictions(samples, path, names, self.score_threshold, title=title, dpi=self.dpi)

        self._draw(trainer, PREDICTIONS_PLOT, plot)

    def _draw(self, trainer: Trainer, name: str, plot: Callable[[Path], Path]) -> None:
        """Draw one figure into the plots folder and log it to W&B; any error becomes a warning."""
        try:
            path = plot((self.output_dir or Path(trainer.default_root_dir) / PLOTS_DIR) / name)
        except Exception as error:
            rank_zero_warn(f"TrainingPlots: {name} was not drawn ({_describe(error)}); training goes on.")
            return
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not self.log_to_wandb or not wandb_loggers:
            return
        try:
            import wandb

            image = wandb.Image(str(path), caption=f"epoch {trainer.current_epoch}")
            for logger in wandb_loggers:
                logger.log_metrics({WANDB_KEYS[name]: image}, step=trainer.global_step)
        except Exception as error:
            rank_zero_warn(f"TrainingPlots: {name} was not logged to W&B ({_describe(error)}).")


def plot_metrics(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, dpi: int = 100) -> Path:
    """Draw the per-epoch curves of ``rows`` into the PNG file ``path`` (written atomically); returns it.

    ``rows``: one mapping per epoch with ``epoch`` and any of ``train/<loss>``, ``val/<loss>`` (see
    `LOSS_PANELS`), the `COCO_CURVES` and ``lr/<group>``, as numbers or text (``metrics.csv``). Blanks, NaN
    and COCOeval's -1 are left out; panels without any value say so.
    """
    from matplotlib.figure import Figure

    def plot(axis: Any, key: str, undefined_below_zero: bool = False, **style: Any) -> None:
        points = [
            (epoch, value)
            for epoch, value in epoch_series(rows, key)
            if math.isfinite(value) and not (undefined_below_zero and value < 0)
        ]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", markersize=3, **style)

    figure = Figure(figsize=(15, 8.5), layout="constrained")
    axes = figure.subplots(2, 3).reshape(-1)
    for axis, (name, panel_title) in zip(axes, LOSS_PANELS, strict=False):
        for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
            plot(axis, f"{split}/{name}", color=color, label=split)
        _finish_axis(axis, panel_title, "loss")
    coco_axis, lr_axis = axes[len(LOSS_PANELS)], axes[len(LOSS_PANELS) + 1]
    for key, label in COCO_CURVES:
        plot(coco_axis, key, undefined_below_zero=True, label=label)
    _finish_axis(coco_axis, "validation COCO box figures", "value")
    if coco_axis.lines:
        coco_axis.set_ylim(bottom=0)
    for key in dict.fromkeys(key for row in rows for key in row if key.startswith("lr/")):
        plot(lr_axis, key, label=key.removeprefix("lr/"))
    if lr_axis.lines and all(y > 0 for line in lr_axis.lines for y in line.get_ydata()):
        lr_axis.set_yscale("log")
    _finish_axis(lr_axis, "learning rate", "lr")
    figure.suptitle(f"Training curves, {len(rows)} epoch{'s' * (len(rows) != 1)}")
    return _save(figure, path, dpi)


def plot_predictions(
    panels: Sequence[PredictionPanel],
    path: str | os.PathLike,
    class_names: Mapping[int, str],
    score_threshold: float,
    title: str = "Validation images",
    dpi: int = 100,
) -> Path:
    """Draw images with their predicted (red, dashed, ``name score``) and ground-truth (green) boxes into a
    grid of up to 4 columns, with a legend, into the PNG file ``path`` (written atomically); returns it.

    At most `MAX_DRAWN_PREDICTIONS` predictions per image are drawn, the highest scores first.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from detr_lightning.viz import draw_boxes

    columns = max(1, min(4, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(CELL_INCHES * columns, CELL_INCHES * rows + 0.9), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).reshape(-1)
    for axis in axes:
        axis.set_axis_off()
    for axis, panel in zip(axes, panels, strict=False):
        # Enlarged small images keep their pixels (smoother is blurrier and a bigger file); reduced large
        # ones are antialiased.
        enlarged = max(panel.pixels.shape[:2]) <= CELL_INCHES * dpi
        axis.imshow(panel.pixels, interpolation="nearest" if enlarged else "antialiased")
        truth = panel.ground_truth
        captions = box_captions(truth, class_names)
        draw_boxes(axis, truth["boxes"], GROUND_TRUTH_COLOR, captions, linewidth=1.6, caption_at="below")
        scores = panel.predictions["scores"]
        order = scores.argsort(descending=True, stable=True)[:MAX_DRAWN_PREDICTIONS]
        shown = {key: panel.predictions[key][order] for key in ("boxes", "scores", "labels")}
        captions = box_captions(shown, class_names)
        draw_boxes(axis, shown["boxes"], PREDICTION_COLOR, captions, linewidth=1.2, linestyle="--")
        drawn = f"{len(order)} of {len(scores)}" if len(order) < len(scores) else str(len(scores))
        axis.set_title(f"image {panel.image_id}: {drawn} predicted, {len(truth['labels'])} true", fontsize=8)
    if not panels:
        axes[0].text(0.5, 0.5, "no validation images", ha="center", va="center")
    prediction = f"prediction (score ≥ {score_threshold:g}), with class and score"
    handles = [
        Line2D([], [], color=GROUND_TRUTH_COLOR, linewidth=1.6, label="ground truth"),
        Line2D([], [], color=PREDICTION_COLOR, linewidth=1.2, linestyle="--", label=prediction),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    figure.suptitle(title)
    return _save(figure, path, dpi)


def _finish_axis(axis: Any, title: str, ylabel: str) -> None:
    axis.set_title(title, fontsize=10)
    axis.set(xlabel="epoch", ylabel=ylabel)
    axis.grid(True, alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=8)
        axis.xaxis.get_major_locator().set_params(integer=True)
    else:
        axis.text(
            0.5, 0.5, "not logged yet", ha="center", va="center", transform=axis.transAxes, color="gray"
        )


def _save(figure: Any, path: str | os.PathLike, dpi: int) -> Path:
    """Write the figure as PNG through a temporary file and a rename (readers never see half a file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # off-screen, whatever pyplot's backend is
    with atomic_writer(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return Path(path)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
