"""Ranking metrics (AUC, GAUC, LogLoss) and full-catalogue retrieval metrics (HR@K, NDCG@K, MRR).

Both accumulate batch by batch, so evaluation never holds a ``[users, items]`` score matrix:
retrieval reduces each batch of scores to the rank of the true item right away, ranking keeps one
float per target. Ties are handled the standard way: AUC counts a tied positive/negative pair as
1/2 (average ranks, as scikit-learn); the retrieval rank of the true item is 1 + the number of
items scored strictly higher, plus half the other items scored equal (so a constant model gets the
expected rank of a random order, not a perfect one).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties). NaN if one class."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int, int]:
    """Impression-weighted mean of per-user AUC (DIN, Zhou et al. 2018).

    Returns ``(gauc, users_used, users_skipped)``; users whose targets are all one class have no AUC
    and are skipped (and counted).
    """
    users = np.asarray(users)
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(users, kind="mergesort")
    users, labels, scores = users[order], labels[order], scores[order]
    cuts = np.flatnonzero(np.diff(users)) + 1
    total, weight, used, skipped = 0.0, 0, 0, 0
    for lab, sc in zip(np.split(labels, cuts), np.split(scores, cuts), strict=True):
        value = auc(lab, sc)
        if math.isnan(value):
            skipped += 1
            continue
        total += value * len(lab)
        weight += len(lab)
        used += 1
    return (total / weight if weight else float("nan")), used, skipped


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


class RankingAccumulator:
    """Collects (user, label, logit) per target; AUC, GAUC and LogLoss at the end."""

    def __init__(self):
        self.users, self.labels, self.logits = [], [], []

    def update(self, users: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        self.users.append(users.detach().cpu().numpy())
        self.labels.append(labels.detach().float().cpu().numpy())
        self.logits.append(logits.detach().float().cpu().numpy())

    def compute(self) -> dict[str, float]:
        if not self.labels:
            return {}
        users, labels, logits = (np.concatenate(x) for x in (self.users, self.labels, self.logits))
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        g, used, skipped = gauc(users, labels, logits)
        return {"auc": auc(labels, logits), "gauc": g, "logloss": logloss(labels, probs),
                "gauc_users": used, "gauc_users_skipped": skipped, "ranking_targets": int(len(labels))}


class MultiTaskAccumulator:
    """Per-signal ranking metrics ``auc/<signal>``, ``gauc/<signal>``, ``logloss/<signal>`` and their
    mean over the signals (``auc/mean`` ...; a signal with one class in the split has a NaN AUC and is
    left out of the mean, which then says over how many signals it was taken)."""

    def __init__(self, signal_names: list[str]):
        self.signal_names = list(signal_names)
        self.tasks = [RankingAccumulator() for _ in self.signal_names]

    def update(self, users: torch.Tensor, signals: torch.Tensor, logits: torch.Tensor) -> None:
        """``signals`` and ``logits`` ``[N, T]``."""
        for t, acc in enumerate(self.tasks):
            acc.update(users, signals[:, t], logits[:, t])

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, acc in zip(self.signal_names, self.tasks, strict=True):
            m = acc.compute()
            out |= {f"{k}/{name}": m[k] for k in ("auc", "gauc", "logloss") if k in m}
        for k in ("auc", "gauc", "logloss"):
            values = [out[f"{k}/{n}"] for n in self.signal_names if not np.isnan(out.get(f"{k}/{n}", np.nan))]
            out[f"{k}/mean"] = float(np.mean(values)) if values else float("nan")
            out[f"{k}/mean_signals"] = len(values)
        return out


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank (1-based, ties split evenly) of ``targets[i]`` among ``scores[i]``; scores ``[B, I]``.

    Column 0 is the padding item and must already be set to ``-inf`` by the caller.
    """
    true = scores.gather(1, targets[:, None])  # [B, 1]
    higher = (scores > true).sum(1).double()
    ties = (scores == true).sum(1).double() - 1
    return 1.0 + higher + ties / 2.0


class RetrievalAccumulator:
    """HR@K, NDCG@K (one relevant item: 1/log2(1+rank) if rank <= K) and MRR over the full catalogue."""

    def __init__(self, ks: tuple[int, ...] = (10, 50)):
        self.ks = ks
        self.count = 0
        self.sums = {f"hr@{k}": 0.0 for k in ks} | {f"ndcg@{k}": 0.0 for k in ks} | {"mrr": 0.0}

    def update_ranks(self, ranks: torch.Tensor) -> None:
        ranks = ranks.double().cpu()
        self.count += len(ranks)
        for k in self.ks:
            hit = ranks <= k
            self.sums[f"hr@{k}"] += float(hit.sum())
            self.sums[f"ndcg@{k}"] += float((hit / torch.log2(1 + ranks)).sum())
        self.sums["mrr"] += float((1.0 / ranks).sum())

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        self.update_ranks(target_ranks(scores, targets))

    def compute(self) -> dict[str, float]:
        if not self.count:
            return {}
        return {k: v / self.count for k, v in self.sums.items()} | {"retrieval_targets": self.count}
