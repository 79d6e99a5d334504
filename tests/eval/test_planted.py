"""The Bayes optimum of a planted log: hand-computable cases, a Monte-Carlo check against logs drawn
from the planted model, and the order oracle >= Bayes >= any predictor of the history."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from genrec.data.synth import LatentModel, SynthConfig, generate, latent_model
from genrec.eval.metrics import auc
from genrec.eval.planted import K, bayes_scores, expected_auc, optimum


def _chain(topics: int, transition: float, items: int = 30, successors: int = 1) -> LatentModel:
    popularity = np.arange(1, items + 1, dtype=np.float64) ** -1.0
    cfg = SynthConfig(users=5, events=50, items=items, signals=("click",), topics=topics, transition=transition,
                      successors=successors, seed=4)
    return latent_model(cfg, popularity / popularity.sum())


def test_expected_auc_counts_every_pair_with_ties_halved():
    probs = np.array([0.1, 0.4, 0.4, 0.7, 0.9, 0.1])
    num = den = 0.0
    for i, j in itertools.permutations(range(len(probs)), 2):  # i positive, j negative
        weight = probs[i] * (1 - probs[j])
        den += weight
        num += weight * (1.0 if probs[i] > probs[j] else 0.5 if probs[i] == probs[j] else 0.0)
    assert expected_auc(probs) == pytest.approx(num / den, rel=1e-12)


def test_expected_auc_is_the_mean_auc_of_labels_drawn_from_the_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.beta(1, 3, 2000)
    draws = [auc(rng.random(len(probs)) < probs, probs) for _ in range(200)]
    assert np.mean(draws) == pytest.approx(expected_auc(probs), abs=0.002)


def test_one_topic_without_transitions_is_popularity():
    model = _chain(topics=1, transition=0.0)
    items = np.array([0, 5, 5, 2, 9])
    scores = bayes_scores(model, np.array([0, 2, 5]), items, np.zeros((5, 1)))
    top = np.sort(model.topic_item_probs[0])[::-1][:K]
    np.testing.assert_allclose(scores.hr, top.sum())
    np.testing.assert_allclose(scores.ndcg, (top / np.log2(np.arange(2, K + 2))).sum())
    # one topic: the signal's probability is the item's alone
    z = model.item_vectors[items] @ model.topic_vectors[0]
    np.testing.assert_allclose(scores.label_probs[:, 0], 1 / (1 + np.exp(-(model.weights[0] * z + model.biases[0]))),
                               rtol=1e-6)


def test_a_deterministic_chain_is_predicted_exactly_after_its_first_item():
    model = _chain(topics=2, transition=1.0)  # every next item is the single successor of the previous
    first = 3
    chain = [first]
    for _ in range(5):
        chain.append(int(model.successor_items[chain[-1], 0]))
    scores = bayes_scores(model, np.array([0, 6]), np.array(chain), np.zeros((6, 1)))
    assert scores.hr[0] < 1 and np.allclose(scores.hr[1:], 1.0) and np.allclose(scores.ndcg[1:], 1.0)
    assert scores.hit[1:].all() and np.allclose(scores.dcg[1:], 1.0)
    # transitions say nothing about the topic: the posterior stays where the first item left it
    assert np.allclose(scores.label_probs[1:, 0], scores.label_probs[1:, 0])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A planted log read back as per-user histories in time order (raw ids)."""
    import polars as pl

    out = tmp_path_factory.mktemp("planted")
    cfg = SynthConfig(users=400, events=16_000, items=80, signals=("click",), topics=4, transition=0.5, seed=2)
    generate(cfg, out, log=lambda *_: None)
    frame = pl.read_parquet(out / "*.parquet").sort(["user_id", "timestamp"])
    lengths = frame.group_by("user_id", maintain_order=True).len()["len"].to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    model = LatentModel.load(out / "latent.npz")
    return model, offsets, frame["item_id"].to_numpy(), frame["click"].to_numpy()[:, None], frame["user_id"].to_numpy()


def test_the_optimum_is_what_the_bayes_predictor_reaches_on_logs_drawn_from_the_model(planted):
    """Monte Carlo: the log is a draw from the planted model, so the Bayes predictor's realised hit
    rate, NDCG and AUC must match what it expects, within sampling noise."""
    model, offsets, items, signals, _ = planted
    scores = bayes_scores(model, offsets, items, signals)
    targets = np.arange(len(items))
    got = optimum(scores, targets, signals[:, 0])
    sd = np.sqrt((scores.hr * (1 - scores.hr)).sum()) / len(items)  # hits are Bernoulli(hr) given the past
    assert abs(got["realised_hr@10"] - got["hr@10"]) < 4 * sd
    assert abs(got["realised_ndcg@10"] - got["ndcg@10"]) < 4 * sd
    assert abs(got["realised_auc"] - got["auc"]) < 0.01
    probs = scores.label_probs[:, 0]
    assert abs(signals[:, 0].mean() - probs.mean()) < 4 * np.sqrt((probs * (1 - probs)).sum()) / len(items)
    assert 0.3 < got["hr@10"] < 0.95 and 0.6 < got["auc"] < 0.95  # neither trivial nor saturated


def test_no_predictor_of_the_history_beats_the_optimum_and_the_oracle_bounds_it(planted):
    model, offsets, items, signals, users = planted
    bayes = bayes_scores(model, offsets, items, signals)
    oracle = bayes_scores(model, offsets, items, signals, known_topics=model.user_topics[users[offsets[:-1]]])
    first = offsets[:-1]  # nothing is known about the user yet: knowing the topic helps most
    assert oracle.hr[first].mean() > bayes.hr[first].mean() + 0.05
    assert expected_auc(oracle.label_probs[first, 0]) > expected_auc(bayes.label_probs[first, 0]) + 0.01
    assert oracle.hr.mean() >= bayes.hr.mean()
    late = np.concatenate([np.arange(s + 40, e) for s, e in zip(offsets[:-1], offsets[1:], strict=True)])
    assert bayes.hr[late].mean() > 0.99 * oracle.hr[late].mean()  # a long history reveals the topic
    # a strong predictor of the history, fitted on this very log (counts of transitions and of the
    # user's own items so far): it cannot beat the Bayes predictor beyond noise
    hits = []
    transitions = np.zeros((len(model.item_vectors),) * 2)
    np.add.at(transitions, (items[:-1], items[1:]), 1.0)
    for s, e in zip(offsets[:-1], offsets[1:], strict=True):
        seen = np.zeros(len(model.item_vectors))
        for t in range(s + 1, e):
            seen[items[t - 1]] += 1
            score = transitions[items[t - 1]] / transitions[items[t - 1]].sum() + seen / (t - s)
            hits.append(items[t] in np.argsort(-score)[:K])
    n = len(hits)
    firsts = np.ones(len(items), dtype=bool)
    firsts[offsets[:-1]] = False
    expected = bayes.hr[firsts].mean()
    assert np.mean(hits) < expected + 4 * np.sqrt(expected * (1 - expected) / n)
    assert np.mean(hits) > 0.8 * expected  # and it is a strong one: the bound is not vacuous here
