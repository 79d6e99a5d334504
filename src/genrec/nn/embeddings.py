"""Event embeddings: item, action (with reserved placeholder actions), position, request index and
pre-request time gap (GenRank §4.2, eq. 1)."""

from __future__ import annotations

import torch
from torch import nn

from genrec.ops.masks import time_bucket


class ActionEmbedding(nn.Module):
    """Real actions ``0..A-1`` plus one learned placeholder at index ``A``: the fake-flow action F
    of DFGR and the mask action M of GenRank / SFGR candidates."""

    def __init__(self, num_actions: int, dim: int):
        super().__init__()
        self.placeholder = num_actions
        self.table = nn.Embedding(num_actions + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, actions: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Embed ``actions``; where ``hidden`` is True use the placeholder instead."""
        if hidden is not None:
            actions = torch.where(hidden, torch.full_like(actions, self.placeholder), actions)
        return self.table(actions)


class TimeGapEmbedding(nn.Module):
    """Bucketed time since the previous request (bucket 0: no previous request)."""

    def __init__(self, dim: int, num_buckets: int = 32):
        super().__init__()
        self.num_buckets = num_buckets
        self.table = nn.Embedding(num_buckets + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, timestamp: torch.Tensor, prev_request_time: torch.Tensor) -> torch.Tensor:
        bucket = time_bucket(timestamp - prev_request_time, self.num_buckets) + 1
        return self.table(torch.where(prev_request_time < 0, torch.zeros_like(bucket), bucket))
