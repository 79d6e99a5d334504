"""What the generative rankers (HSTU, GenRank, DFGR, SFGR) share: heads, losses and scoring.

Each model only says how it turns a batch into hidden states at its target events
(:meth:`GenerativeRanker.target_hidden`); losses are taken only there, the predictions read only
there. Every target's hidden state depends on the actions of earlier requests only (tested).
"""

from __future__ import annotations

import torch

from genrec.data.batching import JaggedBatch
from genrec.data.info import DatasetInfo
from genrec.models.base import RecModel
from genrec.nn import kv_cache
from genrec.nn.events import Events, append_candidates
from genrec.nn.heads import ActionHeads
from genrec.nn.kv_cache import KVCache
from genrec.ops.layout import TokenLayout


class GenerativeRanker(RecModel):
    tasks = ("ranking",)

    def __init__(self, dim: int, info: DatasetInfo, cfg):
        """``cfg``: the model's config, read for its head settings (``extra_thresholds``,
        ``multiclass_weight``, ``task_weights``, ``task_head``, ``num_experts``)."""
        super().__init__()
        self.signal_names = list(info.signal_names)
        self.heads = ActionHeads(dim, info.rating_values, tuple(cfg.extra_thresholds), cfg.multiclass_weight,
                                 self.signal_names, tuple(cfg.task_weights), cfg.task_head, cfg.num_experts)

    def target_hidden(self, batch: JaggedBatch) -> torch.Tensor:  # [num_targets, D], flat target order
        raise NotImplementedError

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        outputs = self.heads(self.target_hidden(batch))
        return self.heads.loss(outputs, batch.signals[batch.target_mask], batch.actions[batch.target_mask])

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:
        return self.heads.main_logit(self.heads(self.target_hidden(batch)))

    def task_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [num_targets, T], one logit per signal
        return self.heads.task_logits(self.heads(self.target_hidden(batch)))


class CachedServingRanker(GenerativeRanker):
    """Serving for rankers built of HSTU blocks (HSTU, DFGR): the history runs once and leaves a
    per-layer KV cache; candidates of the next request are then scored against it in micro-batches,
    each candidate reading the history and itself only (the M-FALCON candidate mask). A subclass says
    how events become history tokens and how candidates become tokens."""

    candidates_are_fake = False  # dual-flow models score candidates as fake-flow tokens

    def history_tokens(self, ev: Events) -> tuple[torch.Tensor, TokenLayout]:  # [B, N_tok, D] and layout
        raise NotImplementedError

    def candidate_tokens(self, candidates: torch.Tensor) -> torch.Tensor:  # [B, M] ids -> [B, M, D]
        raise NotImplementedError

    def encode_history(self, history: JaggedBatch, capacity: int) -> KVCache:
        """Run ``history`` through every layer once; the cache has room for ``capacity`` candidates."""
        return self.encode_events(Events.from_batch(history), capacity)

    def encode_events(self, ev: Events, capacity: int) -> KVCache:
        """:meth:`encode_history` from padded events: no device-to-host sync, so it can be captured
        in a CUDA graph (:mod:`genrec.serve.graphs`)."""
        x, layout = self.history_tokens(ev)
        cache = KVCache.empty(ev, layout, len(self.blocks), capacity)
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x = block(x, layout, self.backend, layer)
        cache.commit()
        return cache

    def extend_history(self, cache: KVCache, history: JaggedBatch) -> KVCache:
        """The cache of ``history`` (one row) from ``cache``, the cache of its first events: only the
        new events' tokens run through the layers (incremental serving, :func:`kv_cache.extend`)."""
        ev = Events.from_batch(history)
        x, layout = self.history_tokens(ev)  # [1, L, D]; the first cache.layout.shape[1] tokens are cached
        return kv_cache.extend(cache, self.blocks, self.backend, x[:, cache.layout.shape[1]:], ev, layout)

    def score_cached(self, cache: KVCache, candidates: torch.Tensor,
                     request_time: torch.Tensor | None = None) -> torch.Tensor:
        """Main-task logits ``[B, M]`` of ``candidates`` ``[B, M]`` (M <= the cache's capacity) as the
        next request at ``request_time`` ``[B]`` (default: the last event's time)."""
        b, m = candidates.shape
        layout = append_candidates(cache.layout, cache.events, m, request_time, fake=self.candidates_are_fake)
        x = self.candidate_tokens(candidates)
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x = block(x, layout, self.backend, layer)
        return self.heads.main_logit(self.heads(self.norm(x).reshape(b * m, -1))).view(b, m)

    def serve_logits(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor,
                     micro_batch: int | None = None) -> torch.Tensor:
        """Cold scoring: encode ``history``, then score ``candidates`` ``[B, M]`` in micro-batches."""
        step = micro_batch or candidates.shape[1]
        return self.score_micro_batches(self.encode_history(history, step), candidates, request_time)

    def score_micro_batches(self, cache: KVCache, candidates: torch.Tensor,
                            request_time: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`score_cached` over ``candidates`` ``[B, M]`` in micro-batches of the cache's capacity."""
        step = cache.layers[0].capacity
        return torch.cat([self.score_cached(cache, candidates[:, i:i + step], request_time)
                          for i in range(0, candidates.shape[1], step)], dim=1)
