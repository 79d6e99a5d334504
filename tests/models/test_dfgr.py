"""DFGR's fake flow of the target events only (``fake_flow="targets"``, ``[real N | fake T]``) is the
dense fake flow's model: the same logits and gradients at the targets, on the reference backend and
on the fused Triton kernels, and the same serving. (Its leakage tests run in test_generative.py as
``dfgr_sparse``.)"""

from __future__ import annotations

import os

import pytest
import torch

from genrec.errors import ConfigError
from genrec.models import build_model
from genrec.nn import kv_cache
from genrec.nn.events import Events
from tests.helpers import make_batch, with_last_targets
from tests.models.test_generative import INFO, make_model

CUDA = torch.cuda.is_available()
KERNELS = CUDA or os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it when Triton is here
DEVICE = "cuda" if CUDA else "cpu"


def _pair(dtype=torch.float64, **args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Dense and target-only fake flow with the same weights."""
    dense, sparse = make_model("dfgr", dtype, **args), make_model("dfgr", dtype, fake_flow="targets", **args)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def _loss_and_grads(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    loss = model(batch)["loss"]
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("share", [1.0, 0.1])  # every event a target; the last ~10 % of each sequence
@pytest.mark.parametrize("lengths", [[13, 1, 7, 20, 33], [3, 41, 2, 17], [29]])
def test_target_fake_flow_gives_the_dense_logits_and_gradients(lengths, share):
    batch = with_last_targets(make_batch(lengths, seed=len(lengths) + sum(lengths)), share)
    dense, sparse = _pair()
    with torch.no_grad():
        want, got = dense.rank_logits(batch), sparse.rank_logits(batch)
    assert got.shape == (int(batch.target_mask.sum()),)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    (loss, grads), (want_loss, want_grads) = _loss_and_grads(sparse, batch), _loss_and_grads(dense, batch)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads, want_grads, rtol=0, atol=1e-10)


def test_the_target_fake_flows_forward_on_a_moved_batch_reads_nothing_back_from_the_device():
    """On the ``meta`` device any host read raises (as in tests/ops/triton/test_tiles.py): DFGR sizes
    its target-only fake flow by the most targets of a row, which the batch carried from the host,
    and gathers at the targets by their number, so events, layout, blocks and the gather build
    there (the whole step: test_generative.py); a batch built on the device reads T back."""
    from genrec.data.batching import JaggedBatch
    from genrec.ops.layout import time_spans_checked_on_host

    model = make_model("dfgr", torch.float32, fake_flow="targets").to("meta")
    batch = with_last_targets(make_batch([37, 90, 5, 61, 1], seed=2), 0.1).to("meta")
    with time_spans_checked_on_host():
        assert model.target_hidden(batch).device.type == "meta"
        built_there = JaggedBatch(**batch.tensors(), known_max_len=batch.known_max_len,
                                  known_num_targets=batch.known_num_targets)  # T unknown
        with pytest.raises(RuntimeError, match="meta"):  # the test can fail: a read of T is caught
            model.target_hidden(built_there)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


@pytest.mark.skipif(not KERNELS, reason="needs a CUDA device, or Triton (the dev extra) for its CPU interpreter")
@pytest.mark.parametrize("share", [1.0, 0.1])
def test_target_fake_flow_on_the_triton_kernels_matches_the_dense_reference(share):
    """fp32, head dim 16, a sequence of 70 events (its real flow spans two 64-token tiles): the kernels
    on the compacted layout against the reference on the dense one, hidden states at the targets and
    every parameter's gradient of a fixed random loss on them (the triton dense run beside it)."""
    from genrec.ops.triton.backend import TRITON

    batch = with_last_targets(make_batch([70, 1, 23], seed=8), share).to(DEVICE)
    runs = {}
    for backend, fake_flow in (("reference", "dense"), ("triton", "dense"), ("triton", "targets")):
        model = make_model("dfgr", torch.float32, d_model=32, fake_flow=fake_flow).to(DEVICE)
        if backend == "triton":
            for block in model.blocks:  # on CPU, the kernels under the interpreter (get_backend wants CUDA)
                block.backend = TRITON
        hidden = model.target_hidden(batch)  # [num_targets, D]
        upstream = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        (hidden * upstream).sum().backward()
        runs[backend, fake_flow] = hidden.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                               if p.grad is not None])
    want_hidden, want_grads = runs["reference", "dense"]
    assert want_hidden.shape[0] == int(batch.target_mask.sum())
    for key in (("triton", "dense"), ("triton", "targets")):
        assert _rel_error(runs[key][0], want_hidden) <= 1e-4, key
        assert _rel_error(runs[key][1], want_grads) <= 1e-4, key


def test_serving_is_unchanged_by_the_fake_flow_switch():
    """Candidates are fake tokens after a cached history either way: the switch is a training layout."""
    dense, sparse = _pair()
    history = make_batch([12, 3, 20], seed=2)
    cands = torch.tensor([[3, 9, 27], [1, 2, 5], [40, 11, 7]])
    when = history.timestamps[history.offsets[1:] - 1] + 60
    with torch.no_grad():
        scores = [kv_cache.in_micro_batches(m.kv_serving.score_cached, m.kv_serving.encode_history(history, 2),
                                            cands, when) for m in (dense, sparse)]
    assert torch.equal(scores[0], scores[1])


def test_an_unknown_fake_flow_is_a_config_error():
    with pytest.raises(ConfigError, match="fake_flow"):
        build_model("dfgr", {"fake_flow": "sparse"}, INFO, 32)


@pytest.mark.parametrize("fake_flow", ["dense", "targets"])
def test_a_training_step_looks_its_items_up_once_for_both_flows(fake_flow):
    """Each lookup of the item table costs a backward over the whole table (its gradient is dense),
    so the fake flow reuses the real flow's item embeddings (gathered at the targets when it holds
    only theirs) instead of looking the same items up again. Serving still looks candidates up."""
    batch = with_last_targets(make_batch([13, 1, 7, 20], seed=3), 0.3)
    model = make_model("dfgr", torch.float64, fake_flow=fake_flow)
    calls = []
    model.item_emb.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    model(batch)["loss"].backward()
    assert calls == [tuple(Events.from_batch(batch).items.shape)]  # one lookup: [B, N]
