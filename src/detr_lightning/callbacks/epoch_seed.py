"""Opt-in (``callbacks=exact_resume``): reseed PyTorch's global RNG at the start of every training epoch.

The data order and each sample's augmentation already depend only on ``(seed, epoch)`` (see
`detr_lightning.data.samplers`). Dropout draws from the global RNG, whose state a checkpoint does not
hold: with dropout > 0, a run resumed from an end-of-epoch checkpoint repeats the uninterrupted one only
when that RNG restarts every epoch from ``(seed, epoch, rank)`` too. Without this callback training
draws from PyTorch's plain random stream, seeded once by ``seed_everything``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from detr_lightning.data.samplers import sample_seed


class EpochSeed(Callback):
    """``torch.manual_seed(f(seed, epoch, rank))`` before the first training batch of every epoch.

    The first batch, not ``on_train_epoch_start``: creating the epoch's data loader iterator may draw from
    the global RNG, and a resumed run creates it before ``on_train_epoch_start``, an uninterrupted one
    after. A run resumed mid-epoch is reseeded from the next epoch on.
    """

    def __init__(self, seed: int) -> None:
        if seed is None:
            raise ValueError("callbacks=exact_resume needs a seed; set seed=INT (e.g. seed=42).")
        self.seed = int(seed)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            torch.manual_seed(sample_seed(self.seed, trainer.current_epoch, trainer.global_rank))
