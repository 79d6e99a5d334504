"""Metrics against scikit-learn and against cases worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from genrec.eval.metrics import (
    RankingAccumulator,
    RetrievalAccumulator,
    auc,
    gauc,
    logloss,
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


def test_retrieval_metrics_hand_case():
    scores = torch.tensor([
        [-math.inf, 0.9, 0.5, 0.1, 0.3],  # target 2 -> rank 2
        [-math.inf, 0.1, 0.2, 0.3, 0.4],  # target 4 -> rank 1
        [-math.inf, 0.5, 0.5, 0.5, 0.9],  # target 1 -> one higher, two ties -> rank 1 + 1 + 1 = 3
    ])
    targets = torch.tensor([2, 4, 1])
    ranks = target_ranks(scores, targets)
    assert ranks.tolist() == [2.0, 1.0, 3.0]
    acc = RetrievalAccumulator(ks=(1, 2))
    acc.update(scores, targets)
    out = acc.compute()
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["hr@2"] == pytest.approx(2 / 3)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert out["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def test_retrieval_rank_matches_a_full_sort():
    rng = np.random.default_rng(5)
    scores = torch.tensor(rng.normal(size=(64, 1000)))
    scores[:, 0] = -math.inf
    targets = torch.tensor(rng.integers(1, 1000, 64))
    order = torch.argsort(scores, dim=1, descending=True)
    expected = (order == targets[:, None]).nonzero()[:, 1] + 1
    assert target_ranks(scores, targets).tolist() == expected.double().tolist()
