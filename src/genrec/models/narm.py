"""NARM (Li et al., CIKM 2017): a GRU encoder whose last state (global intent) is joined with an
attention over all earlier states (local intent, ``α_ij = vᵀσ(A1 h_j + A2 h_i)``), projected to the
item space as the query for the next item. Attention is causal, so the query before event k reads
events < k only. Features used: item ids and order. A retrieval baseline of the UniGRF paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrec.data.batching import JaggedBatch, pad_jagged
from genrec.data.info import DatasetInfo
from genrec.models.base import NextItemModel, states_before
from genrec.settings import DropoutRate, Positive


@dataclass
class NARMConfig:
    d_model: Positive = 64
    dropout: DropoutRate = 0.25
    num_negatives: Positive = 128


class NARM(NextItemModel):
    def __init__(self, cfg: NARMConfig, info: DatasetInfo):
        super().__init__(info.num_items, cfg.d_model, cfg.num_negatives)
        self.cfg = cfg
        d = cfg.d_model
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.a1 = nn.Linear(d, d, bias=False)
        self.a2 = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, 1, bias=False)
        self.out = nn.Linear(2 * d, d, bias=False)  # the bilinear decoder B of the paper
        self.start = nn.Parameter(torch.zeros(d))

    def retrieval_queries(self, batch: JaggedBatch) -> torch.Tensor:
        x, valid = pad_jagged(self.item_emb(batch.items), batch.offsets, batch.max_len)  # [B, L, D]
        h, _ = self.gru(self.drop(x))  # [B, L, D]
        n = h.shape[1]
        scores = self.v(torch.sigmoid(self.a1(h)[:, None, :, :] + self.a2(h)[:, :, None, :])).squeeze(-1)  # [B, Lq, Lk]
        causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        local = (scores * causal) @ h  # [B, L, D]: weighted sum over states j <= i
        query = self.out(self.drop(torch.cat([h, local], dim=-1)))  # [B, L, D]
        return batch.at_targets(states_before(query, self.start, valid, batch.num_events))
