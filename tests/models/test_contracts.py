"""The model contracts of :mod:`genrec.models.base`, for every registered model: what ``tasks``
promises exists, and every ranker's serving interface ``score(history, candidates, request_time)``
gives, for a request's events shown as candidates after the history before it, the scores the
offline pass (``rank_logits``) gives those events as targets (fp64)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from genrec.data.batching import JaggedBatch
from genrec.models import MODELS, build_model
from genrec.models.base import RecModel
from tests.helpers import make_batch
from tests.models.test_generative import INFO

RANKERS = sorted(name for name in MODELS if "ranking" in build_model(name, {}, INFO, 32).tasks)
# SASRec reads items only, and lets an event read the items of its own request before it; every other
# ranker hides the whole request, so candidates shown together score as the request's targets do.
SAME_REQUEST_VISIBLE = {"sasrec"}
SINGLE_SIGNAL = {"sasrec"}  # ranks the label only


def make(name: str, **args) -> RecModel:
    torch.manual_seed(0)
    fields = MODELS[name][1].__dataclass_fields__
    base = {k: v for k, v in {"d_model": 16, "dropout": 0.0, "num_heads": 2}.items() if k in fields}
    model = build_model(name, base | args, INFO, 32).to(torch.float64).eval()
    with torch.no_grad():  # HSTU's relative position / time tables start at 0: make position and time matter
        for param_name, param in model.named_parameters():
            if param_name.endswith(("rel_pos", "rel_time")):
                param.normal_(0, 0.5)
    return model


def _select(batch: JaggedBatch, b: int, events: torch.Tensor, target: bool) -> JaggedBatch:
    """One sequence made of ``events`` (flat indices into ``batch``) of sequence ``b``."""
    return JaggedBatch(offsets=torch.tensor([0, len(events)]), items=batch.items[events],
                       actions=batch.actions[events], labels=batch.labels[events],
                       timestamps=batch.timestamps[events], request_ids=batch.request_ids[events],
                       target_mask=torch.full((len(events),), target), users=batch.users[b: b + 1])


def _batch_with_targets_from_a_request(seed: int) -> JaggedBatch:
    """Random sequences whose targets are every event from the request at mid-sequence on."""
    batch = make_batch([13, 9, 20, 6], seed)
    for b in range(batch.batch_size):
        s, e = int(batch.offsets[b]), int(batch.offsets[b + 1])
        first = int(batch.request_ids[s + (e - s) // 2])
        batch.target_mask[s:e] = batch.request_ids[s:e] >= first
    return batch


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_declares_its_tasks_and_fulfils_them(name):
    model = make(name)
    assert model.tasks and set(model.tasks) <= {"ranking", "retrieval"}
    batch = make_batch([6, 1, 11], seed=0, all_targets=False)
    num_targets = int(batch.target_mask.sum())
    history, candidates, when = batch, torch.tensor([[3, 5], [7, 9], [11, 2]]), batch.timestamps[batch.offsets[1:] - 1]
    with torch.no_grad():
        if "ranking" in model.tasks:
            assert model.rank_logits(batch).shape == (num_targets,)
            scores = model.score(history, candidates, when)
            assert scores.shape == (3, 2, len(model.actions)) and torch.isfinite(scores).all()
        else:
            with pytest.raises(NotImplementedError, match="does not rank"):
                model.score(history, candidates, when)
        if "retrieval" in model.tasks:
            queries, items = model.retrieval_queries(batch), model.item_embeddings()
            assert queries.shape[0] == num_targets and items.shape == (INFO.num_items + 1, queries.shape[1])
        else:
            with pytest.raises(NotImplementedError, match="does not retrieve"):
                model.item_embeddings()


@pytest.mark.parametrize("name", RANKERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_serving_scores_equal_the_offline_scores_of_the_same_request(name, seed):
    model = make(name)
    batch = _batch_with_targets_from_a_request(seed)
    with torch.no_grad():
        offline = model.rank_logits(batch)  # flat target order
    target_index = torch.cumsum(batch.target_mask.long(), 0) - 1  # flat event -> its place in `offline`
    checked = 0
    for b in range(batch.batch_size):
        events = torch.arange(int(batch.offsets[b]), int(batch.offsets[b + 1]))
        targets = events[batch.target_mask[events]]
        request = batch.request_ids[targets[0]]
        shown = events[batch.request_ids[events] == request]  # the first target request's events
        before = events[batch.request_ids[events] < request]
        if len(before) == 0:
            continue
        with torch.no_grad():
            served = model.score(_select(batch, b, before, False), batch.items[shown][None],
                                 batch.timestamps[shown[:1]])[0, :, 0]  # [M]
        compared = shown[:1] if name in SAME_REQUEST_VISIBLE else shown
        want = offline[target_index[compared]]
        torch.testing.assert_close(served[: len(compared)], want, rtol=0, atol=1e-9)
        checked += len(compared)
    assert checked >= 3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_serving_reads_user_ids_exactly_where_the_model_says(name):
    """``reads_user_ids`` decides whom the service may score (only training users where it is set):
    the serving outputs move with the batch's user indices where it is set, and never elsewhere."""
    model = make(name)
    batch = make_batch([5, 12, 1], seed=3)
    moved = dataclasses.replace(batch, users=(batch.users + 1) % INFO.num_users)
    candidates, when = torch.tensor([[1, 2], [5, 6], [9, 10]]), batch.timestamps[batch.offsets[1:] - 1] + 60
    calls = [lambda b: model.score(b, candidates, when)] if "ranking" in model.tasks else []
    calls += [model.retrieval_queries] if "retrieval" in model.tasks else []
    with torch.no_grad():
        same = [torch.equal(call(batch), call(moved)) for call in calls]
    assert not all(same) if model.reads_user_ids else all(same)


