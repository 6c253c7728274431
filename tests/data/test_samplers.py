from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from detr_lightning.data.samplers import EvalShardSampler


@pytest.mark.parametrize(("size", "replicas"), [(10, 3), (7, 8), (50, 4), (1, 1), (0, 2)])
def test_eval_shards_cover_every_index_exactly_once(size: int, replicas: int) -> None:
    dataset = list(range(size))
    shards = [list(EvalShardSampler(dataset, num_replicas=replicas, rank=rank)) for rank in range(replicas)]
    assert sorted(index for shard in shards for index in shard) == dataset
    assert [len(EvalShardSampler(dataset, replicas, rank)) for rank in range(replicas)] == [
        len(s) for s in shards
    ]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_eval_shard_sampler_is_a_distributed_sampler_so_lightning_keeps_it() -> None:
    assert isinstance(EvalShardSampler(list(range(5)), 2, 1), DistributedSampler)
