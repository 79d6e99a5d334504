"""Per-user KV caches as a service uses them: extending a cache with new events equals re-encoding the
whole history, and stacking exact-length caches of different users into one padded batch scores each
user as if alone."""

from __future__ import annotations

import pytest
import torch

from genrec.data.batching import JaggedBatch
from genrec.nn import kv_cache
from tests.helpers import make_batch
from tests.models.test_generative import make_model


def _prefix(batch: JaggedBatch, n: int) -> JaggedBatch:
    """The first ``n`` events of a one-row batch."""
    return JaggedBatch(**{k: (v[:n] if k not in ("offsets", "users") else v) for k, v in batch.tensors().items()}
                       | {"offsets": torch.tensor([0, n])})


@pytest.mark.parametrize("name", ["hstu", "dfgr"])
@pytest.mark.parametrize("cut", [1, 6, 7, 18])  # cuts inside a request (equal timestamps) and between
def test_extending_a_cache_with_new_events_equals_a_full_re_encode(name, cut):
    model = make_model(name, torch.float64)
    full = make_batch([19], seed=5)
    with torch.no_grad():
        serving = model.kv_serving
        grown = serving.extend_history(serving.encode_history(_prefix(full, cut), capacity=0), full)
        whole = serving.encode_history(full, capacity=0)
        cands = torch.tensor([[3, 9, 27, 3]])
        when = full.timestamps[-1:] + 60
        scores = [kv_cache.in_micro_batches(serving.score_cached, kv_cache.stack([c], capacity=4), cands, when)
                  for c in (grown, whole)]
    assert grown.layout.shape == whole.layout.shape and len(grown.layers) == len(whole.layers)
    for g, w in zip(grown.layers, whole.layers, strict=True):
        assert g.length == w.length and torch.allclose(g.keys, w.keys, atol=1e-12)
        assert torch.allclose(g.values, w.values, atol=1e-12)
    assert torch.allclose(scores[0], scores[1], atol=1e-12)
    assert torch.allclose(scores[1], model.score(full, cands, when), atol=1e-12)


def test_extend_refuses_a_cache_that_is_not_a_prefix_of_the_layout():
    model = make_model("dfgr", torch.float64)
    full = make_batch([10], seed=1)
    with torch.no_grad():
        cache = model.kv_serving.encode_history(full, capacity=0)
        with pytest.raises(ValueError, match="cached"):
            model.kv_serving.extend_history(cache, _prefix(full, 6))


@pytest.mark.parametrize("name", ["hstu", "dfgr"])
def test_stacked_per_user_caches_score_each_user_as_alone(name):
    model = make_model(name, torch.float64)
    users = [make_batch([n], seed=s) for s, n in ((1, 12), (2, 3), (3, 20))]
    with torch.no_grad():
        serving = model.kv_serving
        batched = serving.encode_history(make_batch([12, 3, 20], seed=0), capacity=0)  # padded rows
        rows = kv_cache.split(batched)
        assert [r.layout.shape[1] for r in rows] == [n * (2 if name == "hstu" else 1) for n in (12, 3, 20)]
        assert all(r.layers[0].keys.shape[1] == r.layers[0].length for r in rows)  # exact length, no spare room
        caches = [serving.encode_history(u, capacity=0) for u in users]
        cands = torch.tensor([[5, 6, 0], [7, 0, 0], [1, 2, 3]])  # padded with item 0
        when = torch.stack([u.timestamps[-1] + 60 for u in users])
        together = serving.score_cached(kv_cache.stack(caches, capacity=3), cands, when)
        for row, u in enumerate(users):
            alone = model.score(u, cands[row:row + 1], when[row:row + 1])
            assert torch.allclose(together[row], alone[0], atol=1e-12)
    assert kv_cache.nbytes(caches[0]) == sum(layer.keys.nbytes * 2 for layer in caches[0].layers)
