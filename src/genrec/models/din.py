"""DIN (Zhou et al., KDD 2018): target attention over the behaviour sequence with the activation
unit ``MLP([e_b, e_t, e_b − e_t, e_b ⊙ e_t])`` (weights not softmax-normalised, as in the paper),
then an MLP over [user, target, genres, attended interest]. Features: :mod:`genrec.nn.ctr`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genrec.data.info import DatasetInfo
from genrec.models.ctr import CTRRanker
from genrec.nn.ctr import CTRFeatureEmbedding, CTRInputs, mlp
from genrec.settings import DropoutRate, Positive


@dataclass
class DINConfig:
    d_model: Positive = 64
    history: int = 50  # most recent behaviours of earlier requests
    hidden: int = 128
    dropout: DropoutRate = 0.1


class DIN(CTRRanker):
    def __init__(self, cfg: DINConfig, info: DatasetInfo):
        super().__init__(CTRFeatureEmbedding(info, cfg.d_model, cfg.history))
        d = cfg.d_model
        self.activation_unit = mlp([4 * d, cfg.hidden // 2, 1], 0.0)
        self.head = mlp([4 * d, cfg.hidden, cfg.hidden // 2, len(info.signal_names)], cfg.dropout)  # a logit per signal

    def logits(self, x: CTRInputs) -> torch.Tensor:
        target = x.target[:, None, :].expand_as(x.history)  # [N, H, D]
        unit_in = torch.cat([x.history, target, x.history - target, x.history * target], dim=-1)
        weights = self.activation_unit(unit_in).squeeze(-1) * x.history_mask  # [N, H]
        interest = (weights[..., None] * x.history).sum(1)  # [N, D]
        return self.head(torch.cat([x.user, x.target, x.genres, interest], dim=-1))  # [N, T]
