"""Action heads on a target's hidden state: the main binary task (the dataset label, e.g. rating > 3),
optional extra binary tasks (rating > threshold_i) and an optional multi-class head over the rating
classes, so multi-action logs (click, like, ...) fit the same shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ActionHeads(nn.Module):
    def __init__(self, dim: int, rating_values: list[float], extra_thresholds: tuple[float, ...] = (),
                 multiclass_weight: float = 0.0):
        super().__init__()
        self.num_binary = 1 + len(extra_thresholds)
        self.multiclass_weight = multiclass_weight
        self.register_buffer("ratings", torch.tensor(rating_values, dtype=torch.float32), persistent=False)
        self.register_buffer("thresholds", torch.tensor(list(extra_thresholds), dtype=torch.float32),
                             persistent=False)
        num_out = self.num_binary + (len(rating_values) if multiclass_weight > 0 else 0)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, num_out))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, outputs]
        return self.mlp(hidden)

    def main_logit(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs[:, 0]

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        if outputs.dtype in (torch.float16, torch.bfloat16):
            outputs = outputs.float()  # losses in at least fp32 under autocast
        labels = labels.to(outputs.dtype)
        losses = {"ranking_loss": F.binary_cross_entropy_with_logits(outputs[:, 0], labels)}
        total = losses["ranking_loss"]
        if len(self.thresholds):
            extra = (self.ratings[actions][:, None] > self.thresholds[None, :]).to(outputs.dtype)
            losses["extra_binary_loss"] = F.binary_cross_entropy_with_logits(outputs[:, 1: self.num_binary], extra)
            total = total + losses["extra_binary_loss"]
        if self.multiclass_weight > 0:
            losses["multiclass_loss"] = F.cross_entropy(outputs[:, self.num_binary:], actions)
            total = total + self.multiclass_weight * losses["multiclass_loss"]
        return {"loss": total} | {k: v.detach() for k, v in losses.items()}
