"""Training plots in the run directory: ``plots/metrics.png`` (the curves of every epoch) and
``plots/val_predictions.png`` (validation images with boxes), drawn off-screen with matplotlib's Agg.

`plot_metrics` and `plot_predictions` work without a Trainer, e.g. on the rows of a run's ``metrics.csv``
(`detr_lightning.runs.read_epoch_rows`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from detr_lightning.callbacks.epoch_csv import EpochMetricsCSV
from detr_lightning.callbacks.val_samples import ValidationSample, ValidationSamples, labels_of
from detr_lightning.callbacks.wandb_media import wandb_class_labels
from detr_lightning.files import atomic_writer, to_float
from detr_lightning.runs import METRICS_PLOT, PLOTS_DIR, PREDICTIONS_PLOT

#: W&B keys of the two figures.
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
#: At most this many predictions are drawn per image (the highest scores), so a low threshold stays legible.
MAX_DRAWN_PREDICTIONS = 30
CELL_INCHES = 3.4  # the size of an image's cell in the grid


class TrainingPlots(lightning.Callback):
    """Keep ``plots/metrics.png`` and ``plots/val_predictions.png`` up to date in the run directory.

    ``metrics.png`` is drawn at the end of every training epoch (after that epoch's validation) from the
    epoch figures of ``trainer.callback_metrics``, the same numbers as ``metrics.csv``. The history is part
    of the checkpoint, so a resumed run plots its earlier epochs too (for a checkpoint written without this
    callback, the `EpochMetricsCSV` rows it restored fill them in). ``val_predictions.png`` is drawn after
    every validation epoch (sanity check excluded), also in a stand-alone ``trainer.validate``.

    With a `WandbLogger`, both figures are also logged as ``wandb.Image`` under ``plots/metrics`` and
    ``plots/val_predictions``. Global rank 0 draws and logs; the other ranks only send it their detections
    of the chosen images. A figure that cannot be drawn or logged is a warning, never a failed run.

    Args:
        output_dir: folder of the PNG files; ``<trainer.default_root_dir>/plots`` when ``None``.
        metrics: draw ``metrics.png``.
        predictions: draw ``val_predictions.png`` (needs the project's datamodule: ``coco_gt``,
            ``dataset``, ``class_names``, ``label_to_category_id``).
        num_images: validation images in the grid.
        score_threshold: predictions scoring below it are not drawn.
        log_to_wandb: also log the figures to W&B when a `WandbLogger` is in use.
        dpi: resolution of the PNG files.
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
        super().__init__()
        if num_images < 0 or not 0.0 <= score_threshold <= 1.0:
            raise ValueError(
                f"TrainingPlots(num_images={num_images}, score_threshold={score_threshold}): "
                "num_images must be >= 0 and score_threshold in [0, 1]"
            )
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.metrics = metrics
        self.predictions = predictions
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.log_to_wandb = log_to_wandb
        self.dpi = dpi
        #: One dict per finished training epoch (``epoch``, ``step``, ``lr/<group>`` and the epoch figures).
        self.rows: list[dict[str, Any]] = []
        self._samples = ValidationSamples(num_images, score_threshold)  # the images of the grid

    @property
    def _image_ids(self) -> list[int] | None:
        """The images of the grid (None until the first validation)."""
        return self._samples.image_ids

    @property
    def _epoch_detections(self) -> dict[int, dict[str, Tensor]]:
        """This rank's detections of those images in the running validation epoch."""
        return self._samples.detections

    def plots_dir(self, trainer: lightning.Trainer) -> Path:
        """Where the PNG files go."""
        return self.output_dir or Path(trainer.default_root_dir) / PLOTS_DIR

    # ------------------------------------------------------------------ metrics.png
    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if not self.metrics or trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = int(trainer.current_epoch)
        row: dict[str, Any] = {"epoch": epoch, "step": int(trainer.global_step)}
        for index, group in enumerate(trainer.optimizers[0].param_groups if trainer.optimizers else []):
            row[f"lr/{group.get('name', index)}"] = group["lr"]
        row.update(EpochMetricsCSV.epoch_figures(trainer.callback_metrics))
        self._fill_in_earlier_epochs(trainer, epoch)
        self.rows = [r for r in self.rows if _epoch_of(r) != epoch] + [row]
        self._draw(trainer, METRICS_PLOT, lambda path: plot_metrics(self.rows, path, dpi=self.dpi))

    def _fill_in_earlier_epochs(self, trainer: lightning.Trainer, epoch: int) -> None:
        """Epochs before ``epoch`` that this history lacks, from an `EpochMetricsCSV` of the trainer."""
        known = {_epoch_of(row) for row in self.rows}
        for callback in trainer.callbacks:
            if isinstance(callback, EpochMetricsCSV):
                earlier = [r for r in callback.rows if _epoch_of(r) not in known and _epoch_of(r) < epoch]
                if earlier:
                    self.rows = sorted([*self.rows, *earlier], key=_epoch_of)
                return

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))

    # ------------------------------------------------------------------ val_predictions.png
    def on_validation_epoch_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self._samples.start_epoch()
        if self._samples.image_ids is None and self.predictions and not trainer.sanity_checking:
            try:
                self._samples.choose(trainer.datamodule)
            except Exception as error:
                self._samples.image_ids = []
                rank_zero_warn(
                    f"TrainingPlots: no {PREDICTIONS_PLOT}: the validation images are unknown "
                    f"({_describe(error)}). It needs the project's datamodule (coco_gt)."
                )

    def on_validation_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._samples.collect(outputs)

    def on_validation_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        if trainer.sanity_checking or not self._samples.image_ids:
            return
        detections = self._samples.gather(trainer)  # a collective: every rank
        if trainer.is_global_zero and detections:
            self._draw(
                trainer, PREDICTIONS_PLOT, lambda path: self._plot_predictions(trainer, detections, path)
            )

    def _plot_predictions(
        self, trainer: lightning.Trainer, detections: Mapping[int, Mapping[str, Tensor]], path: Path
    ) -> Path:
        samples = self._samples.samples(trainer.datamodule, detections)
        when = (
            f"epoch {trainer.current_epoch}"
            if trainer.state.fn == TrainerFn.FITTING
            else str(trainer.state.fn)
        )
        return plot_predictions(
            samples,
            path,
            class_names=wandb_class_labels(trainer.datamodule.class_names, labels_of(samples)),
            score_threshold=self.score_threshold,
            title=f"Validation images, {when}",
            dpi=self.dpi,
        )

    # ------------------------------------------------------------------ drawing and logging (rank 0)
    def _draw(self, trainer: lightning.Trainer, name: str, plot: Any) -> None:
        """Draw one figure into the plots folder and log it to W&B; any error becomes a warning."""
        try:
            path = plot(self.plots_dir(trainer) / name)
        except Exception as error:
            rank_zero_warn(f"TrainingPlots: {name} was not drawn ({_describe(error)}); training goes on.")
            return
        if not self.log_to_wandb:
            return
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb_loggers:
            return
        try:
            import wandb

            caption = f"epoch {trainer.current_epoch}"
            for logger in wandb_loggers:
                logger.log_metrics(
                    {WANDB_KEYS[name]: wandb.Image(str(path), caption=caption)}, step=trainer.global_step
                )
        except Exception as error:
            rank_zero_warn(f"TrainingPlots: {name} was not logged to W&B ({_describe(error)}).")


