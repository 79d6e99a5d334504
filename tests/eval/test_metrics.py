"""Metrics against scikit-learn and against cases worked by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score

from genrec.eval.metrics import (
    MetricError,
    MultiTaskAccumulator,
    RankingAccumulator,
    RetrievalAccumulator,
    auc,
    expected_reciprocal_rank,
    gauc,
    logloss,
    logloss_from_logits,
    target_ranks,
)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_including_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 997)
    scores = np.round(rng.normal(size=997) + labels * 0.5, 1)  # rounding creates many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_hand_case():
    # positives 0.8, 0.4; negatives 0.5, 0.4 -> pairs: (0.8>0.5) 1, (0.8>0.4) 1, (0.4<0.5) 0, tie 0.5
    assert auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.5, 0.4])) == pytest.approx(2.5 / 4)
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_gauc_weights_users_by_impressions_and_skips_one_class_users():
    users = np.array([1, 1, 1, 2, 2, 3, 3])
    labels = np.array([1, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.95, 0.2, 0.7, 0.5, 0.6])
    # user 1: pos 0.9 vs negs 0.1, 0.95 -> 1/2; user 2: 1.0; user 3: one class, skipped
    value, used, skipped = gauc(users, labels, scores)
    assert value == pytest.approx((0.5 * 3 + 1.0 * 2) / 5)
    assert (used, skipped) == (2, 1)


def test_gauc_of_no_targets_skips_no_users():
    value, used, skipped = gauc(np.array([]), np.array([]), np.array([]))
    assert math.isnan(value)
    assert (used, skipped) == (0, 0)


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probs = rng.uniform(0.01, 0.99, 500)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-9)


def test_ranking_accumulator_streams_like_one_shot():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 20, 300)
    labels = rng.integers(0, 2, 300)
    logits = rng.normal(size=300)
    acc = RankingAccumulator()
    for chunk in np.array_split(np.arange(300), 7):
        acc.update(torch.tensor(users[chunk]), torch.tensor(labels[chunk]), torch.tensor(logits[chunk]))
    out = acc.compute()
    assert out["auc"] == pytest.approx(roc_auc_score(labels, logits))
    assert out["logloss"] == pytest.approx(log_loss(labels, 1 / (1 + np.exp(-logits))), rel=1e-6)
    assert out["gauc"] == pytest.approx(gauc(users, labels, logits)[0])


def test_logloss_from_logits_matches_sklearn_where_its_clipping_does_not_bind():
    # the reviewer's case: logits 20 and -20 on the wrong side; probabilities clipped at 1e-7 gave 8.381
    logits, labels = np.array([20.0, -20.0, 0.5, 1.0]), np.array([0, 1, 0, 1])
    expected = log_loss(labels, 1 / (1 + np.exp(-logits)))  # sklearn clips at float eps, far below 2e-9
    assert expected == pytest.approx(10.3218, abs=1e-4)
    assert logloss_from_logits(labels, logits) == pytest.approx(expected, rel=1e-6)


def test_logloss_from_logits_is_exact_for_extreme_logits():
    """Where sigmoid rounds to 0 or 1 in float64, the loss still charges |z| for a confident mistake and
    e^-|z| for a confident hit (float64 BCE-with-logits as the reference)."""
    logits = np.array([40.0, -40.0, 700.0, -700.0, 40.0, -745.0, 0.0, 1e-3])
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    reference = F.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(labels, dtype=torch.float64))
    assert logloss_from_logits(labels, logits) == pytest.approx(float(reference), rel=1e-12)


def test_ranking_accumulator_logloss_is_computed_from_the_logits():
    acc = RankingAccumulator()
    acc.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0.0, 1, 0, 1]), torch.tensor([20.0, -20, 0.5, 1]))
    expected = F.binary_cross_entropy_with_logits(torch.tensor([20.0, -20, 0.5, 1]).double(),
                                                  torch.tensor([0.0, 1, 0, 1]).double())
    assert acc.compute()["logloss"] == pytest.approx(float(expected), rel=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_ranking_metrics_refuse_non_finite_logits(bad):
    logits = torch.tensor([0.3, bad, -0.2, bad])
    acc = RankingAccumulator()
    acc.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0.0, 1, 0, 1]), logits)
    with pytest.raises(MetricError, match=r"AUC.*2 of 4 targets.*has training diverged"):
        acc.compute()
    for metric in (lambda: auc(np.array([0, 1, 0, 1]), logits.numpy()),
                   lambda: gauc(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), logits.numpy()),
                   lambda: logloss_from_logits(np.array([0, 1, 0, 1]), logits.numpy())):
        with pytest.raises(ValueError, match="2 of 4 targets have non-finite scores"):
            metric()


def test_all_nan_logits_raise_whatever_the_order_of_the_labels():
    # before: AUC 1.0 or 0.0 depending only on where the positives sat
    for labels in ([0, 0, 1, 1], [1, 1, 0, 0]):
        with pytest.raises(MetricError, match="4 of 4"):
            auc(np.array(labels), np.full(4, np.nan))


def test_multi_task_metrics_name_the_signal_with_non_finite_logits():
    acc = MultiTaskAccumulator(["click", "like"])
    acc.update(torch.tensor([0, 0, 1]), torch.tensor([[1.0, 1], [0, 1], [1, 0]]),
               torch.tensor([[0.1, float("nan")], [0.2, 0.3], [0.3, 0.4]]))
    with pytest.raises(MetricError, match=r"signal 'like'.*1 of 3"):
        acc.compute()


def test_retrieval_metrics_hand_case():
    scores = torch.tensor([
        [-math.inf, 0.9, 0.5, 0.1, 0.3],  # target 2 -> one higher -> rank 2
        [-math.inf, 0.1, 0.2, 0.3, 0.4],  # target 4 -> rank 1
        [-math.inf, 0.5, 0.5, 0.5, 0.9],  # target 1 -> one higher, two ties -> rank 2, 3 or 4
    ])
    targets = torch.tensor([2, 4, 1])
    assert target_ranks(scores, targets).tolist() == [[1.0, 0.0], [0.0, 0.0], [1.0, 2.0]]
    acc = RetrievalAccumulator(ks=(1, 2))
    acc.update(scores, targets)
    out = acc.compute()
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["hr@2"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0 + 1 / (3 * math.log2(3))) / 3)
    assert out["mrr"] == pytest.approx((1 / 2 + 1 + (1 / 2 + 1 / 3 + 1 / 4) / 3) / 3)


def test_retrieval_rank_matches_a_full_sort():
    rng = np.random.default_rng(5)
    scores = torch.tensor(rng.normal(size=(64, 1000)))
    scores[:, 0] = -math.inf
    targets = torch.tensor(rng.integers(1, 1000, 64))
    order = torch.argsort(scores, dim=1, descending=True)
    expected = (order == targets[:, None]).nonzero()[:, 1] + 1
    higher, ties = target_ranks(scores, targets).unbind(1)
    assert (higher + 1).tolist() == expected.double().tolist()
    assert ties.tolist() == [0.0] * 64


def _metrics_over_every_tie_order(scores: np.ndarray, target: int, ks: tuple[int, ...]) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of one row averaged over every order of the items (column 0 excluded) as the
    tie-breaker: each order of the tied items is equally likely."""
    items = range(1, len(scores))
    sums = dict.fromkeys([f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"], 0.0)
    orders = list(itertools.permutations(items))
    for order in orders:
        tie_break = {item: position for position, item in enumerate(order)}
        ranking = sorted(items, key=lambda i: (-scores[i], tie_break[i]))
        rank = ranking.index(target) + 1
        for k in ks:
            sums[f"hr@{k}"] += rank <= k
            sums[f"ndcg@{k}"] += (rank <= k) / math.log2(1 + rank)
        sums["mrr"] += 1 / rank
    return {name: value / len(orders) for name, value in sums.items()}


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_metrics_are_their_expectation_over_random_tie_orders(seed):
    rng = np.random.default_rng(seed)
    ks = (1, 2, 3, 5)
    for _ in range(3):
        scores = np.concatenate([[-np.inf], rng.integers(0, 3, 6).astype(float)])  # 6 items, many ties
        target = int(rng.integers(1, 7))
        acc = RetrievalAccumulator(ks)
        acc.update(torch.tensor(scores)[None], torch.tensor([target]))
        out = acc.compute()
        expected = _metrics_over_every_tie_order(scores, target, ks)
        assert {name: out[name] for name in expected} == pytest.approx(expected, rel=1e-12)


def test_constant_scorer_gets_the_metrics_of_a_random_order():
    # before: mid-rank 50.5 thresholded -> HR@10 = 0 and MRR 1/50.5
    scores = torch.zeros(1, 101)
    scores[:, 0] = -math.inf
    acc = RetrievalAccumulator((10, 50))
    acc.update(scores, torch.tensor([5]))
    out = acc.compute()
    ranks = np.arange(1, 101)
    assert out["hr@10"] == pytest.approx(0.1)
    assert out["hr@50"] == pytest.approx(0.5)
    assert out["ndcg@10"] == pytest.approx(np.mean((ranks <= 10) / np.log2(1 + ranks)))
    assert out["mrr"] == pytest.approx(np.mean(1 / ranks), rel=1e-13)


def test_expected_reciprocal_rank_stays_precise_deep_in_a_large_catalogue():
    higher = torch.tensor([0.0, 10.0**6, 10.0**7, 10.0**7, 3.0], dtype=torch.float64)
    ties = torch.tensor([0.0, 1.0, 0.0, 40.0, 10.0**5], dtype=torch.float64)
    exact = [math.fsum(1 / r for r in range(int(g) + 1, int(g + t) + 2)) / (t + 1)
             for g, t in zip(higher.tolist(), ties.tolist(), strict=True)]
    got = expected_reciprocal_rank(higher, ties).tolist()
    assert got == pytest.approx(exact, rel=1e-8, abs=1e-15)
    assert got[2] == 1 / (10**7 + 1)  # no ties: exactly 1 / rank


def test_retrieval_metrics_refuse_nan_scores():
    scores = torch.full((1, 6), float("nan"))
    scores[:, 0] = -math.inf
    acc = RetrievalAccumulator((10,))
    acc.update(scores, torch.tensor([3]))  # before: HR@10 = 1 and MRR = 2
    with pytest.raises(MetricError, match=r"MRR: 1 of 1 targets.*has training diverged"):
        acc.compute()


def test_retrieval_counts_targets_whose_own_score_or_row_is_not_finite():
    scores = torch.tensor([
        [-math.inf, 0.1, 0.2, 0.3],  # fine: only the padding column is -inf
        [-math.inf, 0.1, math.nan, 0.3],  # a NaN elsewhere in the row: no rank
        [-math.inf, math.inf, 0.2, 0.3],  # the target's own score is +inf
        [-math.inf, 0.1, -math.inf, 0.3],  # the target's own score is -inf
        [-math.inf, 0.1, 0.2, math.inf],  # another item at +inf is simply higher
    ])
    targets = torch.tensor([1, 1, 1, 2, 1])
    assert target_ranks(scores, targets)[[0, 4]].tolist() == [[2.0, 0.0], [2.0, 0.0]]
    acc = RetrievalAccumulator((1,))
    acc.update(scores, targets)
    with pytest.raises(MetricError, match="3 of 5 targets"):
        acc.compute()
