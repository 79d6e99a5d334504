"""The Bayes optimum of a planted synthetic log (:mod:`genrec.data.synth` with ``topics > 0``).

A model reads a user's history and must predict the next item (retrieval) and the signals of an
impression (ranking). In the planted model both depend on the user only through a hidden topic, so
the best any predictor of the *observed* history can do is exact: filter the posterior over topics
along the history (every item and every signal observed so far is evidence) and predict with it.

For event ``t`` of a user, with ``post_t(c) = P(c | x_<t, y_<t)``:

* retrieval: ``P(x_t = j | history) = sum_c post_t(c) · P(j | c, x_{t-1})``; ranking the catalogue by
  it maximises the expected HR@K and NDCG@K, which are then ``sum`` of the K largest probabilities
  (NDCG: each divided by ``log2(1 + rank)``), over the items of the evaluated catalogue;
* ranking: ``P(y_t = 1 | history, x_t) = sum_c post'(c) · sigmoid(w·mu_c·v_{x_t} + b)`` with the
  posterior updated by the candidate ``x_t`` itself (it was drawn from the topic); sorting
  impressions by it maximises the expected AUC, computed here over pairs of impressions.

The optimum is of the synthetic data only: it says how much of a *known* structure a model recovers,
never how well it does on real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genrec.data.synth import LatentModel
from genrec.eval.metrics import auc, expected_hit_rate, expected_ndcg

K = 10  # HR@K and NDCG@K


@dataclass
class BayesScores:
    """Per event (flat, in the order given): what the Bayes-optimal predictor expects and achieves."""

    hr: np.ndarray  # [E] expected HR@K of the Bayes ranking (sum of the K largest probabilities)
    ndcg: np.ndarray  # [E] expected NDCG@K
    hit: np.ndarray  # [E] P(the true item is in the Bayes top K), ties in a random order
    dcg: np.ndarray  # [E] realised NDCG@K of the true item under the Bayes ranking (expected over tie orders)
    label_probs: np.ndarray  # [E, S] P(signal = 1 | history, item)


def _topic_signal_probs(model: LatentModel, centroids: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``P(signal = 1 | topic c, item)`` ``[N, topics, S]`` for raw items ``[N]``."""
    z = model.item_vectors[items].astype(np.float64) @ centroids.T  # [N, topics]
    return 1.0 / (1.0 + np.exp(-(z[:, :, None] * model.weights + model.biases)))


def _posterior(log_post: np.ndarray) -> np.ndarray:
    """Normalised probabilities ``[L, topics]`` from unnormalised log posteriors (max-shifted: no underflow)."""
    post = np.exp(log_post - log_post.max(1, keepdims=True))
    return post / post.sum(1, keepdims=True)


