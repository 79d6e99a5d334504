"""Each rank's share of every global batch: K ranks together see exactly the single-process batches.

The global batches are those of the single-process run (:class:`genrec.data.batching.BucketBatchSampler`,
a pure function of (seed, epoch)), so the batch a step sees does not depend on the world size, and
a checkpoint's position (epoch, batch in epoch) means the same with any number of ranks. Rank ``r``
of ``K`` takes windows ``r, r + K, r + 2K, ...`` of each batch (a batch is sorted by length inside
its bucket, so the shares get similar lengths)::

    global batch   w0 w1 w2 w3 w4       K = 2
    rank 0         w0    w2    w4
    rank 1            w1    w3

Every window, hence every target, is trained on exactly once per epoch. A batch smaller than K
leaves some ranks no window; such a rank trains on a *ghost*: the batch's first window with no
targets, which adds nothing to the loss or the gradient but keeps the collective calls in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset, Sampler

from genrec.data.batching import BucketBatchSampler, JaggedBatch, WindowDataset, batch_collate


def ghost(index: int) -> int:
    """The sampler's code for "window ``index`` without targets" (a negative index)."""
    return -1 - index


class GhostableWindows(Dataset):
    """:class:`WindowDataset` that also serves ghost indices (:func:`ghost`): the window with its first
    target moved past its end, so it carries no target."""

    def __init__(self, windows: WindowDataset):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple:
        if i >= 0:
            return self.windows[i]
        sample = self.windows[-1 - i]
        return (*sample[:-1], len(sample[1]))


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s share of each batch of ``global_sampler``; same interface (``set_epoch``,
    ``batches``), same number of batches on every rank."""

    def __init__(self, global_sampler: BucketBatchSampler, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.global_sampler = global_sampler
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.global_sampler.set_epoch(epoch, start_batch)

    def share(self, batch: list[int]) -> list[int]:
        part = batch[self.rank:: self.world_size]
        return part or [ghost(batch[0])]

    def batches(self) -> list[list[int]]:
        return [self.share(b) for b in self.global_sampler.batches()]

    def __iter__(self):
        yield from self.batches()[self.global_sampler.start_batch:]

    def __len__(self) -> int:
        return len(self.global_sampler)


def sharded_loader(dataset: WindowDataset, global_batch: int, rank: int, world_size: int, *, seed: int,
                   num_workers: int = 0, prepare: Callable[[JaggedBatch], Any] | None = None,
                   pin_memory: bool = False) -> DataLoader:
    """The training loader of one rank: per-rank batches of about ``global_batch / world_size`` windows."""
    sampler = ShardedBatchSampler(BucketBatchSampler(dataset.lengths(), global_batch, shuffle=True, seed=seed),
                                  rank, world_size)
    return DataLoader(GhostableWindows(dataset), batch_sampler=sampler, collate_fn=batch_collate(prepare),
                      num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory)
