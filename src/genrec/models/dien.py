"""DIEN (Zhou et al., AAAI 2019): an interest-extractor GRU over the behaviour sequence, then an
interest-evolving AUGRU whose update gate is scaled by the target attention score, and an MLP over
[user, target, genres, final interest]. The paper's auxiliary next-behaviour loss is not used.
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
class DIENConfig:
    d_model: Positive = 64
    history: int = 50
    hidden: int = 128
    dropout: DropoutRate = 0.1


class AUGRUCell(nn.Module):
    """GRU cell whose update gate is multiplied by an attention score ``a``: ``u' = a · u``."""

    def __init__(self, dim: int):
        super().__init__()
        self.gates = nn.Linear(2 * dim, 2 * dim)
        self.candidate = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        u, r = torch.sigmoid(self.gates(torch.cat([x, h], -1))).chunk(2, -1)
        c = torch.tanh(self.candidate(torch.cat([x, r * h], -1)))
        u = a[:, None] * u
        return (1 - u) * h + u * c


class DIEN(CTRRanker):
    def __init__(self, cfg: DIENConfig, info: DatasetInfo):
        super().__init__(CTRFeatureEmbedding(info, cfg.d_model, cfg.history))
        d = cfg.d_model
        self.extractor = nn.GRU(d, d, batch_first=True)
        self.attention = nn.Linear(d, d, bias=False)  # bilinear score e_tᵀ W h_j
        self.evolver = AUGRUCell(d)
        self.head = mlp([4 * d, cfg.hidden, cfg.hidden // 2, len(info.signal_names)], cfg.dropout)  # a logit per signal

    def logits(self, x: CTRInputs) -> torch.Tensor:
        interests, _ = self.extractor(x.history)  # [N, H, D]; history is left-padded with zeros
        scores = (self.attention(interests) * x.target[:, None, :]).sum(-1)  # [N, H]
        scores = scores.masked_fill(~x.history_mask, float("-inf"))
        attention = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # [N, H]; rows with no history -> 0
        h = torch.zeros_like(x.target)
        for step in range(interests.shape[1]):
            h = self.evolver(interests[:, step], h, attention[:, step])
        return self.head(torch.cat([x.user, x.target, x.genres, h], dim=-1))  # [N, T]
