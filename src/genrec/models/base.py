"""The contract every genrec model fulfils, so one trainer and one evaluator serve them all."""

from __future__ import annotations

import torch
from torch import nn

from genrec.data.batching import JaggedBatch


class RecModel(nn.Module):
    """Base class: ``forward`` returns the training losses; scoring methods serve evaluation.

    ``tasks`` says which of ``"ranking"`` (P(label = 1) of a target event, read through
    :meth:`rank_logits`) and ``"retrieval"`` (next item over the whole catalogue, read through
    :meth:`retrieval_queries` and :meth:`item_embeddings`) the model is evaluated on. Scores are
    returned for the events of ``batch.target_mask`` in flat order.
    """

    tasks: tuple[str, ...] = ()

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:  # {"loss": ..., parts...}
        raise NotImplementedError

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [num_targets]
        raise NotImplementedError

    def retrieval_queries(self, batch: JaggedBatch) -> torch.Tensor:  # [num_targets, D]
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:  # [num_items + 1, D]
        raise NotImplementedError

    def before_epoch(self, epoch: int, history_loader, device: torch.device) -> dict[str, float]:
        """Called before every epoch's first step with batches of each user's latest training window
        (UniGRF mines training samples here); returns statistics to log with the epoch. State it
        changes must live in buffers, so resume is exact."""
        return {}


class NextItemModel(RecModel):
    """A retrieval-only model whose query is scored against its own item table ``item_emb`` and
    trained by :func:`sampled_softmax_loss` with ``cfg.num_negatives`` (GRU4Rec, NARM)."""

    tasks = ("retrieval",)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        loss = sampled_softmax_loss(self.retrieval_queries(batch), batch.items[batch.target_mask],
                                    self.item_emb.weight, self.cfg.num_negatives, self.num_items)
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


def states_before(h: torch.Tensor, start: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]`` states after reading events ``0..i`` -> ``[T, D]`` jagged states *before* each
    event (a learned ``start`` vector before the first): the query a next-item model uses for event i."""
    before = torch.cat([start.expand(len(h), 1, -1), h[:, :-1]], dim=1)  # [B, L, D]
    return before[valid]
