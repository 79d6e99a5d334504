"""Candidate scoring replayed as CUDA graphs.

Scoring one request is a few hundred small kernels: per layer the projections, norms, gating and
attention, plus building the candidates' token layout and tile schedule. Below a few thousand history
events their launch cost, not the GPU, sets the latency. :class:`GraphedServing` records them once per
shape (history length, candidates per request, micro-batch) and replays them, so a request costs its
GPU time plus a few input copies.

Two graphs share one static KV cache: ``encode`` runs a history through every layer into it, ``score``
scores candidates against it in micro-batches (the eager :meth:`score_micro_batches`). Cold serving is
encode then score; a user whose history is already encoded is score alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch

from genrec.models.generative import CachedServingRanker
from genrec.nn.events import Events
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

    def __init__(self, model: CachedServingRanker, events: Events, num_candidates: int,
                 micro_batch: int | None = None, dtype: torch.dtype = torch.bfloat16):
        if not events.valid.is_cuda:
            raise ValueError("GraphedServing needs the model and events on a CUDA device")
        if model.training:
            raise ValueError("GraphedServing records inference: call model.eval() first")
        self.events = Events(**{f.name: getattr(events, f.name).clone() for f in fields(Events)})
        b = events.valid.shape[0]
        self.candidates = torch.ones(b, num_candidates, dtype=torch.long, device=events.valid.device)
        self.request_time = events.timestamp[:, -1].clone()  # [B]
        step = micro_batch or num_candidates
        with torch.no_grad():
            self._encode, self.cache = _capture(lambda: model.encode_events(self.events, step), dtype)
            self._score, self.logits = _capture(
                lambda: model.score_micro_batches(self.cache, self.candidates, self.request_time), dtype)

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
        """Main-task logits ``[B, M]`` of ``candidates`` ``[B, M]`` as the next request at
        ``request_time`` ``[B]``, against the history encoded last."""
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
