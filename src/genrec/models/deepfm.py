"""DeepFM (Guo et al., IJCAI 2017): first-order terms + FM second-order interactions between the
field embeddings + a deep MLP, sharing the embeddings. Fields: user, target item, target genres,
mean behaviour. Features: :mod:`genrec.nn.ctr`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrec.data.info import DatasetInfo
from genrec.models.ctr import CTRRanker
from genrec.nn.ctr import CTRFeatureEmbedding, CTRInputs, mlp
from genrec.settings import DropoutRate, Positive


@dataclass
class DeepFMConfig:
    d_model: Positive = 64
    history: int = 50
    hidden: int = 128
    dropout: DropoutRate = 0.1


class DeepFM(CTRRanker):
    def __init__(self, cfg: DeepFMConfig, info: DatasetInfo):
        super().__init__(CTRFeatureEmbedding(info, cfg.d_model, cfg.history))
        self.first_order = nn.Linear(4 * cfg.d_model, len(info.signal_names))  # a logit per signal
        self.deep = mlp([4 * cfg.d_model, cfg.hidden, cfg.hidden // 2, len(info.signal_names)], cfg.dropout)

    def logits(self, x: CTRInputs) -> torch.Tensor:
        fields = x.fields()  # [N, F, D]
        second_order = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(-1)  # [N]
        flat = fields.flatten(1)
        return self.first_order(flat) + self.deep(flat) + second_order[:, None]  # [N, T], FM term shared
