"""Statistics a model keeps across steps, summed over the data-parallel ranks that train it, and the
global batch's values a loss reads beside its own rows.

Under DDP each rank's forward sees only its share of the global batch. A running count or loss
average that a model updates inside ``forward`` must see the whole batch to match one process,
and DDP's buffer broadcast (rank 0's buffers at each forward) would otherwise keep rank 0's share
alone; in-batch negatives must be the whole batch's items. Every function is the identity outside
a process group of several ranks; inside one, every rank must call them in the same order (as every
rank runs the same forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (a new tensor; the identity in one process)."""
    if _world_size() == 1:
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def mean_over_ranks(means: torch.Tensor, counts: Sequence[int | torch.Tensor]) -> torch.Tensor:
    """Per-rank means ``[T]``, each over ``counts[t]`` local items, as the means over every rank's
    items together; a rank with no items of a kind (its mean NaN) adds nothing to that one. The
    counts become a device tensor only with several ranks: one process pays nothing per step."""
    if _world_size() == 1:
        return means
    counts = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=means.device) for c in counts])
    sums = torch.where(counts > 0, means.detach().to(torch.float64) * counts, 0.0)
    both = sum_over_ranks(torch.cat([sums, counts]))
    return (both[: len(means)] / both[len(means):]).to(means.dtype)


def gather_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` ``[n_r, ...]`` of every rank, concatenated in rank order ``[Σ n_r, ...]`` (ranks may
    hold different numbers of rows; no gradient flows back through the other ranks' rows: for ids
    and other values a loss only reads)."""
    if _world_size() == 1:
        return values
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(_world_size())]
    dist.all_gather(sizes, torch.tensor([len(values)], device=values.device))
    longest = int(max(sizes))
    padded = values.new_zeros((longest, *values.shape[1:]))
    padded[: len(values)] = values.detach()
    everyone = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(everyone, padded)
    return torch.cat([rows[: int(n)] for rows, n in zip(everyone, sizes, strict=True)])


def rows_weight(rows: int, targets: int, device: torch.device) -> torch.Tensor | float:
    """The factor that turns this rank's weight in a data-parallel step, its share of the step's
    targets (the trainer scales rank r's loss by K·n_r/N: genrec.distributed.strategy), into its share
    of a loss's ``rows`` when that mean is over more rows than the targets (UniGRF's favourite rows):
    ``(rows_r / n_r) · (N / R)``, R the rows of every rank. 1 in one process; 0 on a rank without
    targets, whose loss the trainer weighs by 0."""
    if _world_size() == 1:
        return 1.0
    local = torch.tensor([rows, targets], dtype=torch.float64, device=device)
    total = sum_over_ranks(local)
    if targets == 0:
        return torch.zeros((), device=device)
    return ((local[0] / local[1]) * (total[1] / total[0])).float()