def bayes_scores(model: LatentModel, offsets: np.ndarray, items: np.ndarray, signals: np.ndarray,
                 catalogue: np.ndarray | None = None, known_topics: np.ndarray | None = None) -> BayesScores:
    """The Bayes predictor along every history: ``offsets`` ``[U + 1]`` (CSR), raw ``items`` ``[E]`` and
    binary ``signals`` ``[E, S]`` in time order per user; ``catalogue`` ``[I]`` bool, the items a model
    may rank (default: all). Users are filtered together, one event position at a time.

    ``known_topics`` ``[U]`` gives the oracle instead, which knows each user's topic (more than any
    history says: an upper bound no model of the history can reach, for reference)."""
    if not model.sequential:
        raise ValueError("the planted log has no sequential structure (SynthConfig.topics = 0): its best "
                         "retrieval is popularity, and this yardstick needs topics > 0")
    num_topics, num_items = model.topic_item_probs.shape
    catalogue = np.ones(num_items, dtype=bool) if catalogue is None else catalogue
    if catalogue.sum() < K:
        raise ValueError(f"a catalogue of {int(catalogue.sum())} items has no top {K}")
    centroids = model.topic_vectors.astype(np.float64)  # [topics, k]
    offsets, items = np.asarray(offsets, dtype=np.int64), np.asarray(items, dtype=np.int64)
    lengths = np.diff(offsets)
    n = len(items)
    out = BayesScores(hr=np.zeros(n), ndcg=np.zeros(n), hit=np.zeros(n), dcg=np.zeros(n),
                      label_probs=np.zeros((n, len(model.weights))))
    discount = 1.0 / np.log2(np.arange(2, K + 2))  # [K]
    log_post = np.full((len(lengths), num_topics), -np.log(num_topics))  # [U, topics] log P(c | history)
    if known_topics is not None:
        log_post = np.where(np.arange(num_topics) == np.asarray(known_topics)[:, None], 0.0, -np.inf)
    for t in range(int(lengths.max(initial=0))):
        live = np.flatnonzero(lengths > t)
        at = offsets[live] + t  # [L] flat event index
        post = _posterior(log_post[live])  # [L, topics]
        prev = items[at - 1] if t else None
        mixed = model.next_item_probs(post, prev)  # [L, I] P(x_t = j | history)
        ranked = np.where(catalogue, mixed, -1.0)  # [L, I]; items outside the catalogue cannot be ranked
        top = -np.sort(-np.partition(ranked, num_items - K, axis=1)[:, num_items - K:], axis=1)  # [L, K]
        out.hr[at] = top.sum(1)
        out.ndcg[at] = top @ discount
        true = ranked[np.arange(len(live)), items[at]]
        higher = torch.from_numpy((ranked > true[:, None]).sum(1)).double()  # [L]
        ties = torch.from_numpy((ranked == true[:, None]).sum(1) - 1).double()  # [L]
        out.hit[at] = expected_hit_rate(higher, ties, K).numpy()  # as the models' HR@K (eval/metrics.py)
        out.dcg[at] = expected_ndcg(higher, ties, K).numpy()
        # the item is evidence about the topic: P(x_t | c, x_{t-1}) per topic
        item_lik = model.topic_item_probs[:, items[at]].T.copy()  # [L, topics]
        if prev is not None:
            follows = (model.successor_items[prev] == items[at][:, None])  # [L, S]
            item_lik = (1.0 - model.transition) * item_lik + model.transition * (
                follows * model.successor_probs[prev]).sum(1, keepdims=True)
        with np.errstate(divide="ignore"):  # the oracle's impossible topics stay at log 0 = -inf
            log_post[live] += np.log(item_lik)
        post = _posterior(log_post[live])
        per_topic = _topic_signal_probs(model, centroids, items[at])  # [L, topics, S]
        out.label_probs[at] = np.einsum("lk,lks->ls", post, per_topic)
        y = signals[at].astype(bool)[:, None, :]  # [L, 1, S]
        log_post[live] += np.where(y, np.log(per_topic), np.log1p(-per_topic)).sum(2)
    return out


def expected_auc(probs: np.ndarray) -> float:
    """AUC that ranking by ``probs`` is expected to reach when labels are Bernoulli(``probs``): over all
    pairs, ``sum p_i (1 - p_j) [p_i > p_j] (+ half for ties) / sum p_i (1 - p_j)`` (i != j)."""
    p = np.sort(np.asarray(probs, dtype=np.float64))
    neg = 1.0 - p
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # sum of (1 - p_j) over j sorted before i
    # ties: group equal values, count half of the pairs inside a group
    _, first, counts = np.unique(p, return_index=True, return_counts=True)
    group_start = np.repeat(first, counts)
    below_strict = below[group_start]
    group_neg = np.repeat(np.add.reduceat(neg, first), counts)
    within = group_neg - neg  # the other members of i's group
    numerator = (p * (below_strict + 0.5 * within)).sum()
    denominator = p.sum() * neg.sum() - (p * neg).sum()
    return float(numerator / denominator)


def optimum(scores: BayesScores, targets: np.ndarray, labels: np.ndarray, signal: int = 0) -> dict[str, float]:
    """The Bayes optimum over the flat event indices ``targets`` (one split's): expected HR@k, NDCG@k
    and AUC (of ``signal``), and what the Bayes predictor reaches on the realised items and ``labels``
    ``[len(targets)]`` (the same noise a model's metrics carry)."""
    probs = scores.label_probs[targets, signal]
    return {"hr@10": float(scores.hr[targets].mean()), "ndcg@10": float(scores.ndcg[targets].mean()),
            "auc": expected_auc(probs), "realised_hr@10": float(scores.hit[targets].mean()),
            "realised_ndcg@10": float(scores.dcg[targets].mean()), "realised_auc": auc(labels, probs),
            "targets": int(len(targets))}
