"""Evaluation loop: scores every target of a split with the model's ranking and/or retrieval heads.

Retrieval ranks the *full* catalogue (items 1..num_items) for each target; items already in the
user's history stay candidates (the UniGRF paper's protocol, §5.1.2: "the entire item set is used
as the candidate set"). The padding id 0 is never a candidate. It is reported under two query
protocols:

* per event (``hr@10``, ``ndcg@10``, ``mrr``, ...; SASRec's): the query for an event reads every
  event before it, earlier events of its own request included;
* per request (``hr@10/request``, ...): every target of a request is ranked from one query, the
  model's query for the request's first event, which reads earlier requests only (what serving
  sees: ``/recommend`` queries after the history, for a new request); the request's other items
  are answers too, so they leave that target's catalogue (the "filtered" ranking). Both are read
  from the target's evaluation window: where a window's start or end cuts a request (windows
  advance by ``data.stride``), its first event in the window stands for its first, and its events
  outside the window are not left out.

On MovieLens a request is one second of a user's ratings (bulk rating) in item-id order, so the
per-event metrics also credit a model for that order; the per-request ones do not.

Scoring (:func:`score_batches`, one :class:`BatchScores` per batch) is apart from the reduction to
metrics (:func:`reduce_scores`), so several processes can each score a share of the batches and
one reduction over the gathered batches, in the single-process order, gives the very same numbers
(:mod:`genrec.distributed.evaluate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from genrec.data.batching import JaggedBatch
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
        retrieval = [f"{m}@{k}" for m in ("hr", "ndcg") for k in ks] + ["mrr"]
        names += retrieval + [f"{m}{PER_REQUEST}" for m in retrieval]
    return names


PER_REQUEST = "/request"  # the suffix of the retrieval metrics under the per-request query protocol


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
    request_ranks: list[torch.Tensor] | None = None  # the same, per-request protocol (module docstring)


@dataclass
class RequestQueries:
    """Both protocols' queries of a batch from one forward pass (:func:`request_queries`)."""

    batch: JaggedBatch  # the batch with targets at its targets and at the first event of each one's request
    per_event: torch.Tensor  # [N_t] int64: the row of ``batch``'s queries that is each target's own
    per_request: torch.Tensor  # [N_t] int64: the row that is the query for its request's first event
    exclude: torch.Tensor  # [P, 2] int64: (target, item) of the other items of each target's request


def request_queries(batch: JaggedBatch) -> RequestQueries:
    """Where each target's queries come from, and which items leave its per-request catalogue. A
    model's query for an event depends on the batch's targets only through which rows it returns
    (``tests/eval/test_evaluate.py`` checks every retrieval model), so one pass over the targets and
    their requests' first events gives both protocols."""
    start = batch.request_starts()  # [T]
    target_start = batch.at_targets(start)  # [N_t]
    queried = batch.target_mask.clone()
    queried[target_start] = True  # [T]: the targets and the first events of their requests
    row = queried.cumsum(0) - 1  # [T]: an event's row among the queried ones
    query_batch = dataclasses.replace(batch, target_mask=queried, known_num_targets=None, known_max_targets=None,
                                      known_first_target=None, known_layout=None)
    # the events of each target's request: [start, start + size) (``start`` is non-decreasing)
    size = torch.searchsorted(start, target_start, right=True) - target_start  # [N_t]
    target = torch.repeat_interleave(torch.arange(len(size), device=size.device), size)  # [P']
    within = torch.arange(len(target), device=size.device) - (size.cumsum(0) - size)[target]
    items = batch.items[target_start[target] + within]  # [P']
    other = items != batch.at_targets(batch.items)[target]  # the target's own item stays a candidate
    return RequestQueries(batch=query_batch, per_event=batch.at_targets(row), per_request=row[target_start],
                          exclude=torch.stack([target[other], items[other]], 1))


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
                request = request_queries(batch)
                queries = model.retrieval_queries(request.batch)  # [targets and their requests' first events, D]
        if items is not None:
            targets = batch.at_targets(batch.items)
            out.ranks = catalogue_ranks(queries[request.per_event], items, targets)
            out.request_ranks = catalogue_ranks(queries[request.per_request], items, targets, request.exclude)
        yield out


def catalogue_ranks(queries: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                    exclude: torch.Tensor | None = None) -> list[torch.Tensor]:
    """:func:`target_ranks` of each query's true item among all items, per chunk of <= 1024 queries.

    The product runs in float32 with autocast off even when the forward autocasts: in bfloat16 (8 bits
    of mantissa) close scores round to the same value, and ties would decide the ranks.
    queries ``[N, D]``, items ``[I + 1, D]`` (row 0 the padding item), targets ``[N]``; ``exclude``
    ``[P, 2]``: (query, item) pairs left out of that query's catalogue.
    """
    ranks = []
    with torch.autocast(queries.device.type, enabled=False):
        for chunk in range(0, len(queries), 1024):  # bounds memory at 1024 x num_items scores
            scores = queries[chunk: chunk + 1024].float() @ items.float().T  # [n, I + 1]
            scores[:, 0] = float("-inf")
            if exclude is not None:
                pairs = exclude[(exclude[:, 0] >= chunk) & (exclude[:, 0] < chunk + 1024)]  # [p, 2]
                scores[pairs[:, 0] - chunk, pairs[:, 1]] = float("-inf")
            ranks.append(target_ranks(scores, targets[chunk: chunk + 1024]).cpu())  # [n, 2]
    return ranks


def reduce_scores(scores: Iterable[BatchScores], ks: tuple[int, ...] = (10, 50)) -> dict[str, float]:
    """Metrics of the batches' scores, accumulated in the order given."""
    ranking = RankingAccumulator()
    retrieval, per_request = RetrievalAccumulator(ks), RetrievalAccumulator(ks)
    tasks = None
    for s in scores:
        if s.logits is not None:
            ranking.update(s.users, s.labels, s.logits)
        if s.task_logits is not None:
            tasks = tasks or MultiTaskAccumulator(list(s.signal_names))
            tasks.update(s.users, s.signals, s.task_logits)
        for ranks in s.ranks or ():
            retrieval.update_ranks(ranks)
        for ranks in s.request_ranks or ():
            per_request.update_ranks(ranks)
    requests = {f"{k}{PER_REQUEST}": v for k, v in per_request.compute().items() if k != "retrieval_targets"}
    return ranking.compute() | (tasks.compute() if tasks is not None else {}) | retrieval.compute() | requests


def evaluate(model: RecModel, loader, device: torch.device, ks: tuple[int, ...] = (10, 50),
             autocast: bool = False) -> dict[str, float]:
    return reduce_scores(score_batches(model, loader, device, autocast), ks)
