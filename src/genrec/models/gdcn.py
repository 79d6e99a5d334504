"""GDCN (Wang et al., CIKM 2023): the gated cross network
``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) ⊙ σ(W^g_l x_l) + x_l`` stacked before a deep MLP, over the
concatenated fields [user, target, genres, mean behaviour]. Features: :mod:`genrec.nn.ctr`.
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
class GDCNConfig:
    d_model: Positive = 64
    history: int = 50
    cross_layers: int = 3
    hidden: int = 128
    dropout: DropoutRate = 0.1


class GDCN(CTRRanker):
    def __init__(self, cfg: GDCNConfig, info: DatasetInfo):
        super().__init__(CTRFeatureEmbedding(info, cfg.d_model, cfg.history))
        width = 4 * cfg.d_model
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(cfg.cross_layers))
        self.gates = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(cfg.cross_layers))
        self.deep = mlp([width, cfg.hidden, cfg.hidden // 2, len(info.signal_names)], cfg.dropout)  # a logit per signal

    def logits(self, x: CTRInputs) -> torch.Tensor:
        x0 = x.fields().flatten(1)  # [N, 4D]
        xl = x0
        for layer, gate in zip(self.cross, self.gates, strict=True):
            xl = x0 * layer(xl) * torch.sigmoid(gate(xl)) + xl
        return self.deep(xl)  # [N, T]
