"""Evaluation loop: scores every target of a split with the model's ranking and/or retrieval heads.

Retrieval ranks the *full* catalogue (items 1..num_items) for each target; nothing is excluded,
not even items already in the user's history (the UniGRF paper's protocol, §5.1.2: "the entire item
set is used as the candidate set"). Only the padding id 0 is never a candidate.

Scoring (:func:`score_batches`, one :class:`BatchScores` per batch) is apart from the reduction to
metrics (:func:`reduce_scores`), so several processes can each score a share of the batches and
one reduction over the gathered batches, in the single-process order, gives the very same numbers
(:mod:`genrec.distributed.evaluate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from genrec.eval.metrics import MultiTaskAccumulator, RankingAccumulator, RetrievalAccumulator, target_ranks
from genrec.models.base import RecModel


def metric_names(tasks: tuple[str, ...], ks: tuple[int, ...] = (10, 50),
                 signal_names: tuple[str, ...] = ()) -> list[str]:
    """The quality metrics :func:`evaluate` reports for a model with ``tasks`` and, with several action
    signals, per signal and their mean (for checking a stopping metric before training)."""
    names = ["auc", "gauc", "logloss"] if "ranking" in tasks else []
    if names and len(signal_names) > 1:
        names += [f"{m}/{s}" for s in [*signal_names, "mean"] for m in ("auc", "gauc", "logloss")]
    if "retrieval" in tasks:
        names += [f"{m}@{k}" for m in ("hr", "ndcg") for k in ks] + ["mrr"]
    return names


@dataclass
class BatchScores:
    """What one evaluation batch leaves for the metrics, on the CPU: per target, in flat order."""

    users: torch.Tensor  # [N_t] int64
    labels: torch.Tensor | None = None  # [N_t] float32 (ranking models)
    logits: torch.Tensor | None = None  # [N_t] float32 (ranking models)
    # several action signals: the binary target and the logit of each, and the signals' names
    signals: torch.Tensor | None = None  # [N_t, T] float32
    task_logits: torch.Tensor | None = None  # [N_t, T] float32
    signal_names: tuple[str, ...] = ()
    # where the true item ranks in the full catalogue (retrieval): [n, 2] float64 of (items scored
    # higher, other items tied), NaN where its score is not finite (target_ranks), per chunk of <= 1024
    # targets: the metrics sum chunk by chunk, so their last bits do not depend on the batching
    ranks: list[torch.Tensor] | None = None


@torch.no_grad()
def score_batches(model: RecModel, loader, device: torch.device, autocast: bool = False) -> Iterator[BatchScores]:
    model.eval()
    signal_names = tuple(getattr(model, "signal_names", ("like",)))
    multi_task = len(signal_names) > 1 and "ranking" in model.tasks
    items = None
    if "retrieval" in model.tasks:
        items = model.item_embeddings().float()  # [I + 1, D]
    for batch in loader:
        batch = batch.to(device)
        out = BatchScores(users=batch.at_targets(batch.users[batch.sequence_index()]).cpu())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if multi_task:  # one pass for every signal; the first is the label
                out.task_logits = model.task_logits(batch).float().cpu()  # [N_t, T]
                out.signals = batch.at_targets(batch.signals).float().cpu()
                out.signal_names = signal_names
                out.labels = batch.at_targets(batch.labels).float().cpu()
                out.logits = out.task_logits[:, 0]
            elif "ranking" in model.tasks:
                out.labels = batch.at_targets(batch.labels).float().cpu()
                out.logits = model.rank_logits(batch).float().cpu()
            if items is not None:
                queries = model.retrieval_queries(batch)  # [N, D]
        if items is not None:
            out.ranks = catalogue_ranks(queries, items, batch.at_targets(batch.items))
        yield out


def catalogue_ranks(queries: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """:func:`target_ranks` of each query's true item among all items, per chunk of <= 1024 queries.

    The product runs in float32 with autocast off even when the forward autocasts: in bfloat16 (8 bits
    of mantissa) close scores round to the same value, and ties would decide the ranks.
    queries ``[N, D]``, items ``[I + 1, D]`` (row 0 the padding item), targets ``[N]``.
    """
    ranks = []
    with torch.autocast(queries.device.type, enabled=False):
        for chunk in range(0, len(queries), 1024):  # bounds memory at 1024 x num_items scores
            scores = queries[chunk: chunk + 1024].float() @ items.float().T  # [n, I + 1]
            scores[:, 0] = float("-inf")
            ranks.append(target_ranks(scores, targets[chunk: chunk + 1024]).cpu())  # [n, 2]
    return ranks


def reduce_scores(scores: Iterable[BatchScores], ks: tuple[int, ...] = (10, 50)) -> dict[str, float]:
    """Metrics of the batches' scores, accumulated in the order given."""
    ranking = RankingAccumulator()
    retrieval = RetrievalAccumulator(ks)
    tasks = None
    for s in scores:
        if s.logits is not None:
            ranking.update(s.users, s.labels, s.logits)
        if s.task_logits is not None:
            tasks = tasks or MultiTaskAccumulator(list(s.signal_names))
            tasks.update(s.users, s.signals, s.task_logits)
        for ranks in s.ranks or ():
            retrieval.update_ranks(ranks)
    return ranking.compute() | (tasks.compute() if tasks is not None else {}) | retrieval.compute()


def evaluate(model: RecModel, loader, device: torch.device, ks: tuple[int, ...] = (10, 50),
             autocast: bool = False) -> dict[str, float]:
    return reduce_scores(score_batches(model, loader, device, autocast), ks)
