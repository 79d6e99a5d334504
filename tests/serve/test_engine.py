"""The service's engine without HTTP: a job that breaks a batched scoring call fails alone (the rest of
the batch is scored as if alone), a failed append leaves the user's stored state untouched, batched
scoring equals each request alone for every kind of ranker, and recommendation leaves seen items out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.data.batching import collate
from genrec.ops import layout as layout_module
from genrec.serve import engine as engine_module
from genrec.serve.engine import Catalogue, Engine, EventsJob, RankJob, RecommendJob, ServiceError
from genrec.serve.scoring import history_batch
from genrec.serve.store import History, UserStore
from tests.models.test_contracts import make
from tests.models.test_generative import INFO, make_model

POISON = 13  # an item id the patched scorer fails on


def _engine(name: str = "dfgr") -> Engine:
    model = make_model(name, torch.float32)
    catalogue = Catalogue([str(i) for i in range(1, INFO.num_items + 1)], INFO.rating_values, 3.0, 0)

    def seed(user: str) -> History | None:
        rng = np.random.default_rng(int(user))
        n = 8 + int(user)
        return History.build(rng.integers(1, 41, n), rng.integers(0, 5, n), np.ones(n), np.arange(n) * 100, 0)

    return Engine(model, catalogue, UserStore(1 << 20, seed), torch.device("cpu"), max_history=32)


def _counted(engine: Engine) -> tuple[float, float, float]:
    m = engine.metrics
    return tuple(c._value.get() for c in (m.candidates, m.cache_hits, m.cache_misses))


def test_a_job_that_breaks_the_batch_fails_alone():
    """... and the batch's rerun job by job counts each scored request once in the metrics (the
    failed one not at all)."""
    engine = _engine()
    jobs = [RankJob(str(u), np.array([1, 2, POISON if u == 2 else 3]), None, None) for u in (1, 2, 3)]
    alone = {j.user: engine.rank([j])[0]["scores"] for j in jobs if j.user != "2"}
    assert _counted(engine) == (6, 0, 2)  # users 1 and 3 encoded: two misses, their caches kept
    score_cached = engine.scorer.score_cached

    def fragile(caches, candidates, when):
        if any(POISON in c for c in candidates):
            raise RuntimeError("kernel failure")
        return score_cached(caches, candidates, when)

    engine.scorer.score_cached = fragile
    results = engine.rank(jobs)
    assert isinstance(results[1], ServiceError) and results[1].status == 500 and "kernel failure" in results[1].message
    for job, result in zip(jobs, results, strict=True):
        if job.user != "2":
            np.testing.assert_allclose(result["scores"], alone[job.user], atol=1e-6)
    assert _counted(engine) == (6 + 6, 2, 2)  # users 1 and 3 again, from their caches; user 2's failure not


def test_a_failed_append_leaves_the_stored_state_unchanged():
    engine = _engine("hstu")
    engine.rank([RankJob("4", np.array([1, 2]), None, None)])  # user 4 cached
    before = engine.store.get("4")
    history, cache = before.history, before.cache

    def broken(*args):
        raise RuntimeError("device lost")

    engine.scorer.extend = broken
    new = History.build([5], [1], [0.0], [10_000], 0)
    result = engine.append_events([EventsJob("4", new)])[0]
    assert isinstance(result, ServiceError) and result.status == 500
    after = engine.store.get("4")
    assert after.history is history and after.cache is cache
    late = engine.append_events([EventsJob("4", History.build([5], [1], [0.0], [1], 0))])[0]
    assert (late.status, late.field) == (422, "events[0].time")
    assert engine.store.get("4").history is history


@pytest.mark.parametrize("name", ["genrank", "unigrf", "hstu"])
def test_batched_rank_equals_each_request_scored_alone_for_every_ranker(name):
    engine = _engine(name)
    jobs = [RankJob(str(u), np.array([1, 2, u + 3]), None, None) for u in (1, 2, 3)]
    together = engine.rank(jobs)
    for job, result in zip(jobs, together, strict=True):
        history = engine.store.get(job.user).history
        with torch.no_grad():
            batch = history_batch([history], torch.device("cpu"))
            cands = torch.from_numpy(job.candidates)[None]
            when = torch.tensor([int(history.timestamps[-1])])
            logits = engine.model.score(batch, cands, when)  # [1, M, T]
        np.testing.assert_allclose(result["scores"], torch.sigmoid(logits)[0].numpy(), atol=1e-6)


def test_recommend_leaves_seen_items_out_unless_asked():
    engine = _engine("unigrf")
    seen = set(engine.store.get("5").history.items.tolist())
    (top,) = engine.recommend([RecommendJob("5", None, 10, False)])
    assert len(top["items"]) == 10 and not seen & {int(i) for i in top["items"]}
    assert top["scores"] == sorted(top["scores"], reverse=True)
    assert all(0 < p < 1 for p in top["probabilities"]["rating>3"])
    (everything,) = engine.recommend([RecommendJob("5", None, INFO.num_items, True)])
    assert len(everything["items"]) == INFO.num_items
    (refused,) = _engine("dfgr").recommend([RecommendJob("5", None, 3, False)])
    assert isinstance(refused, ServiceError) and refused.status == 400


def test_batched_recommend_equals_each_request_alone_and_a_bad_one_fails_alone(monkeypatch):
    engine = _engine("unigrf")
    seed = engine.store.seed
    engine.store.seed = lambda user: None if user == "nobody" else seed(user)
    jobs = [RecommendJob("5", None, 10, False), RecommendJob("nobody", None, 3, False),
            RecommendJob("6", None, 4, True), RecommendJob("7", None, 13, False), RecommendJob("8", None, 1, False)]
    alone = [engine.recommend([job])[0] for job in jobs]

    def check(together, failed: set[int]):
        for b, (one, batched) in enumerate(zip(alone, together, strict=True)):
            if b in failed:
                continue
            assert batched["items"] == one["items"] and len(one["items"]) == jobs[b].k
            np.testing.assert_allclose(batched["scores"], one["scores"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(batched["probabilities"]["rating>3"], one["probabilities"]["rating>3"],
                                       rtol=0, atol=1e-6)

    together = engine.recommend(jobs)
    assert (together[1].status, together[1].field) == (404, "user")
    check(together, {1})
    top_items = engine_module.top_items

    def fragile(model, histories, ks, *args):  # a batch holding the k = 13 job breaks
        if 13 in ks:
            raise RuntimeError("kernel failure")
        return top_items(model, histories, ks, *args)

    monkeypatch.setattr(engine_module, "top_items", fragile)
    together = engine.recommend(jobs)
    assert together[3].status == 500 and "kernel failure" in together[3].message
    check(together, {1, 3})


def test_times_the_kernels_cannot_take_are_refused_on_the_host_and_scoring_skips_the_device_check():
    engine = _engine("dfgr")
    late = 2**31
    (refused,) = engine.rank([RankJob("3", np.array([1, 2]), late, None)])
    assert (refused.status, refused.field) == (422, "request_time")
    early = History.build([1, 2], [0, 1], [0.0, 1.0], [-5, 10], 0)
    (refused,) = engine.rank([RankJob(None, np.array([1]), None, early)])
    assert (refused.status, refused.field) == (422, "history") and "-5" in refused.message
    before = engine.store.get("3").history
    (refused,) = engine.append_events([EventsJob("3", History.build([5], [1], [0.0], [late], 0))])
    assert (refused.status, refused.field) == (422, "events") and engine.store.get("3").history is before

    checked = []
    score_cached = engine.scorer.score_cached

    def spying(*args):
        checked.append(getattr(layout_module._host_checked, "on", False))
        return score_cached(*args)

    engine.scorer.score_cached = spying
    (ok,) = engine.rank([RankJob("3", np.array([1, 2]), None, None)])
    assert "scores" in ok and checked == [True]  # scored with the device read-back skipped
    assert not getattr(layout_module._host_checked, "on", False)  # and only inside the handler


def _user_engine(model, users: int = INFO.num_users) -> Engine:
    """An engine whose catalogue has ``users`` dataset users ``"0" .. "users-1"``, user ``u`` seeded with
    dense index ``u``; other users start with ``/events``."""
    catalogue = Catalogue([str(i) for i in range(1, INFO.num_items + 1)], INFO.rating_values, 3.0, 0,
                          [str(u) for u in range(users)])

    def seed(user: str) -> History | None:
        if user not in catalogue.user_index:
            return None
        rng = np.random.default_rng(int(user))
        n = 8 + int(user)
        return History.build(rng.integers(1, 41, n), rng.integers(0, 5, n), np.ones(n), np.arange(n) * 100, 0,
                             catalogue.user_index[user])

    return Engine(model.float().eval(), catalogue, UserStore(1 << 20, seed), torch.device("cpu"), max_history=32)


@pytest.mark.parametrize("name", ["deepfm", "din"])
def test_ctr_rankers_score_a_request_as_its_own_user_wherever_it_sits_in_the_batch(name):
    """The batch's user column is each user's dense index, not the row's position in the batch."""
    engine = _user_engine(make(name))
    cands = np.array([1, 2, 3, 4])
    alone = engine.rank([RankJob("7", cands, None, None)])[0]["scores"]
    third = engine.rank([RankJob(u, cands, None, None) for u in ("1", "2", "7")])[2]["scores"]
    history = engine.store.get("7").history
    with torch.no_grad():
        batch = collate([(7, history.items, history.actions, history.labels, history.timestamps,
                          history.request_ids, len(history))])
        offline = torch.sigmoid(engine.model.score(batch, torch.from_numpy(cands)[None],
                                                   torch.tensor([int(history.timestamps[-1])])))[0].numpy()
    np.testing.assert_allclose(alone, offline, rtol=0, atol=1e-6)
    np.testing.assert_allclose(third, offline, rtol=0, atol=1e-6)


