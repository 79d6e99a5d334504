"""The evaluation loop: what it scores, in what precision, and the per-request query protocol."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from genrec.data.batching import JaggedBatch
from genrec.eval.evaluate import evaluate, request_queries
from genrec.eval.metrics import RetrievalAccumulator
from tests.helpers import make_batch
from tests.models.test_retrieval_baselines import RETRIEVAL, _model
from tests.models.test_unigrf import make_unigrf


class FixedRetrieval(torch.nn.Module):
    """A retrieval model with a fixed item table and a fixed query for each event of the batch."""

    tasks = ("retrieval",)

    def __init__(self, num_items: int, dim: int, events: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.items = torch.randn(num_items + 1, dim, generator=g)  # [I + 1, D]
        self.queries = torch.randn(events, dim, generator=g)  # [T, D]

    def item_embeddings(self) -> torch.Tensor:
        return self.items

    def retrieval_queries(self, batch) -> torch.Tensor:
        return batch.at_targets(self.queries)


def test_autocast_evaluation_ranks_the_catalogue_in_float32():
    """Each target is the 4th best item in float32; a bfloat16 catalogue product ties it with its
    neighbours (HR@10 fell to ~0.8), the float32 one keeps the exact ranks under autocast too."""
    batch = make_batch([30] * 10, 0)  # 300 targets
    model = FixedRetrieval(num_items=4000, dim=64, events=batch.num_events)
    scores = model.queries[batch.target_mask] @ model.items.T  # [N, I + 1]
    scores[:, 0] = float("-inf")
    batch.items[batch.target_mask] = scores.argsort(1, descending=True)[:, 3]
    exact = evaluate(model, [batch], torch.device("cpu"), ks=(3, 4, 10))
    assert (exact["hr@3"], exact["hr@4"], exact["mrr"]) == (0.0, 1.0, 0.25)
    assert evaluate(model, [batch], torch.device("cpu"), ks=(3, 4, 10), autocast=True) == exact


def test_per_request_metrics_rank_each_target_from_its_requests_first_query_without_its_other_items():
    """``hr@K/request`` etc. against a loop over the targets: each ranked from the query of its
    request's first event, the request's other items left out of its catalogue (its own kept, also
    where another event of the request has the same item); targets in every position of a request,
    and requests whose first event is not a target."""
    batch = make_batch([9, 1, 14, 6], seed=0, all_targets=False)
    start, items = batch.request_starts(), batch.items
    shared = next(e for e in range(1, batch.num_events) if start[e] == start[e - 1] and batch.target_mask[e])
    items[shared] = items[shared - 1]  # a target whose request holds its item twice
    assert (batch.target_mask & (start != torch.arange(batch.num_events))).sum() > 3
    assert (~batch.target_mask[start[batch.target_mask]]).any()
    model = FixedRetrieval(num_items=40, dim=8, events=batch.num_events)
    expected = RetrievalAccumulator((1, 5, 10))
    for t in torch.nonzero(batch.target_mask)[:, 0].tolist():
        scores = model.queries[start[t]] @ model.items.T  # [I + 1]
        scores[0] = float("-inf")
        for e in range(batch.num_events):
            if start[e] == start[t] and items[e] != items[t]:
                scores[items[e]] = float("-inf")
        expected.update(scores[None], items[t: t + 1])
    metrics = evaluate(model, [batch], torch.device("cpu"), ks=(1, 5, 10))
    want = expected.compute()
    assert {k: metrics[f"{k}/request"] for k in want if k != "retrieval_targets"} == pytest.approx(
        {k: v for k, v in want.items() if k != "retrieval_targets"}, abs=1e-12)
    assert metrics["mrr/request"] != metrics["mrr"]  # the protocols differ on this batch


def test_per_request_metrics_equal_per_event_ones_when_every_request_is_one_event():
    batch = make_batch([9, 1, 14], seed=4)
    batch.request_ids = batch.positions()
    model = FixedRetrieval(num_items=40, dim=8, events=batch.num_events)
    metrics = evaluate(model, [batch], torch.device("cpu"), ks=(5,))
    for name in ("hr@5", "ndcg@5", "mrr"):
        assert metrics[f"{name}/request"] == metrics[name]


def test_the_query_batch_forgets_what_its_batch_knew_of_its_targets():
    """The per-request pass adds first events to the targets: a moved batch's carried target count,
    most targets of a row and first target (where a model's last block starts) no longer hold, and
    the query batch must not carry them (they would be read on a GPU, where the offsets are)."""
    batch = make_batch([9, 1, 14], seed=4, all_targets=False)
    known = dataclasses.replace(batch, known_num_targets=batch.num_targets, known_max_targets=batch.max_targets,
                                known_first_target=batch.first_target)
    query = request_queries(known).batch
    assert (query.known_num_targets, query.known_max_targets, query.known_first_target) == (None, None, None)


def _both(model, batch: JaggedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's per-request and per-event query from the evaluation's one pass, ``[N_t, D]`` each."""
    request = request_queries(batch)
    with torch.no_grad():
        queries = model.retrieval_queries(request.batch)
    return queries[request.per_request], queries[request.per_event]


@pytest.mark.parametrize("name", [*RETRIEVAL, "unigrf-hstu", "unigrf-llama"])
def test_a_per_request_query_reads_nothing_of_its_request_or_after(name):
    """Every retrieval model, in float64: changing the items, actions and labels of a request and
    of everything after it leaves the per-request queries of that request's targets bit-identical
    (the per-event queries of its later events move: they read its earlier items). The one pass
    over targets and first events gives each target the query a pass over the targets alone does."""
    model = make_unigrf(name.split("-")[1]) if name.startswith("unigrf") else _model(name)
    half = make_batch([13, 1, 7, 20], seed=3, all_targets=False)  # first events that are not targets
    assert (~half.target_mask[half.request_starts()[half.target_mask]]).any()
    with torch.no_grad():
        assert torch.equal(_both(model, half)[1], model.retrieval_queries(half))
    batch = make_batch([13, 1, 7, 20], seed=2)
    start = batch.request_starts()
    with torch.no_grad():
        before_event = model.retrieval_queries(batch)
    before = _both(model, batch)[0]
    for b in (0, 3):
        first, end = int(batch.offsets[b]), int(batch.offsets[b + 1])
        r = next(e for e in range(first + 3, end) if start[e] == e and e + 1 < end and start[e + 1] == e)
        changed = JaggedBatch(**{k: v.clone() for k, v in batch.tensors().items()})
        changed.items[r:end] = changed.items[r:end] % 40 + 1
        changed.actions[r:end] = (changed.actions[r:end] + 1) % 5
        changed.labels[r:end] = 1 - changed.labels[r:end]
        in_request = start[batch.target_mask] == r  # [N_t]
        assert torch.equal(_both(model, changed)[0][in_request], before[in_request])
        if name != "bprmf":  # a user vector: every query is the same
            with torch.no_grad():
                assert not torch.equal(model.retrieval_queries(changed)[in_request], before_event[in_request])
