"""COCO box mAP/AR of the validation and test epochs, as a Lightning callback.

The LightningModule stays metric-free: its ``validation_step``/``test_step`` return
``{"image_ids": list[int], "detections": list[dict]}`` with, per image, ``boxes (Q, 4)`` absolute xyxy in
original-image pixels, ``scores (Q,)`` and ``labels (Q,)`` int64 model labels (all queries, no threshold).
Ground truth and class names come from the datamodule's annotation file,
``trainer.datamodule.coco_gt(split)``, never from the batch (batch targets drop crowd boxes and are resized).

Distributed runs: each rank keeps its images' detections in COCO terms on the CPU; at epoch end one
``all_gather_object`` brings them together, rank 0 drops the images the sampler repeated, runs COCOeval
once and broadcasts the figures, and every rank logs them. So no NCCL collective sees a CPU tensor, and
the numbers are those of the whole split counted once.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.text import Text
from torch import Tensor

from detr_lightning.coco_summary import coco_summary_lines
from detr_lightning.files import write_json
from detr_lightning.metrics import (
    category_names,
    coco_detections,
    coco_results,
    evaluate_coco_detections,
    flatten_map_result,
    per_class_table,
    unique_images,
)
from detr_lightning.runs import METRICS_FILE

Split = Literal["val", "test"]
PREDICTIONS_FILES: dict[str, str] = {"val": "predictions.coco.json", "test": "predictions_test.coco.json"}


class EvaluationEndCallback(Callback):
    """Calls `on_evaluation_end` once at the end of fit and stand-alone validate (``val``) and of test."""

    def on_evaluation_end(self, split: Split, trainer: Trainer) -> None:
        """What to do with the last ``split`` evaluation."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # stand-alone trainer.validate(); fit ends in on_fit_end
            self.on_evaluation_end("val", trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_evaluation_end("val", trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_evaluation_end("test", trainer)


class CocoEvaluator(EvaluationEndCallback):
    """Scores validation and test detections with COCO box mAP/AR, logs, prints and saves the figures.

    Logs ``<split>/map``, ``map_50``, ..., ``mar_large`` (the 12 COCO figures) and ``<split>/ap/<class
    name>`` (``class_metrics``: one more COCOeval pass per class), equal to ``pycocotools`` ``COCOeval`` on
    the annotation file with either ``backend``. On global rank 0 it prints the 12-line COCO summary after
    every evaluation (``print_summary``) and a per-class table after fit, test and stand-alone validate
    (``print_per_class``), and then writes into ``output_dir`` (default: ``trainer.default_root_dir``):

    - ``metrics.json`` (``write_metrics``): the last val and/or test figures as logged;
    - ``predictions.coco.json`` (last val epoch) and ``predictions_test.coco.json`` (``write_predictions``):
      detections in the COCO results format with original category ids, which any COCO tool re-scores to
      the same numbers.

    Attributes:
        figures: the last figures per split, as logged (every rank).
        results: the last metric result per split behind them (global rank 0 only, where COCOeval runs):
            0-dim ``map``..., ``map_per_class (K,)``, ``mar_100_per_class (K,)``, ``classes (K,)``.
    """

    def __init__(
        self,
        backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval",
        class_metrics: bool = True,
        print_summary: bool = True,
        print_per_class: bool = True,
        write_metrics: bool = True,
        write_predictions: bool = True,
        output_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.class_metrics = class_metrics
        self.print_summary = print_summary
        self.print_per_class = print_per_class
        self.write_metrics = write_metrics
        self.write_predictions = write_predictions
        self.output_dir = output_dir
        self.figures: dict[str, dict[str, float]] = {}
        self.results: dict[str, dict[str, Tensor]] = {}
        # This rank's (image id, detections in COCO terms) of the running epoch, per split.
        self._epoch_records: dict[str, list[tuple[int, dict[str, Tensor]]]] = {"val": [], "test": []}
        self._detections: dict[str, tuple[list[int], list[dict[str, Tensor]]]] = {}  # behind `results`

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *_: Any
    ) -> None:
        # The sanity check scores two batches: numbers nobody should read, and Lightning drops its logs.
        if not trainer.sanity_checking:
            self._collect("val", trainer, outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._evaluate("val", trainer, pl_module)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *_: Any) -> None:
        self._collect("test", trainer, outputs)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate("test", trainer, pl_module)

    def _collect(self, split: Split, trainer: Trainer, outputs: Any) -> None:
        """Keep a batch's detections, in COCO terms, on the CPU."""
        if not isinstance(outputs, dict) or "image_ids" not in outputs or "detections" not in outputs:
            raise TypeError(
                f"CocoEvaluator needs {split} steps to return {{'image_ids': list[int], 'detections': "
                f"list[dict]}} (boxes xyxy in original pixels, scores, labels); got {type(outputs).__name__}"
                + (f" with keys {sorted(outputs)}" if isinstance(outputs, dict) else "")
            )
        converted = coco_detections(outputs["detections"], _datamodule(trainer).label_to_category_id)
        self._epoch_records[split].extend(zip(map(int, outputs["image_ids"]), converted, strict=True))

    def _evaluate(self, split: Split, trainer: Trainer, pl_module: LightningModule) -> None:
        """Gather, score on rank 0, share and log the figures of one epoch."""
        records = list(chain.from_iterable(gather_from_ranks(trainer, self._epoch_records[split])))
        self._epoch_records[split] = []
        figures: dict[str, float] = {}
        if trainer.is_global_zero and records:
            image_ids, detections = unique_images([i for i, _ in records], [d for _, d in records])
            coco_gt = _datamodule(trainer).coco_gt(split)
            result = evaluate_coco_detections(
                image_ids, detections, coco_gt, backend=self.backend, class_metrics=self.class_metrics
            )
            figures = flatten_map_result(result, split, category_names(coco_gt))
            self.results[split] = result
            self._detections[split] = (image_ids, detections)
        figures = trainer.strategy.broadcast(figures, src=0)
        if not figures:
            rank_zero_warn(
                f"CocoEvaluator: no {split} detections were collected, so no {split} mAP is logged"
            )
            return
        # Identical on every rank (computed once, broadcast). Synced with max, which returns them unchanged
        # (a mean over 3 ranks could round) and spares one "use sync_dist=True" warning per key in DDP.
        log_options = {"sync_dist": True, "reduce_fx": "max"}
        pl_module.log(f"{split}/map", figures[f"{split}/map"], prog_bar=True, **log_options)
        pl_module.log_dict({k: v for k, v in figures.items() if k != f"{split}/map"}, **log_options)
        self.figures[split] = figures
        if trainer.is_global_zero and self.print_summary:
            fitting = trainer.state.fn == TrainerFn.FITTING
            title = f"COCO box evaluation, {split}" + (f" (epoch {trainer.current_epoch})" if fitting else "")
            lines = [title, *coco_summary_lines(self.results[split])]
            Console().print(Text("\n".join(lines)), soft_wrap=True)

    def on_evaluation_end(self, split: Split, trainer: Trainer) -> None:
        """After fit, test or validate: print the per-class table and write the files (rank 0)."""
        if not trainer.is_global_zero or split not in self.results:
            return
        if self.print_per_class and self.class_metrics:
            coco_gt = _datamodule(trainer).coco_gt(split)
            Console().print(per_class_table(self.results[split], category_names(coco_gt)))
        output_dir = Path(self.output_dir if self.output_dir is not None else trainer.default_root_dir)
        if self.write_metrics:
            all_figures = {key: value for figures in self.figures.values() for key, value in figures.items()}
            write_json(output_dir / METRICS_FILE, all_figures, indent=2)
        if self.write_predictions:
            write_json(output_dir / PREDICTIONS_FILES[split], coco_results(*self._detections[split]), None)


def gather_from_ranks(trainer: Trainer, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (pickled, so CPU tensors cross any backend); a collective."""
    if trainer.world_size == 1:
        return [value]
    per_rank: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(per_rank, value)
    return per_rank


def _datamodule(trainer: Trainer) -> Any:
    """The trainer's datamodule, checked for what the evaluator reads."""
    datamodule = trainer.datamodule
    if not (hasattr(datamodule, "coco_gt") and hasattr(datamodule, "label_to_category_id")):
        raise TypeError(
            "CocoEvaluator reads ground truth from the datamodule: pass `datamodule=` to "
            "trainer.fit/validate/test, with `coco_gt(split)` and `label_to_category_id` "
            f"(got {type(datamodule).__name__})"
        )
    return datamodule