def test_bprmf_recommends_each_user_from_their_own_embedding():
    engine = _user_engine(make("bprmf"))
    for user in (1, 4):
        (top,) = engine.recommend([RecommendJob(str(user), None, 5, True)])
        with torch.no_grad():
            scores = engine.model.user_emb.weight[user] @ engine.model.item_emb.weight[1:].T  # [I]
        assert [int(i) for i in top["items"]] == (scores.topk(5).indices + 1).tolist()


def test_only_models_that_read_user_ids_refuse_a_user_the_training_data_does_not_have():
    """No OOV row in the user tables: a CTR ranker refuses a new or anonymous user (422) instead of
    scoring it as dataset user 0; a sequence model serves it."""
    events = History.build([3, 4], [1, 2], [0.0, 1.0], [10, 20], 0)
    for name, refuses in (("deepfm", True), ("bprmf", True), ("hstu", False)):
        engine = _user_engine(make(name))
        assert engine.model.reads_user_ids == refuses
        assert engine.append_events([EventsJob("newcomer", events)])[0]["mode"] == "new"  # stored either way
        if "ranking" in engine.model.tasks:
            results = engine.rank([RankJob("newcomer", np.array([1]), None, None),
                                   RankJob(None, np.array([1]), None, events), RankJob("3", np.array([1]), None, None)])
        else:
            results = engine.recommend([RecommendJob("newcomer", None, 3, True), RecommendJob(None, events, 3, True),
                                        RecommendJob("3", None, 3, True)])
        assert isinstance(results[2], dict)  # a dataset user is served
        for result in results[:2]:
            assert isinstance(result, ServiceError) == refuses
            if refuses:
                assert (result.status, result.field) == (422, "user") and "user embedding" in result.message


