"""Per-layer key/value cache for scoring candidates after a history that was encoded once.

History tokens never read later tokens (every mask rule is causal in that sense), so their keys and
values at every layer are the same whether or not candidates follow. A :class:`KVCache` keeps them
in buffers with room for ``capacity`` new tokens after the history; scoring a micro-batch of
candidates writes its keys/values into that room and runs attention for the new tokens only
(``q_offset`` = history length) — the next micro-batch overwrites them.

Serving with a cache is a small object a model composes (HSTU and DFGR do, with their HSTU blocks):
:class:`KVServing` is built from the model's blocks and three functions of it (history tokens,
candidate tokens, read-out), and encodes a history once, extends it with new events, and scores
candidates against it; :func:`in_micro_batches` scores many candidates through a cache that holds a
few at a time (the M-FALCON schedule). The model exposes it as ``model.kv_serving``.

A service keeps one exact-length cache per user (:func:`split`), stacks the caches of a batch of
requests into one padded cache (:func:`stack`) and grows a user's cache with new events
(:func:`extend`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from genrec.data.batching import JaggedBatch
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


class CachedBlock(Protocol):
    """A block that, given a :class:`LayerCache`, adds its new tokens' keys and values to it and lets
    them read the cached ones (:class:`genrec.nn.hstu.HSTUBlock`)."""

    def __call__(self, x: torch.Tensor, layout: TokenLayout, cache: LayerCache | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class KVServing:
    """Serving against a per-user history cache, for a model of :class:`CachedBlock` s.

    ``history_tokens(events)`` -> the history's tokens ``[B, N_tok, D]`` and layout;
    ``candidate_tokens(candidates [B, M], cache, request_time [B])`` -> the candidates' tokens
    ``[B, M, D]`` and the layout of history + candidates; ``readout(hidden [B, M, D])`` -> logits
    ``[B, M, T]``, as the model's ``score`` returns them.
    """

    blocks: Sequence[CachedBlock]
    history_tokens: Callable[[Events], tuple[torch.Tensor, TokenLayout]]
    candidate_tokens: Callable[[torch.Tensor, KVCache, torch.Tensor], tuple[torch.Tensor, TokenLayout]]
    readout: Callable[[torch.Tensor], torch.Tensor]

    def encode_events(self, events: Events, capacity: int) -> KVCache:
        """Run the history through every block once; the cache has room for ``capacity`` new tokens.
        No device-to-host sync, so it can be recorded in a CUDA graph (:mod:`genrec.serve.graphs`)."""
        x, layout = self.history_tokens(events)
        cache = KVCache.empty(events, layout, len(self.blocks), capacity)
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x = block(x, layout, layer)
        cache.commit()
        return cache

    def encode_history(self, history: JaggedBatch, capacity: int) -> KVCache:
        return self.encode_events(Events.from_batch(history), capacity)

    def extend_history(self, cache: KVCache, history: JaggedBatch) -> KVCache:
        """The cache of ``history`` (one row) from ``cache``, the cache of its first events: only the
        new events' tokens run through the blocks (incremental serving, :func:`extend`)."""
        ev = Events.from_batch(history)
        x, layout = self.history_tokens(ev)  # [1, L, D]; the first cache.layout.shape[1] tokens are cached
        return extend(cache, self.blocks, x[:, cache.layout.shape[1]:], ev, layout)

    def score_cached(self, cache: KVCache, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, M, T]`` of ``candidates`` ``[B, M]`` (M <= the cache's capacity) as the next
        request at ``request_time`` ``[B]``, against the cached history."""
        x, layout = self.candidate_tokens(candidates, cache, request_time)
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x = block(x, layout, layer)
        return self.readout(x)

    def score(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """Cold scoring, the model's ``score``: encode ``history`` with room for all candidates, then
        score them against it."""
        return self.score_cached(self.encode_history(history, candidates.shape[1]), candidates, request_time)


ScoreCached = Callable[[KVCache, torch.Tensor, torch.Tensor], torch.Tensor]


def in_micro_batches(score_cached: ScoreCached, cache: KVCache, candidates: torch.Tensor,
                     request_time: torch.Tensor) -> torch.Tensor:
    """``score_cached(cache, chunk, request_time)`` over ``candidates`` ``[B, M]`` in chunks of the
    cache's capacity, concatenated along the candidates: ``[B, M, ...]``."""
    step = cache.layers[0].capacity
    return torch.cat([score_cached(cache, candidates[:, i:i + step], request_time)
                      for i in range(0, candidates.shape[1], step)], dim=1)


_LAYOUT_FIELDS = ("valid", "request", "event", "fake", "position", "timestamp")


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """``[1, n, ...]`` -> ``[1, length, ...]`` with zeros (False) after the ``n`` entries."""
    out = t.new_zeros((t.shape[0], length, *t.shape[2:]))
    out[:, :t.shape[1]] = t
    return out


def _stacked(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """``[1, n_b, ...]`` rows -> ``[B, length, ...]`` with zeros (False) after each row's entries: one
    ``pad_sequence`` per field, not an allocation and a copy per row (this runs per scoring call)."""
    out = pad_sequence([r[0] for r in rows], batch_first=True)
    if out.shape[1] < length:
        out = torch.cat([out, out.new_zeros((out.shape[0], length - out.shape[1], *out.shape[2:]))], dim=1)
    return out


def split(cache: KVCache) -> list[KVCache]:
    """A batched cache (right-padded rows) -> one cache per row at its exact length, no spare room."""
    rows = []
    events_per_row = cache.events.valid.sum(1).tolist()  # one device read for the batch, not two per row
    tokens_per_row = cache.layout.valid.sum(1).tolist()
    for b, (n, tokens) in enumerate(zip(events_per_row, tokens_per_row, strict=True)):
        events = Events(**{f.name: getattr(cache.events, f.name)[b:b + 1, :n] for f in fields(Events)})
        layout = TokenLayout(**{name: getattr(cache.layout, name)[b:b + 1, :tokens] for name in _LAYOUT_FIELDS},
                             rule=cache.layout.rule)
        layers = [LayerCache(0, layer.keys[b:b + 1, :tokens].clone(), layer.values[b:b + 1, :tokens].clone(), tokens)
                  for layer in cache.layers]
        rows.append(KVCache(events, layout, layers))
    return rows


def stack(caches: list[KVCache], capacity: int) -> KVCache:
    """Exact-length per-user caches -> one cache ``[B, L_max + capacity]``, right-padded (padding is
    invalid in the layout and zero in the keys and values, so it reads as nothing)."""
    n = max(c.events.valid.shape[1] for c in caches)
    tokens = max(c.layout.valid.shape[1] for c in caches)
    events = Events(**{f.name: _stacked([getattr(c.events, f.name) for c in caches], n) for f in fields(Events)})
    layout = TokenLayout(**{name: _stacked([getattr(c.layout, name) for c in caches], tokens)
                            for name in _LAYOUT_FIELDS}, rule=caches[0].layout.rule)
    layers = []
    for i in range(len(caches[0].layers)):
        keys = _stacked([c.layers[i].keys[:, :c.layers[i].length] for c in caches], tokens + capacity)
        values = _stacked([c.layers[i].values[:, :c.layers[i].length] for c in caches], tokens + capacity)
        layers.append(LayerCache(capacity, keys, values, tokens))
    return KVCache(events, layout, layers)


def extend(cache: KVCache, blocks: Sequence[CachedBlock], new_tokens: torch.Tensor, events: Events,
           layout: TokenLayout) -> KVCache:
    """The cache of a longer history (one row): ``events`` and ``layout`` describe the whole history,
    ``cache`` holds its first tokens and ``new_tokens`` ``[1, n, D]`` are the embeddings of the rest.
    Only the new tokens run through ``blocks``, reading the cached keys and values as candidates do.
    History tokens never read later tokens, so the result equals a full re-encode (tested)."""
    total, x = layout.shape[1], new_tokens
    if cache.layout.valid.shape[1] + x.shape[1] != total:
        raise ValueError(f"{cache.layout.valid.shape[1]} cached + {x.shape[1]} new tokens != {total} in the layout")
    layers = []
    for block, layer in zip(blocks, cache.layers, strict=True):
        grown = LayerCache(x.shape[1], _pad_to(layer.keys[:, :layer.length], total),
                           _pad_to(layer.values[:, :layer.length], total), layer.length)
        x = block(x, layout, grown)
        grown.capacity, grown.length = 0, total
        layers.append(grown)
    return KVCache(events, layout, layers)


def nbytes(cache: KVCache) -> int:
    """Bytes held by the cache's keys and values (the metadata is a few integers per token)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
