"""The contracts every genrec model fulfils, so one trainer, one evaluator and one serving path
serve them all.

Every model is a :class:`RecModel`: ``forward(batch)`` returns the training losses, and ``tasks``
says what it is evaluated and served on:

* ``"ranking"``: it predicts the actions of events. Offline, :meth:`RecModel.rank_logits` scores
  the targets of a batch (the main action, ``[N_t]``, flat target order). Online,
  :meth:`RecModel.score` scores the candidates of each user's next request::

      score(history, candidates, request_time) -> logits [B, M, T]

  ``history``: a :class:`~genrec.data.batching.JaggedBatch` of B users' past events;
  ``candidates`` ``[B, M]`` item ids shown together as one new request at ``request_time`` ``[B]``;
  one logit per candidate and predicted action, ``T = len(model.actions)`` (the dataset's signals,
  :attr:`RecModel.signal_names`: click, like, ...), ``actions[0]`` the main label (what AUC reads
  and ``rank_logits`` gives; ``task_logits`` gives all ``T`` offline). A candidate never reads
  another candidate, so each score is the one the offline pass gives that item as the request's
  target (tests/models/test_contracts.py).
* ``"retrieval"``: it ranks the whole catalogue. :meth:`RecModel.retrieval_queries` ``[N_t, D]``
  are scored by dot product against :meth:`RecModel.item_embeddings` ``[num_items + 1, D]``.

A ranker whose history can be encoded once (HSTU blocks: HSTU, DFGR) also has ``kv_serving``, a
:class:`~genrec.nn.kv_cache.KVServing`: the history runs once into a per-layer KV cache, grows with
new events, and candidates are scored against it (``score`` is exactly that, with room for all M
candidates); every other model has ``kv_serving = None``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from genrec.data.batching import JaggedBatch, rows_at
from genrec.nn.kv_cache import KVServing
from genrec.nn.prepared import LayoutPlan

Task = Literal["ranking", "retrieval"]


class RecModel(nn.Module):
    """Base class. A method of a task the model does not declare in ``tasks`` raises."""

    tasks: tuple[Task, ...] = ()
    signal_names: tuple[str, ...] | list[str] = ("like",)  # the dataset's action signals, the label first
    kv_serving: KVServing | None = None  # serving against a per-user history cache, where the model has one
    # score / retrieval_queries read the batch's dense user index (a table row per training user): such a
    # model can serve only the training data's users (tests/models/test_contracts.py checks the flag)
    reads_user_ids: bool = False

    @property
    def actions(self) -> tuple[str, ...]:
        """The predicted actions along the last dim of :meth:`score`: the signals, label first."""
        return tuple(self.signal_names)

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:  # {"loss": ..., parts...}
        raise NotImplementedError

    def layout_plan(self, dtype: torch.dtype) -> LayoutPlan | None:
        """What the training loader builds from each batch ahead of its step (the token layout's
        schedules on the fused backend; :mod:`genrec.nn.prepared`), for steps whose attention runs in
        ``dtype``; None: nothing."""
        return None

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [num_targets] main action
        raise NotImplementedError(f"{type(self).__name__} does not rank (tasks: {self.tasks})")

    def score(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, M, T]`` of ``candidates`` ``[B, M]`` as the next request at ``request_time``
        ``[B]`` after each sequence of ``history`` (module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} does not rank (tasks: {self.tasks})")

    def retrieval_queries(self, batch: JaggedBatch) -> torch.Tensor:  # [num_targets, D]
        raise NotImplementedError(f"{type(self).__name__} does not retrieve (tasks: {self.tasks})")

    def item_embeddings(self) -> torch.Tensor:  # [num_items + 1, D]
        raise NotImplementedError(f"{type(self).__name__} does not retrieve (tasks: {self.tasks})")

    def before_epoch(self, epoch: int, history_loader, device: torch.device) -> dict[str, float]:
        """Called before every epoch's first step with batches of each user's latest training window
        (UniGRF mines training samples here); returns statistics to log with the epoch. State it
        changes must live in buffers, so resume is exact."""
        return {}


class NextItemModel(RecModel):
    """A retrieval-only model whose query is scored against its own item table, trained by
    :func:`sampled_softmax_loss` with ``num_negatives`` uniform negatives (GRU4Rec, NARM)."""

    tasks = ("retrieval",)

    def __init__(self, num_items: int, dim: int, num_negatives: int):
        super().__init__()
        self.num_items = num_items
        self.num_negatives = num_negatives
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.02)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        loss = sampled_softmax_loss(self.retrieval_queries(batch), batch.at_targets(batch.items),
                                    self.item_emb.weight, self.num_negatives, self.num_items)
        return {"loss": loss, "retrieval_loss": loss.detach()}


def sampled_softmax_loss(queries: torch.Tensor, positives: torch.Tensor, item_table: torch.Tensor,
                         num_negatives: int, num_items: int) -> torch.Tensor:
    """Sampled softmax over the true next item and ``num_negatives`` uniform catalogue negatives.

    Negatives are shared across the batch (one ``[K, D]`` gather); a negative equal to a row's
    positive ("accidental hit") is masked out. Uniform sampling needs no logQ correction.
    queries ``[N, D]``, positives ``[N]`` item ids, item_table ``[num_items + 1, D]``.
    """
    negatives = torch.randint(1, num_items + 1, (num_negatives,), device=queries.device)  # [K]
    pos_logit = (queries * item_table[positives]).sum(-1, keepdim=True)  # [N, 1]
    neg_logit = queries @ item_table[negatives].T  # [N, K]
    neg_logit = neg_logit.masked_fill(negatives[None, :] == positives[:, None], float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return nn.functional.cross_entropy(logits.float(), torch.zeros(len(queries), dtype=torch.long,
                                                                   device=queries.device))


def states_before(h: torch.Tensor, start: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, L, D]`` states after reading events ``0..i`` -> ``[T, D]`` jagged states *before* each
    event (a learned ``start`` vector before the first): the query a next-item model uses for event i.
    ``count``: T, the batch's events (``JaggedBatch.num_events``), so the gather reads nothing back."""
    before = torch.cat([start.expand(len(h), 1, -1), h[:, :-1]], dim=1)  # [B, L, D]
    return rows_at(before, valid, count)