# ---------------------------------------------------------------------- plotting (plain functions)
def plot_metrics(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str | None = None, dpi: int = 100
) -> Path:
    """Draw the per-epoch curves of ``rows`` into the PNG file ``path`` (written atomically).

    Args:
        rows: one mapping per epoch with ``epoch`` and any of ``train/<loss>``, ``val/<loss>`` (see
            `LOSS_PANELS`), ``val/map``, ``val/map_50``, ``val/map_75``, ``val/mar_100`` and ``lr/<group>``;
            numbers or their text (``metrics.csv``); blanks, NaN and COCOeval's -1 are left out.
        path: the PNG file.
        title: the figure's title; says the number of epochs when ``None``.

    Returns:
        ``path``. Panels without any value say so rather than stay blank.
    """
    from matplotlib.figure import Figure

    epochs = [_number(row.get("epoch")) for row in rows]
    epochs = [index if epoch is None else epoch for index, epoch in enumerate(epochs)]

    def series(key: str, undefined_below_zero: bool = False) -> tuple[list[float], list[float]]:
        points = [(epoch, _number(row.get(key))) for epoch, row in zip(epochs, rows, strict=True)]
        kept = [(x, y) for x, y in points if y is not None and not (undefined_below_zero and y < 0)]
        return [x for x, _ in kept], [y for _, y in kept]

    figure = Figure(figsize=(15, 8.5), layout="constrained")
    axes = figure.subplots(2, 3).reshape(-1)
    for axis, (name, panel_title) in zip(axes, LOSS_PANELS, strict=False):
        for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
            xs, ys = series(f"{split}/{name}")
            if xs:
                axis.plot(xs, ys, marker="o", markersize=3, color=color, label=split)
        _finish_axis(axis, panel_title, "loss")
    coco_axis = axes[len(LOSS_PANELS)]
    for key, label in COCO_CURVES:
        xs, ys = series(key, undefined_below_zero=True)
        if xs:
            coco_axis.plot(xs, ys, marker="o", markersize=3, label=label)
    _finish_axis(coco_axis, "validation COCO box figures", "value")
    if coco_axis.lines:
        coco_axis.set_ylim(bottom=0)
    lr_axis = axes[len(LOSS_PANELS) + 1]
    lr_keys = [key for key in _columns(rows) if key.startswith("lr/")]
    for key in lr_keys:
        xs, ys = series(key)
        if xs:
            lr_axis.plot(xs, ys, marker="o", markersize=3, label=key.removeprefix("lr/"))
    if lr_axis.lines and all(y > 0 for line in lr_axis.lines for y in line.get_ydata()):
        lr_axis.set_yscale("log")
    _finish_axis(lr_axis, "learning rate", "lr")
    figure.suptitle(title or f"Training curves, {len(rows)} epoch{'s' * (len(rows) != 1)}")
    return _save(figure, path, dpi)


