"""Ranking metrics (AUC, GAUC, LogLoss) and full-catalogue retrieval metrics (HR@K, NDCG@K, MRR).

Both accumulate batch by batch, so evaluation never holds a ``[users, items]`` score matrix:
retrieval reduces each batch of scores to where the true item ranks right away, ranking keeps one
float per target. Ties are handled the standard way: AUC counts a tied positive/negative pair as
1/2 (average ranks, as scikit-learn). Retrieval reports the *expected* HR@K, NDCG@K and MRR when
tied items are put in a uniformly random order: with ``g`` items scored strictly higher than the true
item and ``t`` others scored equal, its rank is uniform on ``g+1 .. g+t+1``, and each metric is the
mean over those ranks (so a constant model gets exactly the metrics of a random order; a mid-rank
thresholded at ``K`` would give it HR@10 = 0 over 100 items instead of 0.1).

Scores that are not finite have no rank: NaN logits, infinite logits, a NaN anywhere in a retrieval
row or an infinite score of the true item raise :class:`MetricError` (a diverged model), never a
metric; the ``-inf`` of the padding column 0 is expected.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from genrec.errors import UserError


class MetricError(UserError):
    """Scores a metric cannot rank (NaN or infinite); the message names the metric and counts the targets."""


def _not_finite_error(metric: str, bad: int, total: int) -> MetricError:
    return MetricError(f"{metric}: {bad} of {total} targets have non-finite scores (NaN or inf); the model's "
                       "scores are not finite: has training diverged?")


def require_finite(scores: np.ndarray, metric: str) -> None:
    """Raise :class:`MetricError` if any of ``scores`` ``[N]`` is NaN or infinite."""
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise _not_finite_error(metric, bad, len(scores))


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
    scores = np.asarray(scores, dtype=np.float64)
    require_finite(scores, "AUC")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int, int]:
    """Impression-weighted mean of per-user AUC (DIN, Zhou et al. 2018).

    Returns ``(gauc, users_used, users_skipped)``; users whose targets are all one class have no AUC
    and are skipped (and counted).
    """
    users = np.asarray(users)
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    require_finite(scores, "GAUC")
    if not len(users):  # np.split would make one empty (one-class) user of it
        return float("nan"), 0, 0
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


def logloss_from_logits(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of ``labels`` (0/1) under ``sigmoid(logits)``, from the logits exactly.

    ``-log sigmoid(z) = log(1 + e^-z)`` and ``-log(1 - sigmoid(z)) = log(1 + e^z)``, both by ``logaddexp``:
    no probability is formed, so a confident mistake costs its full ``|z|`` instead of a clipped
    ``-log(1e-7)`` (= 16.1), and a confident hit costs ``e^-|z|``, not 0.
    """
    z = np.asarray(logits, dtype=np.float64)
    require_finite(z, "LogLoss")
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean(y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy of known probabilities (a planted model's exact ``P(click)``), unclipped:
    a label given probability 0 costs ``inf``. A model's scores are logits: use :func:`logloss_from_logits`,
    which stays exact where ``sigmoid`` rounds to 0 or 1."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


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
        require_finite(logits, "AUC, GAUC and LogLoss")
        g, used, skipped = gauc(users, labels, logits)
        return {"auc": auc(labels, logits), "gauc": g, "logloss": logloss_from_logits(labels, logits),
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
            try:
                m = acc.compute()
            except MetricError as e:
                raise MetricError(f"signal {name!r}: {e}") from e
            out |= {f"{k}/{name}": m[k] for k in ("auc", "gauc", "logloss") if k in m}
        for k in ("auc", "gauc", "logloss"):
            values = [out[f"{k}/{n}"] for n in self.signal_names if not np.isnan(out.get(f"{k}/{n}", np.nan))]
            out[f"{k}/mean"] = float(np.mean(values)) if values else float("nan")
            out[f"{k}/mean_signals"] = len(values)
        return out


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Where ``targets[i]`` ranks among ``scores[i]``: ``[B, 2]`` float64 of (items scored strictly higher,
    other items scored equal); scores ``[B, I]``, targets ``[B]``.

    Column 0 is the padding item and must already be set to ``-inf`` by the caller. A row with a NaN, or
    whose target's own score is infinite, has no rank: both counts are NaN, and the accumulator raises.
    """
    true = scores.gather(1, targets[:, None])  # [B, 1]
    higher = (scores > true).sum(1).double()  # [B]
    ties = (scores == true).sum(1).double() - 1  # [B]
    no_rank = scores.isnan().any(1) | ~true[:, 0].isfinite()  # [B]
    return torch.stack([higher, ties], 1).masked_fill(no_rank[:, None], float("nan"))  # [B, 2]


def expected_hit_rate(higher: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """P(rank <= k) for a rank uniform on ``higher+1 .. higher+ties+1``; ``[B]`` float64."""
    n = ties + 1
    return (k - higher).clamp(min=0).minimum(n) / n


def expected_ndcg(higher: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """E[1/log2(1 + rank) if rank <= k] for a rank uniform on ``higher+1 .. higher+ties+1``; ``[B]``.

    A sum over the ranks ``r <= k`` the true item can take, so no prefix table is needed.
    """
    r = torch.arange(1, k + 1, dtype=torch.float64)  # [k]
    possible = (r > higher[:, None]) & (r <= (higher + ties + 1)[:, None])  # [B, k]
    return (possible / torch.log2(1 + r)).sum(1) / (ties + 1)


def expected_reciprocal_rank(higher: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """E[1/rank] for a rank uniform on ``higher+1 .. higher+ties+1``: ``(H(g+t+1) - H(g)) / (t+1)``; ``[B]``.

    Harmonic numbers as ``H(n) = digamma(n+1) + gamma`` (gamma cancels); float64 keeps the difference
    within ~1e-15 even for 1e7 items. Without ties it is exactly ``1 / (g+1)``.
    """
    n = ties + 1
    spread = (torch.special.digamma(higher + n + 1) - torch.special.digamma(higher + 1)) / n
    return torch.where(ties == 0, 1.0 / (higher + 1), spread)


class RetrievalAccumulator:
    """Expected HR@K, NDCG@K (one relevant item: 1/log2(1+rank) if rank <= K) and MRR over the full
    catalogue, tied items in a uniformly random order (module docstring)."""

    def __init__(self, ks: tuple[int, ...] = (10, 50)):
        self.ks = ks
        self.count = 0
        self.no_rank = 0
        self.sums = {f"hr@{k}": 0.0 for k in ks} | {f"ndcg@{k}": 0.0 for k in ks} | {"mrr": 0.0}

    def update_ranks(self, ranks: torch.Tensor) -> None:
        """``ranks`` ``[n, 2]``: :func:`target_ranks`' (higher, ties) per target."""
        ranks = ranks.double().cpu()
        no_rank = ranks.isnan().any(1)  # [n]
        self.count += len(ranks)
        self.no_rank += int(no_rank.sum())
        higher, ties = ranks[~no_rank].unbind(1)  # [n'] each
        for k in self.ks:
            self.sums[f"hr@{k}"] += float(expected_hit_rate(higher, ties, k).sum())
            self.sums[f"ndcg@{k}"] += float(expected_ndcg(higher, ties, k).sum())
        self.sums["mrr"] += float(expected_reciprocal_rank(higher, ties).sum())

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        self.update_ranks(target_ranks(scores, targets))

    def compute(self) -> dict[str, float]:
        if self.no_rank:
            raise _not_finite_error("HR@K, NDCG@K and MRR", self.no_rank, self.count)
        if not self.count:
            return {}
        return {k: v / self.count for k, v in self.sums.items()} | {"retrieval_targets": self.count}
