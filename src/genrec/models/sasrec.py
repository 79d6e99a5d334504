"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over a user's item sequence.

Features used: item ids and their order only (no actions, no time, no side features), as in the
paper. Two heads share the encoder:

* retrieval: the state after events ``< k`` is the query for item ``k``; sampled softmax over the
  true item and uniform catalogue negatives (the UniGRF paper's SASRec baseline row);
* ranking: ``MLP([h, e(x_k), h * e(x_k)])`` with ``h`` the same state predicts the binary label of
  event ``k`` (BCE). Event ``k``'s own label is never an input, since SASRec reads no actions.

The state before the first event of a window is a learned start vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genrec.data.batching import JaggedBatch, pad_jagged
from genrec.data.info import DatasetInfo
from genrec.models.base import RecModel, sampled_softmax_loss, states_before
from genrec.settings import DropoutRate, Positive, check_heads


@dataclass
class SASRecConfig:
    d_model: Positive = 64
    num_layers: Positive = 2
    num_heads: Positive = 2
    dropout: DropoutRate = 0.2
    max_len: int = 200  # positional table size; must cover data.max_len
    num_negatives: Positive = 128  # UniGRF §5.4 on ML-1M
    retrieval_weight: float = 1.0
    ranking_weight: float = 1.0

    def check(self) -> None:
        check_heads(self.d_model, self.num_heads)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # Right padding + causal: a real query never sees a padded (later) key.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # [B, H, L, Dh]
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.ffn(self.ln2(x))


class SASRec(RecModel):
    tasks = ("ranking", "retrieval")

    def __init__(self, cfg: SASRecConfig, info: DatasetInfo):
        super().__init__()
        self.cfg = cfg
        self.num_items = info.num_items
        self.item_emb = nn.Embedding(info.num_items + 1, cfg.d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.start = nn.Parameter(torch.zeros(cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.rank_head = nn.Sequential(nn.Linear(3 * cfg.d_model, cfg.d_model), nn.ReLU(),
                                       nn.Linear(cfg.d_model, 1))
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def _encode(self, batch: JaggedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``[B, L, D]`` after reading events ``0..i``, and the valid mask ``[B, L]``."""
        if batch.max_len > self.cfg.max_len:
            raise ValueError(f"sequence of {batch.max_len} events exceeds SASRec max_len={self.cfg.max_len}")
        x, valid = pad_jagged(self.item_emb(batch.items), batch.offsets, batch.max_len)  # [B, L, D]
        x = x * math.sqrt(self.cfg.d_model) + self.pos_emb.weight[: batch.max_len]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x), valid

    def states_before(self, batch: JaggedBatch) -> torch.Tensor:
        """``[T, D]``: for each event, the encoder state after the events before it."""
        h, valid = self._encode(batch)
        return states_before(h, self.start, valid, batch.num_events)  # [T, D] jagged

    def _rank(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        e = self.item_emb(items)
        return self.rank_head(torch.cat([h, e, h * e], dim=-1)).squeeze(-1)

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        h = batch.at_targets(self.states_before(batch))  # [N, D]
        items = batch.at_targets(batch.items)
        retrieval = sampled_softmax_loss(h, items, self.item_emb.weight, self.cfg.num_negatives, self.num_items)
        ranking = F.binary_cross_entropy_with_logits(self._rank(h, items).float(), batch.at_targets(batch.labels))
        loss = self.cfg.retrieval_weight * retrieval + self.cfg.ranking_weight * ranking
        return {"loss": loss, "retrieval_loss": retrieval.detach(), "ranking_loss": ranking.detach()}

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:
        return self._rank(batch.at_targets(self.states_before(batch)), batch.at_targets(batch.items))

    def retrieval_queries(self, batch: JaggedBatch) -> torch.Tensor:
        return batch.at_targets(self.states_before(batch))

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    def score(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """The ranking head on the state after each whole history and each candidate, ``[B, M, 1]``.
        SASRec reads no time, so ``request_time`` is unused; it reads no actions either, so (unlike
        the generative rankers) training lets an event read the items of its own request before it,
        and the two agree for a request's first event (tests/models/test_contracts.py)."""
        h, valid = self._encode(history)
        last = valid.sum(1) - 1  # [B]; -1: no history, the start vector is the state
        state = h[torch.arange(len(last), device=h.device), last.clamp(min=0)]  # [B, D]
        state = torch.where(last[:, None] >= 0, state, self.start)
        return self._rank(state[:, None, :].expand(*candidates.shape, -1), candidates)[..., None]