#: One image of `plot_predictions`: its pixels, predictions (already thresholded) and ground truth.
PredictionPanel = ValidationSample


def plot_predictions(
    panels: Sequence[PredictionPanel],
    path: str | os.PathLike,
    class_names: Mapping[int, str],
    score_threshold: float,
    title: str = "Validation images",
    columns: int = 4,
    dpi: int = 100,
) -> Path:
    """Draw images with their predicted (red, dashed, ``name score``) and ground-truth (green) boxes into a
    grid, with a legend, into the PNG file ``path`` (written atomically); returns ``path``.

    At most `MAX_DRAWN_PREDICTIONS` predictions per image are drawn, the highest scores first.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from detr_lightning.viz import draw_boxes

    count = max(len(panels), 1)
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(CELL_INCHES * columns, CELL_INCHES * rows + 0.9), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).reshape(-1)
    for axis in axes:
        axis.set_axis_off()
    names = {int(label): str(name) for label, name in class_names.items()}
    for axis, panel in zip(axes, panels, strict=False):
        # Enlarged small images keep their pixels (smoother is blurrier and a bigger file); reduced large
        # ones are antialiased.
        enlarged = max(panel.pixels.shape[:2]) <= CELL_INCHES * dpi
        axis.imshow(panel.pixels, interpolation="nearest" if enlarged else "antialiased")
        truth_labels = panel.ground_truth["labels"].tolist()
        crowd = panel.ground_truth.get("iscrowd")
        crowd = crowd.tolist() if crowd is not None else [0] * len(truth_labels)
        truth_captions = [
            names.get(int(label), f"label {label}") + (" (crowd)" if is_crowd else "")
            for label, is_crowd in zip(truth_labels, crowd, strict=True)
        ]
        draw_boxes(
            axis,
            panel.ground_truth["boxes"],
            GROUND_TRUTH_COLOR,
            truth_captions,
            linewidth=1.6,
            caption_at="below",
        )
        scores = panel.predictions["scores"].tolist()
        order = sorted(range(len(scores)), key=lambda index: -scores[index])[:MAX_DRAWN_PREDICTIONS]
        boxes, labels = panel.predictions["boxes"].tolist(), panel.predictions["labels"].tolist()
        draw_boxes(
            axis,
            [boxes[index] for index in order],
            PREDICTION_COLOR,
            [
                f"{names.get(int(labels[index]), f'label {labels[index]}')} {scores[index]:.2f}"
                for index in order
            ],
            linewidth=1.2,
            linestyle="--",
            caption_at="above",
        )
        drawn = f"{len(order)} of {len(scores)}" if len(order) < len(scores) else str(len(scores))
        axis.set_title(f"image {panel.image_id}: {drawn} predicted, {len(truth_labels)} true", fontsize=8)
    if not panels:
        axes[0].text(0.5, 0.5, "no validation images", ha="center", va="center")
    handles = [
        Line2D([], [], color=GROUND_TRUTH_COLOR, linewidth=1.6, label="ground truth"),
        Line2D(
            [],
            [],
            color=PREDICTION_COLOR,
            linewidth=1.2,
            linestyle="--",
            label=f"prediction (score ≥ {score_threshold:g}), with class and score",
        ),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    figure.suptitle(title)
    return _save(figure, path, dpi)


# ---------------------------------------------------------------------- helpers
def _finish_axis(axis: Any, title: str, ylabel: str) -> None:
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
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


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    return columns


def _number(value: Any) -> float | None:
    """A finite float of a figure or its text; None for blanks, NaN and what is not a number."""
    number = to_float(value)
    return number if number is not None and math.isfinite(number) else None


def _epoch_of(row: Mapping[str, Any]) -> int:
    number = _number(row.get("epoch"))
    return int(number) if number is not None else -1


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
