"""DCN-v2 (Wang et al., WWW 2021): a cross network ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l`` and a
deep MLP in parallel over the concatenated fields [user, target, genres, mean behaviour].
Features: :mod:`genrec.nn.ctr`.
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
class DCNv2Config:
    d_model: Positive = 64
    history: int = 50
    cross_layers: int = 3
    hidden: int = 128
    dropout: DropoutRate = 0.1


class DCNv2(CTRRanker):
    def __init__(self, cfg: DCNv2Config, info: DatasetInfo):
        super().__init__(CTRFeatureEmbedding(info, cfg.d_model, cfg.history))
        width = 4 * cfg.d_model
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(cfg.cross_layers))
        self.deep = mlp([width, cfg.hidden, cfg.hidden], cfg.dropout)
        self.out = nn.Linear(width + cfg.hidden, len(info.signal_names))  # a logit per signal

    def logits(self, x: CTRInputs) -> torch.Tensor:
        x0 = x.fields().flatten(1)  # [N, 4D]
        xl = x0
        for layer in self.cross:
            xl = x0 * layer(xl) + xl
        return self.out(torch.cat([xl, torch.relu(self.deep(x0))], dim=-1))  # [N, T]
