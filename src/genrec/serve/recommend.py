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

from genrec.data.batching import collate
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


@torch.no_grad()
def top_items(model: RecModel, history: tuple, k: int, max_len: int, device: torch.device,
              exclude: np.ndarray | None = None) -> tuple[list[int], list[float]]:
    """The ``k`` best items (dense ids, best first) and their retrieval scores after ``history``, a
    :func:`~genrec.data.batching.collate` sample; items in ``exclude`` are left out."""
    user, *window = history[:6]  # user, items, actions, labels, timestamps, request ids
    window = [a[-(max_len - 1):] for a in window]  # room for the placeholder event
    next_event = [1, 0, 0, window[3][-1], window[4][-1] + 1]  # item 1 stands in; never read
    placeholder = (user, *(np.append(a, v) for a, v in zip(window, next_event, strict=True)), len(window[0]))
    model.eval()
    query = model.retrieval_queries(collate([placeholder]).to(device)).float()  # [1, D]
    scores = (query @ model.item_embeddings().float().T)[0]  # [I + 1]
    scores[0] = float("-inf")
    if exclude is not None:
        scores[torch.from_numpy(np.asarray(exclude, dtype=np.int64)).to(device)] = float("-inf")
    top = scores.topk(min(k, int(torch.isfinite(scores).sum())))
    return top.indices.tolist(), top.values.tolist()


@torch.no_grad()
def recommend(model: RecModel, seq: Sequences, user: int, k: int, max_len: int, device: torch.device,
              include_seen: bool = False) -> list[Recommendation]:
    if "retrieval" not in model.tasks:
        raise ValueError(f"{type(model).__name__} is not trained for retrieval (tasks: {model.tasks})")
    s, e = int(seq.user_offsets[user]), int(seq.user_offsets[user + 1])
    window = [seq.items[s:e], seq.actions[s:e], seq.labels[s:e], seq.timestamps[s:e], seq.request_ids[s:e]]
    items, values = top_items(model, (user, *window), k, max_len, device,
                              exclude=None if include_seen else seq.items[s:e])
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
