"""``metrics.csv``: one row per epoch with every train and validation figure."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import lightning
from lightning.pytorch.utilities import rank_zero_only

from detr_lightning.files import atomic_writer, to_float
from detr_lightning.runs import EPOCH_METRICS_FILE


class EpochMetricsCSV(lightning.Callback):
    """Write one row per epoch to ``<output_dir>/metrics.csv``, rewritten whole as columns appear.

    Train figures are the epoch means (Lightning's ``*_epoch`` values, written without the suffix);
    per-step values are left out. Validation figures are whatever was logged under ``val/`` that epoch,
    including the callbacks' mAP/AR. The file is rewritten atomically, so it is always complete.

    Args:
        output_dir: folder of ``metrics.csv``; defaults to the trainer's ``default_root_dir``.
        filename: the file name.
    """

    def __init__(
        self, output_dir: str | os.PathLike | None = None, filename: str = EPOCH_METRICS_FILE
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.filename = filename
        self.rows: list[dict[str, Any]] = []

    def _path(self, trainer: lightning.Trainer) -> Path:
        return (self.output_dir or Path(trainer.default_root_dir)) / self.filename

    @staticmethod
    def epoch_figures(metrics: dict[str, Any]) -> dict[str, float]:
        """Scalar epoch-level figures of ``trainer.callback_metrics`` (``_epoch`` suffix dropped)."""
        numbers = ((key, to_float(value)) for key, value in metrics.items() if not key.endswith("_step"))
        return {key.removesuffix("_epoch"): number for key, number in numbers if number is not None}

    @rank_zero_only
    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for index, group in enumerate(trainer.optimizers[0].param_groups if trainer.optimizers else []):
            row[f"lr/{group.get('name', index)}"] = group["lr"]
        row.update(self.epoch_figures(trainer.callback_metrics))
        self.rows.append(row)
        self._write(self._path(trainer))

    def _write(self, path: Path) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(key for key in row if key not in columns)
        with atomic_writer(path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in self.rows:
                writer.writerow(
                    {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                )

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
