"""Candidate scoring replayed as CUDA graphs.

Scoring one request is a few hundred small kernels: per layer the projections, norms, gating and
attention, plus building the candidates' token layout and tile schedule. Below a few thousand history
events their launch cost, not the GPU, sets the latency. :class:`GraphedServing` records them once per
shape (history length, candidates per request, micro-batch) and replays them, so a request costs its
GPU time plus a few input copies.

Two graphs share one static KV cache: ``encode`` runs a history through every layer into it, ``score``
scores candidates against it in micro-batches (the eager :func:`genrec.nn.kv_cache.in_micro_batches`
over ``model.kv_serving.score_cached``). Cold serving is encode then score; a user whose history is
already encoded is score alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch

from genrec.models.base import RecModel
from genrec.nn.events import Events
from genrec.nn.kv_cache import in_micro_batches
from genrec.ops.layout import check_time_span


def _capture(fn: Callable[[], torch.Tensor | object], dtype: torch.dtype):
    """Run ``fn`` once on a side stream (compiles the Triton kernels, settles the allocator), then
    record it. Returns the graph and what the recorded call returned (its tensors are the outputs)."""
    autocast = torch.autocast("cuda", dtype=dtype, cache_enabled=False)  # a cached cast would outlive the graph
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), autocast:
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast:
        out = fn()
    return graph, out


class GraphedServing:
    """Serve ``model`` for histories shaped like ``events`` (``[B, N]``) and ``num_candidates``
    candidates per row, scored in micro-batches of ``micro_batch`` (default: all at once)."""

    def __init__(self, model: RecModel, events: Events, num_candidates: int,
                 micro_batch: int | None = None, dtype: torch.dtype = torch.bfloat16):
        if not events.valid.is_cuda:
            raise ValueError("GraphedServing needs the model and events on a CUDA device")
        if model.training:
            raise ValueError("GraphedServing records inference: call model.eval() first")
        if model.kv_serving is None:
            raise ValueError(f"{type(model).__name__} keeps no history KV cache to serve from")
        serving = model.kv_serving
        self.events = Events(**{f.name: getattr(events, f.name).clone() for f in fields(Events)})
        b = events.valid.shape[0]
        self.candidates = torch.ones(b, num_candidates, dtype=torch.long, device=events.valid.device)
        self.request_time = events.timestamp[:, -1].clone()  # [B]
        step = micro_batch or num_candidates
        with torch.no_grad():
            self._encode, self.cache = _capture(lambda: serving.encode_events(self.events, step), dtype)
            self._score, self.logits = _capture(
                lambda: in_micro_batches(serving.score_cached, self.cache, self.candidates, self.request_time), dtype)

    def encode(self, events: Events) -> None:
        """Encode a new history (same shape) into the cache."""
        for f in fields(Events):
            new, static = getattr(events, f.name), getattr(self.events, f.name)
            if new.shape != static.shape:
                raise ValueError(f"events.{f.name} has shape {tuple(new.shape)}; this graph was recorded for "
                                 f"{tuple(static.shape)}")
            static.copy_(new)
        check_time_span(torch.cat([self.events.timestamp.flatten(), self.request_time]))
        self._encode.replay()

    def score(self, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, M, T]`` of ``candidates`` ``[B, M]`` as the next request at ``request_time``
        ``[B]``, against the history encoded last (as the model's ``score``)."""
        if candidates.shape != self.candidates.shape:
            raise ValueError(f"candidates have shape {tuple(candidates.shape)}; this graph was recorded for "
                             f"{tuple(self.candidates.shape)}")
        self.candidates.copy_(candidates)
        self.request_time.copy_(request_time)
        check_time_span(torch.cat([self.events.timestamp.flatten(), self.request_time]))  # the layout's tokens
        self._score.replay()
        return self.logits.clone()

    def cold(self, events: Events, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """Encode ``events`` and score ``candidates`` after them: a request of a user seen cold."""
        self.encode(events)
        return self.score(candidates, request_time)


def bucket(size: int, limit: int) -> int:
    """The smallest power of two >= ``size``, at most ``limit`` (the shapes graphs are recorded for)."""
    if not 1 <= size <= limit:
        raise ValueError(f"size {size} is outside 1..{limit}")
    return min(1 << (size - 1).bit_length(), limit)


def pad_events(ev: Events, batch: int, length: int) -> Events:
    """``[B, N]`` events -> ``[batch, length]``: invalid events after each row, then copies of the last
    row (a copy scores like its original, so no row is ever empty inside a graph)."""
    def pad(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((t.shape[0], length))
        out[:, :t.shape[1]] = t
        return torch.cat([out, out[-1:].expand(batch - t.shape[0], length)])

    padded = {f.name: pad(getattr(ev, f.name)) for f in fields(Events)}
    padded["position"] = torch.arange(length, device=ev.valid.device).expand(batch, length)  # as from_batch
    return Events(**padded)


def pad_rows(t: torch.Tensor, batch: int, width: int | None = None) -> torch.Tensor:
    """``[B]`` or ``[B, M]`` -> ``[batch(, width)]`` repeating the last row and the last column."""
    if t.ndim == 2 and width is not None:
        t = torch.cat([t, t[:, -1:].expand(t.shape[0], width - t.shape[1])], dim=1)
    return torch.cat([t, t[-1:].expand(batch - t.shape[0], *t.shape[1:])])


class BucketedGraphs:
    """Cold scoring (encode + score) of any batch through :class:`GraphedServing` graphs recorded on
    first use for power-of-two buckets of (batch, history length, candidates): a batch is padded to its
    bucket (:func:`pad_events`, :func:`pad_rows`), replayed, and cut back. At most ``max_graphs``
    graphs are kept (least recently used dropped)."""

    def __init__(self, model: RecModel, max_batch: int, max_history: int, max_candidates: int,
                 dtype: torch.dtype = torch.float32, max_graphs: int = 16):
        self.model, self.dtype, self.max_graphs = model, dtype, max_graphs
        self.limits = (max_batch, max_history, max_candidates)
        self.graphs: dict[tuple[int, int, int], GraphedServing] = {}

    def score(self, events: Events, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, M, T]``, as the eager ``kv_serving.encode_events`` + ``in_micro_batches``."""
        (b, n), m = events.valid.shape, candidates.shape[1]
        key = tuple(bucket(size, limit) for size, limit in zip((b, n, m), self.limits, strict=True))
        padded = pad_events(events, key[0], key[1])
        graph = self.graphs.pop(key, None) or GraphedServing(self.model, padded, key[2], dtype=self.dtype)
        self.graphs[key] = graph  # most recent last
        while len(self.graphs) > self.max_graphs:
            del self.graphs[next(iter(self.graphs))]
        logits = graph.cold(padded, pad_rows(candidates, key[0], key[2]), pad_rows(request_time, key[0]))
        return logits[:b, :m]