@pytest.mark.parametrize("name", RANKERS)
def test_scoring_a_batch_of_users_equals_scoring_each_alone(name):
    model = make(name)
    batch = make_batch([5, 12, 1], seed=3)
    candidates = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    when = batch.timestamps[batch.offsets[1:] - 1] + 60
    with torch.no_grad():
        together = model.score(batch, candidates, when)
        for b in range(3):
            events = torch.arange(int(batch.offsets[b]), int(batch.offsets[b + 1]))
            alone = model.score(_select(batch, b, events, True), candidates[b: b + 1], when[b: b + 1])
            torch.testing.assert_close(together[b: b + 1], alone, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", RANKERS)
def test_every_signal_is_named_and_scored(name):
    info = dataclasses.replace(INFO, signal_names=["like", "five_star"])
    torch.manual_seed(0)
    fields = MODELS[name][1].__dataclass_fields__
    model = build_model(name, {k: v for k, v in {"d_model": 16, "dropout": 0.0}.items() if k in fields}, info, 32)
    batch = make_batch([7], seed=2)
    with torch.no_grad():
        scores = model.eval().score(batch, torch.tensor([[4, 8]]), batch.timestamps[-1:])
    assert model.actions == ("like", "five_star") or name in SINGLE_SIGNAL, model.actions
    assert scores.shape == (1, 2, len(model.actions))


def test_unknown_attention_backend_is_rejected_when_the_model_is_built():
    with pytest.raises(ValueError, match="attention_backend = .fast.: expected one of"):
        make("dfgr", attention_backend="fast")


def test_a_model_max_len_that_differs_from_the_data_is_rejected():
    """data.max_len is the one source of the position tables and HSTU's attention scale."""
    with pytest.raises(ValueError, match="model_args.max_len=64 differs from data.max_len=32"):
        build_model("hstu", {"max_len": 64}, INFO, 32)
    assert build_model("dfgr", {"max_len": 32}, INFO, 32).cfg.max_len == 32
