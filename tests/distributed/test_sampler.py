"""Data sharding across ranks: every window once per epoch, the single-process global batches for any
world size, ghosts without targets, and evaluation shards that interleave back in order."""

from __future__ import annotations

import numpy as np
import pytest

from genrec.data.batching import BucketBatchSampler, collate
from genrec.distributed.evaluate import interleave, shard_batches
from genrec.distributed.sampler import GhostableWindows, ShardedBatchSampler, ghost


def _sampler(n: int = 53, batch: int = 8, seed: int = 3) -> BucketBatchSampler:
    lengths = np.random.default_rng(0).integers(1, 30, n)
    return BucketBatchSampler(lengths, batch, shuffle=True, seed=seed, bucket_batches=2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_distributed_sampler_trains_every_window_exactly_once_per_epoch(world_size):
    for epoch in range(3):
        seen = []
        shards = [ShardedBatchSampler(_sampler(), r, world_size) for r in range(world_size)]
        for s in shards:
            s.set_epoch(epoch)
        per_rank = [s.batches() for s in shards]
        assert len({len(b) for b in per_rank}) == 1  # every rank takes a step together
        for step in zip(*per_rank, strict=True):
            seen += [i for share in step for i in share if i >= 0]
        assert sorted(seen) == list(range(53))


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_shares_of_a_step_make_the_single_process_batch(world_size):
    single = _sampler()
    single.set_epoch(1)
    shards = [ShardedBatchSampler(_sampler(), r, world_size) for r in range(world_size)]
    for s in shards:
        s.set_epoch(1)
    for step, batch in enumerate(single.batches()):
        shares = [s.batches()[step] for s in shards]
        assert sorted(i for share in shares for i in share if i >= 0) == sorted(batch)
        assert max(len(x) for x in shares) == -(-len(batch) // world_size)  # per-rank batch = global / K


def test_distributed_sampler_resumes_mid_epoch_at_the_same_global_batch():
    shard = ShardedBatchSampler(_sampler(), 1, 2)
    shard.set_epoch(2)
    full = shard.batches()
    shard.set_epoch(2, start_batch=4)
    assert list(shard) == full[4:] and len(shard) == len(full) - 4


def test_distributed_ghost_share_is_the_first_window_without_targets(tiny_sequences):
    batch = [5]  # a last batch smaller than the world
    assert ShardedBatchSampler(_sampler(), 0, 2).share(batch) == [5]
    assert ShardedBatchSampler(_sampler(), 1, 2).share(batch) == [ghost(5)]
    data = GhostableWindows(tiny_sequences)
    real, phantom = collate([data[5]]), collate([data[ghost(5)]])
    assert real.target_mask.any() and not phantom.target_mask.any()
    assert (real.items == phantom.items).all() and (real.offsets == phantom.offsets).all()


def test_distributed_eval_shards_interleave_back_to_single_process_order():
    batches = [[i] for i in range(7)]
    shards = [shard_batches(batches, r, 3) for r in range(3)]
    assert [len(b) for b, _ in shards] == [3, 3, 3]  # same number of forwards on every rank
    assert [own for _, own in shards] == [3, 2, 2]
    assert interleave([b[:own] for b, own in shards]) == batches
