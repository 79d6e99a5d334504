"""Per-user KV caches for a service: split a batched cache into exact-length rows, stack rows back into
one padded cache, extend a cache with new events (only they run through the layers), count bytes."""

from __future__ import annotations

from dataclasses import fields

import torch

from genrec.data.batching import JaggedBatch
from genrec.nn.events import Events
from genrec.ops.layout import TokenLayout
from genrec.serve.kv_cache import KVCache, LayerCache

_LAYOUT_FIELDS = ("valid", "request", "event", "fake", "position", "timestamp")


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """``[1, n, ...]`` -> ``[1, length, ...]`` with zeros (False) after the ``n`` entries."""
    out = t.new_zeros((t.shape[0], length, *t.shape[2:]))
    out[:, :t.shape[1]] = t
    return out


def split(cache: KVCache) -> list[KVCache]:
    """A batched cache (right-padded rows) -> one cache per row at its exact length, no spare room."""
    rows = []
    for b in range(cache.events.valid.shape[0]):
        n = int(cache.events.valid[b].sum())
        tokens = int(cache.layout.valid[b].sum())
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
    events = Events(**{f.name: torch.cat([_pad_to(getattr(c.events, f.name), n) for c in caches])
                       for f in fields(Events)})
    layout = TokenLayout(**{name: torch.cat([_pad_to(getattr(c.layout, name), tokens) for c in caches])
                            for name in _LAYOUT_FIELDS}, rule=caches[0].layout.rule)
    layers = []
    for i in range(len(caches[0].layers)):
        keys = torch.cat([_pad_to(c.layers[i].keys[:, :c.layers[i].length], tokens + capacity) for c in caches])
        values = torch.cat([_pad_to(c.layers[i].values[:, :c.layers[i].length], tokens + capacity) for c in caches])
        layers.append(LayerCache(capacity, keys, values, tokens))
    return KVCache(events, layout, layers)


def extend(model, cache: KVCache, history: JaggedBatch) -> KVCache:
    """The cache of ``history`` (one row) from ``cache``, the cache of its first events: the tokens of
    the new events run through every layer reading the cached keys and values, as candidates do.
    History tokens never read later tokens, so the result equals a full re-encode of ``history``."""
    ev = Events.from_batch(history)
    x, layout = model.history_tokens(ev)  # [1, L, D]: all tokens; only the new ones are run
    old = cache.layout.valid.shape[1]
    x = x[:, old:]
    layers = []
    for block, layer in zip(model.blocks, cache.layers, strict=True):
        grown = LayerCache(x.shape[1], _pad_to(layer.keys[:, :layer.length], layout.shape[1]),
                           _pad_to(layer.values[:, :layer.length], layout.shape[1]), layer.length)
        x = block(x, layout, model.backend, grown)
        grown.capacity, grown.length = 0, layout.shape[1]
        layers.append(grown)
    return KVCache(ev, layout, layers)


def nbytes(cache: KVCache) -> int:
    """Bytes held by the cache's keys and values (the metadata is a few integers per token)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
