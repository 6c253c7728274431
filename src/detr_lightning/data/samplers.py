"""Evaluation sampling across processes: every image exactly once, no padding."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


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
        size = len(dataset)
        self.start = rank * size // num_replicas
        self.stop = (rank + 1) * size // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
