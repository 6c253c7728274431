"""Samplers: evaluation shards (every image exactly once, no padding) and a resumable training order."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


class EvalShardSampler(DistributedSampler):
    """Contiguous, unpadded shards of a dataset, one per rank, in order.

    ``DistributedSampler`` pads every rank to the same length by repeating images, which would count
    those images twice in COCO evaluation. Here rank ``r`` of ``R`` gets indices
    ``[r * N // R, (r + 1) * N // R)``: shard sizes differ by at most one and their union is the dataset.

    Subclassing ``DistributedSampler`` makes Lightning keep this sampler as it is, whatever the
    Trainer's ``use_distributed_sampler``. Since ranks may get different numbers of batches, collective
    operations belong at epoch end (torchmetrics-style sync), not in ``validation_step``.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = range(rank * len(dataset) // num_replicas, (rank + 1) * len(dataset) // num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochShuffleSampler(DistributedSampler):
    """Training order that depends only on ``(seed, epoch)``, for one process or several.

    A ``DistributedSampler`` (shuffled, padded across ranks like the official code) that yields
    ``epoch * len(dataset) + index`` instead of ``index``: :class:`EpochSeededDataset` decodes it and
    seeds the sample's augmentation from ``(seed, epoch, index)``. Nothing depends on how many epochs
    this process has run, so a run resumed at an epoch boundary sees the same batches, augmented the
    same way, as an uninterrupted one, whatever the number of workers.
    """

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        return (offset + index for index in super().__iter__())


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 32-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(1)[0])


class EpochSeededDataset(Dataset):
    """Wraps a training dataset so each item's random augmentation is a function of ``(seed, epoch, index)``.

    Keys are ``epoch * len(dataset) + index`` (see :class:`EpochShuffleSampler`); a plain index means
    epoch 0 (e.g. Lightning's sequential sampler for ``overfit_batches``). The global torch RNG, which
    the transforms draw from, is seeded for the item and restored afterwards.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), len(self))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]
