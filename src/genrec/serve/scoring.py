"""What the service asks of a model, through its contracts (:mod:`genrec.models.base`): score
candidates after histories, batched (``model.score``, any ranker), and, for models that keep a per-user
KV cache of the history (``model.kv_serving``: HSTU, DFGR), encode a history once, extend it with new
events and score against it.

Histories arrive as host :class:`~genrec.serve.store.History` objects of different lengths; a batch of
them is one padded call (right padding, masked out by the layouts). Per-user caches are kept at their
exact length; a batch of them is stacked into one padded cache for the scoring call.
"""

from __future__ import annotations

import numpy as np
import torch

from genrec.data.batching import JaggedBatch, collate
from genrec.models.base import RecModel
from genrec.nn import kv_cache
from genrec.nn.events import Events
from genrec.nn.kv_cache import KVCache
from genrec.serve.graphs import BucketedGraphs
from genrec.serve.store import History


def history_batch(histories: list[History], device: torch.device) -> JaggedBatch:
    """Histories -> one jagged batch (no targets), each row with its own user's dense index (never its
    position in the batch: models with a user embedding read it)."""
    return collate([h.sample() for h in histories]).to(device)


def pad_candidates(candidates: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Per-request candidate ids -> ``[B, M_max]``, padded with item 0. Candidates never read each
    other (the M-FALCON candidate mask), so padding changes no real candidate's score."""
    out = np.zeros((len(candidates), max(len(c) for c in candidates)), dtype=np.int64)
    for row, c in enumerate(candidates):
        out[row, :len(c)] = c
    return torch.from_numpy(out).to(device)


class Scorer:
    """A trained ranker behind the service. ``outputs`` names the probabilities a request gets per
    candidate, in the order of the last axis of :meth:`score`'s arrays."""

    @staticmethod
    def can_score(model: RecModel) -> bool:
        """Whether the model ranks candidates after a history: every ranker does."""
        return "ranking" in model.tasks

    def __init__(self, model: RecModel, device: torch.device, label_threshold: float,
                 graphs: BucketedGraphs | None = None):
        if not self.can_score(model):
            raise ValueError(f"{type(model).__name__} does not rank candidates after a history")
        self.model = model.eval()
        self.device = device
        self.cached = model.kv_serving is not None
        # one probability per predicted action (model.actions); a single label is named by its rule
        self.outputs = [f"rating>{label_threshold:g}"] if len(model.actions) == 1 else list(model.actions)
        self.graphs = graphs  # CUDA graphs for cold scoring (HSTU and DFGR on CUDA), or None: eager

    # ---------------------------------------------------------------------------- KV-cache models
    @torch.no_grad()
    def encode(self, histories: list[History]) -> list[KVCache]:
        """One padded encode of ``histories``, returned as exact-length per-user caches."""
        return kv_cache.split(self.model.kv_serving.encode_history(history_batch(histories, self.device), capacity=0))

    @torch.no_grad()
    def extend(self, cache: KVCache, history: History, num_new: int) -> KVCache:
        """The cache of ``history`` from ``cache``, the cache of all but its last ``num_new`` events:
        only the new events run through the layers."""
        return self.model.kv_serving.extend_history(cache, history_batch([history], self.device))

    @torch.no_grad()
    def score_cached(self, caches: list[KVCache], candidates: list[np.ndarray],
                     request_times: list[int]) -> list[np.ndarray]:
        cands = pad_candidates(candidates, self.device)
        stacked = kv_cache.stack(caches, capacity=cands.shape[1])
        when = torch.tensor(request_times, dtype=torch.long, device=self.device)
        logits = self.model.kv_serving.score_cached(stacked, cands, when)  # [B, M_max, T]
        return self._per_request(logits, candidates)

    # ---------------------------------------------------------------------------------- any ranker
    @torch.no_grad()
    def score(self, histories: list[History], candidates: list[np.ndarray],
              request_times: list[int]) -> list[np.ndarray]:
        """Cold scoring: every history runs through the model with its candidates."""
        batch = history_batch(histories, self.device)
        cands = pad_candidates(candidates, self.device)
        when = torch.tensor(request_times, dtype=torch.long, device=self.device)
        if self.graphs is not None:
            logits = self.graphs.score(Events.from_batch(batch), cands, when)
        else:
            logits = self.model.score(batch, cands, when)  # [B, M_max, T]
        return self._per_request(logits, candidates)

    def _per_request(self, logits: torch.Tensor, candidates: list[np.ndarray]) -> list[np.ndarray]:
        probs = torch.sigmoid(logits.float()).cpu().numpy()  # [B, M_max, outputs]
        return [probs[row, :len(c)] for row, c in enumerate(candidates)]
