"""Event embeddings: item, action (with reserved placeholder actions), position, request index and
pre-request time gap (GenRank §4.2, eq. 1)."""

from __future__ import annotations

import torch
from torch import nn

from genrec.ops.masks import time_bucket

ACTION_ENCODINGS = ("joint", "sum", "linear")


class ActionEmbedding(nn.Module):
    """Real actions ``0..A-1`` plus one learned placeholder at index ``A``: the fake-flow action F
    of DFGR and the mask action M of GenRank / SFGR candidates.

    With several signals per event, an action is the joint code ``sum_s 2^s b_s`` of the observed
    binary signals (:mod:`genrec.data.store`) and ``encoding`` says how the action vector is embedded:
    ``joint`` one row per combination; ``sum`` the sum of one embedding per (signal, value), the
    papers' action embeddings; ``linear`` a learned combination ``W b + c`` of the signal vector.
    """

    def __init__(self, num_actions: int, dim: int, num_signals: int = 1, encoding: str = "joint"):
        super().__init__()
        if encoding not in ACTION_ENCODINGS:
            raise ValueError(f"action_encoding must be one of {ACTION_ENCODINGS}, got {encoding!r}")
        if encoding != "joint" and num_actions != 2 ** num_signals:
            raise ValueError(f"action_encoding {encoding!r} needs actions that are joint codes of the signals "
                             f"({2 ** num_signals} for {num_signals} signals), the data has {num_actions} actions")
        self.placeholder = num_actions
        self.encoding = encoding
        self.register_buffer("bits", 2 ** torch.arange(num_signals), persistent=False)
        if encoding == "joint":
            self.table = nn.Embedding(num_actions + 1, dim)
            nn.init.normal_(self.table.weight, std=0.02)
        else:
            rows = 2 * num_signals if encoding == "sum" else num_signals  # sum: (signal, value) rows
            self.signal_table = nn.Parameter(torch.randn(rows, dim) * 0.02)
            self.offset = nn.Parameter(torch.zeros(dim))
            self.placeholder_emb = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, actions: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Embed ``actions`` ``[...]`` -> ``[..., D]``; where ``hidden`` is True use the placeholder instead."""
        if self.encoding == "joint":
            if hidden is not None:
                actions = torch.where(hidden, torch.full_like(actions, self.placeholder), actions)
            return self.table(actions)
        signals = ((actions[..., None] & self.bits) > 0).to(self.signal_table.dtype)  # [..., S]
        if self.encoding == "sum":
            onehot = torch.stack([1 - signals, signals], dim=-1).flatten(-2)  # [..., 2S] (s, value) indicators
            out = onehot @ self.signal_table + self.offset
        else:
            out = signals @ self.signal_table + self.offset
        if hidden is not None:
            out = torch.where(hidden[..., None], self.placeholder_emb.to(out.dtype), out)
        return out


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
