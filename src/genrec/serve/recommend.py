"""Top-K recommendation for one user from a trained retrieval model (``genrec recommend``).

The query is the model's retrieval query for a next event appended after the user's latest
``max_len`` events (a placeholder: every retrieval model's query for event k reads only events
before k, which the leakage tests check). The whole catalogue is scored; items the user has already
rated are left out unless ``include_seen``. A model that also ranks (``"ranking" in model.tasks``:
UniGRF, SASRec) gives P(like) for each recommended item through its serving interface
(:meth:`~genrec.models.base.RecModel.score`, main action), so one model retrieves and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genrec.data.batching import JaggedBatch, collate
from genrec.data.preprocess import Sequences
from genrec.models.base import RecModel


@dataclass
class Recommendation:
    item: str  # raw item id
    title: str
    genres: list[str]
    score: float  # retrieval score (dot product)
    p_like: float | None  # ranking probability, where the model ranks


def user_index(seq: Sequences, raw_user: str) -> int:
    try:
        return seq.user_raw.index(str(raw_user))
    except ValueError:
        raise ValueError(f"user {raw_user!r} is not in the dataset ({seq.num_users} users)") from None


def _placeholder(history: tuple, max_len: int) -> tuple:
    """``history`` (a collate sample) cut to ``max_len - 1`` events and followed by a placeholder
    next event: the target whose retrieval query is the user's."""
    user, *window = history[:6]  # user, items, actions, labels, timestamps, request ids
    window = [a[-(max_len - 1):] for a in window]  # room for the placeholder event
    next_event = [1, 0, 0, window[3][-1], window[4][-1] + 1]  # item 1 stands in; never read
    return (user, *(np.append(a, v) for a, v in zip(window, next_event, strict=True)), len(window[0]))


def query_batch(histories: list[tuple], max_len: int, device: torch.device) -> JaggedBatch:
    """The batch whose targets' retrieval queries are the users' next-event queries."""
    return collate([_placeholder(h, max_len) for h in histories]).to(device)


@torch.no_grad()
def top_items(model: RecModel, histories: list[tuple], ks: list[int], max_len: int, device: torch.device,
              excludes: list[np.ndarray | None]) -> list[tuple[list[int], list[float]]]:
    """For each of ``histories`` (:func:`~genrec.data.batching.collate` samples), its ``ks[b]`` best
    items (dense ids, best first) and their retrieval scores; items in ``excludes[b]`` are left out.
    One query call and one catalogue product for the whole batch (the service's batched /recommend)."""
    model.eval()
    query = model.retrieval_queries(query_batch(histories, max_len, device)).float()
    scores = query @ model.item_embeddings().float().T  # [B, I + 1]
    scores[:, 0] = float("-inf")
    left_out = [np.asarray(e, dtype=np.int64) for e in excludes if e is not None]
    if left_out:
        rows = np.repeat([b for b, e in enumerate(excludes) if e is not None], [len(e) for e in left_out])
        scores[torch.from_numpy(rows).to(device), torch.from_numpy(np.concatenate(left_out)).to(device)] = float("-inf")
    allowed = torch.isfinite(scores).sum(1).tolist()  # [B]
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1)
    indices, values = top.indices.cpu().numpy(), top.values.cpu().numpy()  # [B, max k]
    return [(indices[b, :min(k, allowed[b])].tolist(), values[b, :min(k, allowed[b])].tolist())
            for b, k in enumerate(ks)]


@torch.no_grad()
def recommend(model: RecModel, seq: Sequences, user: int, k: int, max_len: int, device: torch.device,
              include_seen: bool = False) -> list[Recommendation]:
    if "retrieval" not in model.tasks:
        raise ValueError(f"{type(model).__name__} is not trained for retrieval (tasks: {model.tasks})")
    s, e = int(seq.user_offsets[user]), int(seq.user_offsets[user + 1])
    window = [seq.items[s:e], seq.actions[s:e], seq.labels[s:e], seq.timestamps[s:e], seq.request_ids[s:e]]
    [(items, values)] = top_items(model, [(user, *window)], [k], max_len, device,
                                  [None if include_seen else seq.items[s:e]])
    p_like = [None] * len(items)
    if "ranking" in model.tasks:
        s = max(s, e - max_len + 1)
        history = (user, seq.items[s:e], seq.actions[s:e], seq.labels[s:e], seq.timestamps[s:e],
                   seq.request_ids[s:e], 0)
        when = torch.tensor([int(seq.timestamps[e - 1])], device=device)  # as the placeholder's request
        logits = model.score(collate([history]).to(device), torch.tensor([items], device=device), when)  # [1, K, T]
        p_like = torch.sigmoid(logits[0, :, 0].float()).tolist()
    return [Recommendation(seq.item_raw[i - 1], seq.item_titles[i - 1], seq.item_genres[i - 1], float(v), p)
            for i, v, p in zip(items, values, p_like, strict=True)]
