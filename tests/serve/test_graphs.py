"""CUDA-graph serving (:mod:`genrec.serve.graphs`) gives the eager scores, for new users and new
candidates replayed through the same graphs, and refuses what it cannot replay."""

from __future__ import annotations

import pytest
import torch

from genrec.models import build_model
from genrec.nn.events import Events
from genrec.nn.kv_cache import in_micro_batches
from tests.helpers import make_batch
from tests.models.test_generative import INFO

CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def _model(name: str, backend: str, device: str):
    torch.manual_seed(0)
    args = {"d_model": 64, "num_heads": 2, "num_layers": 2, "dropout": 0.0, "attention_backend": backend}
    return build_model(name, args, INFO, 128).to(device).eval()


def test_graphed_serving_refuses_cpu_tensors_and_training_mode():
    from genrec.serve.graphs import GraphedServing

    model = _model("dfgr", "reference", "cpu")
    ev = Events.from_batch(make_batch([12], seed=1))
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedServing(model, ev, 4)


@gpu_only
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", ["hstu", "dfgr"])
def test_graph_replays_match_eager_scoring_for_new_users_and_candidates(name, backend):
    from genrec.serve.graphs import GraphedServing

    model = _model(name, backend, "cuda")
    with pytest.raises(ValueError, match="eval"):
        GraphedServing(model.train(), Events.from_batch(make_batch([40], seed=1).to("cuda")), 4)
    model.eval()
    users = [make_batch([40], seed=seed).to("cuda") for seed in (1, 2, 3)]  # equal lengths: one graph shape
    gen = torch.Generator("cuda").manual_seed(0)
    served = GraphedServing(model, Events.from_batch(users[0]), 10, micro_batch=4, dtype=torch.float32)
    for user in users:
        ev = Events.from_batch(user)
        when = user.timestamps[-1:] + 60
        for _ in range(2):
            cands = torch.randint(1, 41, (1, 10), device="cuda", generator=gen)
            with torch.no_grad():
                want = in_micro_batches(model.kv_serving.score_cached, model.kv_serving.encode_history(user, 4),
                                        cands, when)
            cold = served.cold(ev, cands, when)
            warm = served.score(cands, when)  # the history encoded by the cold call
            torch.testing.assert_close(cold, want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(warm, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="2\\^31"):  # int32 time differences, checked outside the graph
        served.score(cands, when + 2**31)
    with pytest.raises(ValueError, match="candidates have shape"):
        served.score(torch.ones(1, 11, dtype=torch.long, device="cuda"), when)
    with pytest.raises(ValueError, match="events.items"):
        served.encode(Events.from_batch(make_batch([41], seed=4).to("cuda")))


def test_buckets_are_powers_of_two_capped_at_the_limit():
    from genrec.serve.graphs import bucket

    assert [bucket(s, 48) for s in (1, 2, 3, 5, 16, 17, 40, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    with pytest.raises(ValueError, match="outside"):
        bucket(49, 48)


@pytest.mark.parametrize("name", ["hstu", "dfgr"])
def test_padding_a_batch_to_its_bucket_changes_no_score(name):
    """What the graphs replay, run eagerly on CPU: padded to the bucket, cut back, equal to unpadded."""
    from genrec.serve.graphs import pad_events, pad_rows

    model = _model(name, "reference", "cpu")
    batch = make_batch([9, 14, 5], seed=2)
    ev = Events.from_batch(batch)
    cands = torch.randint(1, 41, (3, 5), generator=torch.Generator().manual_seed(0))
    when = batch.timestamps[batch.offsets[1:] - 1] + 60
    with torch.no_grad():
        want = model.score(batch, cands, when)
        padded = pad_events(ev, 4, 16)
        cache = model.kv_serving.encode_events(padded, 8)
        got = in_micro_batches(model.kv_serving.score_cached, cache, pad_rows(cands, 4, 8), pad_rows(when, 4))
    assert got.shape == (4, 8, 1)
    torch.testing.assert_close(got[:3, :5], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[3], got[2])  # the copied row


@gpu_only
@pytest.mark.parametrize("name", ["hstu", "dfgr"])
def test_bucketed_graphs_give_the_eager_scores_for_any_batch(name):
    from genrec.serve.graphs import BucketedGraphs

    model = _model(name, "triton", "cuda")
    graphs = BucketedGraphs(model, max_batch=8, max_history=128, max_candidates=64, max_graphs=2)
    for lengths, m in (([40, 17, 33], 10), ([40, 17, 33], 12), ([7], 3), ([100, 5, 60, 2, 9], 33)):
        batch = make_batch(lengths, seed=len(lengths) + m).to("cuda")
        cands = torch.randint(1, 41, (len(lengths), m), device="cuda")
        when = batch.timestamps[batch.offsets[1:] - 1] + 60
        with torch.no_grad():
            want = model.score(batch, cands, when)
        got = graphs.score(Events.from_batch(batch), cands, when)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(graphs.graphs) == 2  # least recently used dropped