def test_recommend_leaves_out_items_that_fell_out_of_the_stored_window(tmp_path):
    """Offline leaves the whole history out; the service keeps every seen item beyond its max_len
    window (here: the seed's older dataset items and appended events the window dropped), also
    across a restart from its snapshot."""
    engine = _engine("unigrf")
    engine.store.seed = lambda user: History.build([1, 2], [0, 0], [1.0, 1.0], [0, 100], 0, seen=np.arange(1, 11))
    long = History.build(np.arange(36) % 30 + 11, np.zeros(36), np.ones(36), 200 + np.arange(36) * 100, 0)
    assert engine.append_events([EventsJob("9", long)])[0]["mode"] == "window"  # 38 events > max_history 32
    held = engine.store.get("9").history
    assert len(held) == 24 and not set(range(17, 23)) & set(held.items.tolist())  # dropped from the window ...
    (everything,) = engine.recommend([RecommendJob("9", None, INFO.num_items, False)])
    assert everything["items"] == []  # ... yet still seen: items 1-10 (dataset), 11-40 (appended)
    engine.save(tmp_path / "users.parquet")  # and after a restart from the snapshot
    restarted = _engine("unigrf")
    restarted.store.seed = engine.store.seed
    restarted.load(tmp_path / "users.parquet")
    (everything,) = restarted.recommend([RecommendJob("9", None, INFO.num_items, False)])
    assert everything["items"] == []


def test_the_users_gauge_counts_users_seeded_by_recommend_and_history_reads():
    engine = _engine("unigrf")
    users = engine.metrics.users
    engine.recommend([RecommendJob(u, None, 3, False) for u in ("1", "2", "3")])
    assert users._value.get() == len(engine.store) == 3
    engine.user_history(["4", "5"])
    assert users._value.get() == len(engine.store) == 5
