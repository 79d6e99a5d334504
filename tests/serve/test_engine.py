"""The service's engine without HTTP: a job that breaks a batched scoring call fails alone (the rest of
the batch is scored as if alone), and a failed append leaves the user's stored state untouched."""

from __future__ import annotations

import numpy as np
import torch

from genrec.serve.engine import Catalogue, Engine, EventsJob, RankJob, ServiceError
from genrec.serve.store import History, UserStore
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


def test_a_job_that_breaks_the_batch_fails_alone():
    engine = _engine()
    jobs = [RankJob(str(u), np.array([1, 2, POISON if u == 2 else 3]), None, None) for u in (1, 2, 3)]
    alone = {j.user: engine.rank([j])[0]["scores"] for j in jobs if j.user != "2"}
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


def test_a_failed_append_leaves_the_stored_state_unchanged():
    engine = _engine("hstu")
    engine.rank([RankJob("4", np.array([1, 2]), None, None)])  # user 4 cached
    before = engine.store.get("4")
    history, cache = before.history, before.cache

    def broken(*args):
        raise RuntimeError("device lost")

    engine.model.extend_history = broken
    new = History.build([5], [1], [0.0], [10_000], 0)
    result = engine.append_events([EventsJob("4", new)])[0]
    assert isinstance(result, ServiceError) and result.status == 500
    after = engine.store.get("4")
    assert after.history is history and after.cache is cache
    late = engine.append_events([EventsJob("4", History.build([5], [1], [0.0], [1], 0))])[0]
    assert (late.status, late.field) == (422, "events[0].time")
    assert engine.store.get("4").history is history
