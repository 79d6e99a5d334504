"""GRU4Rec (Hidasi et al., ICLR 2016): a GRU over the item sequence; its state before event k is the
query for item k, trained with sampled softmax over uniform catalogue negatives (as SASRec here).
Features used: item ids and their order only. A retrieval baseline of the UniGRF paper (Table 2).
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
class GRU4RecConfig:
    d_model: Positive = 64
    num_layers: Positive = 1
    dropout: DropoutRate = 0.2
    num_negatives: Positive = 128


class GRU4Rec(NextItemModel):
    def __init__(self, cfg: GRU4RecConfig, info: DatasetInfo):
        super().__init__(info.num_items, cfg.d_model, cfg.num_negatives)
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.d_model, cfg.d_model, cfg.num_layers, batch_first=True)
        self.start = nn.Parameter(torch.zeros(cfg.d_model))

    def retrieval_queries(self, batch: JaggedBatch) -> torch.Tensor:
        x, valid = pad_jagged(self.item_emb(batch.items), batch.offsets, batch.max_len)  # [B, L, D]
        h, _ = self.gru(self.drop(x))  # right padding: a real step never reads a padded one
        return batch.at_targets(states_before(h, self.start, valid, batch.num_events))
