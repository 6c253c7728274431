"""``metrics.csv``: one row per epoch with every train and validation figure."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from detr_lightning.files import atomic_writer, to_float
from detr_lightning.runs import EPOCH_METRICS_FILE


def epoch_row(trainer: Trainer) -> dict[str, Any]:
    """``epoch``, ``step``, ``lr/<param group>`` and the epoch figures of ``trainer.callback_metrics``.

    Train figures are the epoch means (Lightning's ``*_epoch`` values, without the suffix), per-step values
    are left out; validation figures are whatever was logged under ``val/``, the callbacks' mAP/AR included.
    """
    row: dict[str, Any] = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step)}
    for index, group in enumerate(trainer.optimizers[0].param_groups if trainer.optimizers else []):
        row[f"lr/{group.get('name', index)}"] = group["lr"]
    for key, value in trainer.callback_metrics.items():
        number = to_float(value)
        if number is not None and not key.endswith("_step"):
            row[key.removesuffix("_epoch")] = number
    return row


class EpochMetricsCSV(Callback):
    """Write an `epoch_row` per epoch to ``<output_dir>/<filename>`` (default: ``metrics.csv`` in the
    trainer's ``default_root_dir``), rewritten whole and atomically as columns appear, so the file is
    always complete."""

    def __init__(
        self, output_dir: str | os.PathLike | None = None, filename: str = EPOCH_METRICS_FILE
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.filename = filename
        self.rows: list[dict[str, Any]] = []

    @rank_zero_only
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.rows.append(epoch_row(trainer))
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        path = (self.output_dir or Path(trainer.default_root_dir)) / self.filename
        with atomic_writer(path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in self.rows:  # NaN as a blank cell
                writer.writerow(
                    {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                )

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
