"""An HSTU block asked for the outputs of its last tokens only (``outputs_from``, what a model's last
block runs when its loss reads no earlier token) against the block run over every token: the same
outputs there and the same gradients of every input and weight, on each mask rule's layout (fp64,
reference backend; the triton kernels' queries from an offset: tests/ops/triton/test_hstu.py); and
that the offset, which changes with every batch, neither splits a layout's cache nor makes a
compiled step compile a graph per value."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from genrec.nn.events import Events, dual_flow_layout, event_layout, item_action_layout, target_dual_flow_layout
from genrec.nn.hstu import HSTUBlock
from genrec.ops.dispatch import REFERENCE
from tests.helpers import make_batch, with_last_targets

LAYOUTS = {"causal": lambda ev: event_layout(ev, "causal"), "request_causal": item_action_layout,
           "dual_flow": dual_flow_layout, "dfgr_target_fake_flow": lambda ev: target_dual_flow_layout(ev)[0]}


def block_and_input(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    block = HSTUBlock(16, 2, 0.0, 0.05, REFERENCE, num_position_buckets=40).double()
    with torch.no_grad():  # tables away from their zero start, so a wrong bias slot shows
        block.rel_pos.normal_(0, 0.5)
        block.rel_time.normal_(0, 0.5)
    ev = Events.from_batch(with_last_targets(make_batch([11, 3, 17], seed), 0.3))
    layout = LAYOUTS[kind](ev)
    x = torch.randn(*layout.shape, 16, dtype=torch.float64, requires_grad=True)
    return block, layout, x


def outputs_and_grads(block: torch.nn.Module, out: torch.Tensor, x: torch.Tensor, upstream: torch.Tensor):
    """``out`` and the gradients of ``x`` and every weight of ``block`` for the loss ``sum(out * upstream)``."""
    block.zero_grad()
    x.grad = None
    (out * upstream).sum().backward()
    return out.detach(), x.grad.clone(), {name: p.grad.clone() for name, p in block.named_parameters()}


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_a_block_asked_for_its_last_tokens_outputs_gives_the_full_blocks_there_and_the_same_gradients(kind):
    block, first, x = block_and_input(kind)
    n = first.shape[1]
    for start in (1, n // 2, n - 1):
        layout = dataclasses.replace(first, _cache={})  # a layout has one tail: TokenLayout.query_tag
        upstream = torch.randn(x.shape[0], n - start, 16, dtype=torch.float64)
        want, want_dx, want_dw = outputs_and_grads(block, block(x, layout)[:, start:], x, upstream)
        got, dx, dw = outputs_and_grads(block, block(x, layout, outputs_from=start), x, upstream)
        assert got.shape == (x.shape[0], n - start, 16)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)
        assert dx[:, :start].abs().sum() > 0  # the earlier tokens' keys and values are still read
        for name, grad in want_dw.items():
            torch.testing.assert_close(dw[name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_outputs_from_and_a_kv_cache_are_refused_together():
    from genrec.nn.kv_cache import LayerCache

    block, layout, x = block_and_input("causal")
    with pytest.raises(ValueError, match="outputs_from"):
        block(x, layout, cache=LayerCache(capacity=4), outputs_from=2)


def test_a_block_asked_for_no_output_still_gives_every_weight_a_gradient():
    """A batch without targets (a rank's padding batch under DDP): the last block is asked for no
    token's output, yet every weight must get a gradient (zero), or DDP's gradient buckets on that
    rank never fill and its collectives fall out of step with the other ranks'."""
    block, layout, x = block_and_input("request_causal")
    out = block(x, layout, outputs_from=layout.shape[1])
    assert out.shape == (x.shape[0], 0, 16)
    (out.sum() + x.sum() * 0).backward()
    assert all(p.grad is not None and not p.grad.any() for p in block.parameters())


def test_a_layout_names_its_tail_in_cache_keys_not_its_offset_and_has_one_tail():
    """Cache keys name the last block's (or a KV cache's) queries ``"tail"``, not their offset (a key
    holding a batch's offset makes torch.compile guard on it, a graph per value); a second offset on
    the same layout is an error, not the first one's schedules; a prepared layout carries its tail."""
    _, layout, _ = block_and_input("causal")
    assert layout.query_tag(0) == 0
    assert layout.query_tag(7) == layout.query_tag(7) == "tail"
    with pytest.raises(ValueError, match="one tail"):
        layout.query_tag(8)
    seeded = dataclasses.replace(layout, _cache={})
    seeded.seed(layout.prepared([]))
    with pytest.raises(ValueError, match="from token 7; now from 8"):
        seeded.query_tag(8)


@pytest.mark.parametrize(("name", "backend", "batches"), [("hstu", "reference", 6), ("dfgr", "reference", 6),
                                                      ("dfgr_sparse", "reference", 6), ("sfgr", "reference", 6),
                                                      ("genrank", "reference", 6), ("hstu", "triton", 5),
                                                      ("genrank", "triton", 5)])
def test_a_compiled_step_compiles_a_few_graphs_over_batches_of_every_length_and_first_target(name, backend, batches,
                                                                                            monkeypatch):
    """torch.compile of a training step over batches of new lengths and first targets, read as a GPU
    batch's are (what the host carried: ``known_*``): the last block's offset changes on every batch,
    yet the step compiles at most three graphs (shapes made dynamic, the offset zero or not) and
    never falls back to eager after the recompile limit. The triton backend's schedules (with the
    bias: its extremes, forms and lists) run under the CPU interpreter where there is no GPU."""
    from torch._dynamo.utils import counters

    from genrec.data.batching import JaggedBatch
    from tests.models.test_generative import make_model

    for prop in ("max_len", "max_targets", "num_targets", "first_target"):  # as on a GPU: the host's values
        monkeypatch.setattr(JaggedBatch, prop, property(lambda self, p=prop: getattr(self, f"known_{p}")))
    torch._dynamo.reset()
    counters.clear()
    model = make_model(name, torch.float32, d_model=32).train()  # head dim 16: the kernels' least
    if backend == "triton":
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            pytest.skip("the triton backend needs a CUDA device, or Triton (the dev extra) for its CPU interpreter")
        if name == "genrank" and not torch.cuda.is_available():
            pytest.skip("GenRank's flex_attention has no backward on the CPU")
        from genrec.ops.triton.backend import TRITON

        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        for block in model.blocks:
            block.backend = TRITON
    step = torch.compile(model, backend="eager")
    rng = np.random.default_rng(0)
    for i in range(batches):
        batch = make_batch([int(n) for n in rng.integers(5, 30, 4)], seed=i)
        first = int(rng.integers(0, int(batch.lengths.min())))
        host = JaggedBatch(**batch.tensors() | {"target_mask": batch.positions() >= first})
        batch = dataclasses.replace(host, known_max_len=int(host.lengths.max()), known_first_target=first,
                                    known_max_targets=int(host.targets_per_row.max()),
                                    known_num_targets=int(host.target_mask.sum()))
        step(batch.to(next(model.parameters()).device))["loss"].backward()
    assert counters["stats"]["unique_graphs"] <= 3  # at the recompile limit (8) it would be 8
