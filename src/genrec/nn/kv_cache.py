"""Per-layer key/value cache for scoring candidates after a history that was encoded once.

History tokens never read later tokens (every mask rule is causal in that sense), so their keys and
values at every layer are the same whether or not candidates follow. A :class:`KVCache` keeps them
in buffers with room for ``capacity`` new tokens after the history; scoring a micro-batch of
candidates writes its keys/values into that room and runs attention for the new tokens only
(``q_offset`` = history length) — the next micro-batch overwrites them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from genrec.nn.events import Events
from genrec.ops.layout import TokenLayout


@dataclass
class LayerCache:
    capacity: int  # new tokens that fit after the history
    keys: torch.Tensor | None = None  # [B, N + capacity, D]
    values: torch.Tensor | None = None
    length: int = 0  # history tokens held (N once committed)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store the new tokens' ``k, v`` ``[B, n, D]`` after the history; return the keys and values
        of history + new tokens and the index of the first new token (the queries' offset)."""
        b, n, d = k.shape
        if self.keys is None:
            self.keys = k.new_empty(b, n + self.capacity, d)
            self.values = v.new_empty(b, n + self.capacity, d)
        end = self.length + n
        if end > self.keys.shape[1]:
            raise ValueError(f"{n} new tokens do not fit the cache's capacity of {self.capacity}")
        self.keys[:, self.length:end] = k
        self.values[:, self.length:end] = v
        return self.keys[:, :end], self.values[:, :end], self.length


@dataclass
class KVCache:
    events: Events  # the history's events
    layout: TokenLayout  # the history's tokens
    layers: list[LayerCache] = field(default_factory=list)

    @classmethod
    def empty(cls, events: Events, layout: TokenLayout, num_layers: int, capacity: int) -> KVCache:
        return cls(events, layout, [LayerCache(capacity) for _ in range(num_layers)])

    def commit(self) -> None:
        """Freeze what was written so far as the history."""
        for layer in self.layers:
            layer.length = layer.keys.shape[1] - layer.capacity
