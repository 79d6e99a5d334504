"""Evaluation sharded over ranks and reduced to exactly the single-process metrics.

The evaluation batches are those of the single-process loader; rank ``r`` scores batches
``r, r + K, ...``. The per-batch scores (one float per target, a rank per retrieval target) are
gathered and replayed in the single-process batch order into the same accumulators, so AUC, GAUC,
LogLoss and HR/NDCG/MRR are bit-for-bit those of one process given the same predictions. Every rank
runs the same number of forward passes (a rank short of batches repeats one and drops its scores):
FSDP2 gathers parameters collectively inside each forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from genrec.eval.evaluate import BatchScores, reduce_scores, score_batches


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> tuple[list[list[int]], int]:
    """Rank ``rank``'s batches, padded to the same count on every rank, and how many are its own."""
    mine = batches[rank::world_size]
    per_rank = -(-len(batches) // world_size)
    return mine + [batches[0]] * (per_rank - len(mine)), len(mine)


def interleave(per_rank: list[list[BatchScores]]) -> list[BatchScores]:
    """Undo :func:`shard_batches`: batch ``i`` came from rank ``i % K`` as its ``i // K``-th."""
    world_size = len(per_rank)
    total = sum(len(s) for s in per_rank)
    return [per_rank[i % world_size][i // world_size] for i in range(total)]


@torch.no_grad()
def sharded_evaluate(model, loader: DataLoader, device: torch.device, autocast: bool = False,
                     ks: tuple[int, ...] = (10, 50)) -> dict[str, float]:
    """The metrics of ``loader`` (a single-process evaluation loader), computed by all ranks together;
    every rank returns the same dictionary."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches, own = shard_batches(loader.batch_sampler.batches(), rank, world_size)
    mine = DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers)
    scores = list(score_batches(model, mine, device, autocast))[:own]
    gathered: list[list[BatchScores] | None] = [None] * world_size
    dist.all_gather_object(gathered, scores)
    return reduce_scores(interleave(gathered), ks)
