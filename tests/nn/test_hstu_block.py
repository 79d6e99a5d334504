"""An HSTU block asked for the outputs of its last tokens only (``outputs_from``, what a model's last
block runs when its loss reads no earlier token) against the block run over every token: the same
outputs there and the same gradients of every input and weight, on each mask rule's layout (fp64,
reference backend; the triton kernels' queries from an offset: tests/ops/triton/test_hstu.py)."""

from __future__ import annotations

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


def outputs_and_grads(block: HSTUBlock, out: torch.Tensor, x: torch.Tensor, upstream: torch.Tensor):
    block.zero_grad()
    x.grad = None
    (out * upstream).sum().backward()
    return out.detach(), x.grad.clone(), {name: p.grad.clone() for name, p in block.named_parameters()}


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_a_block_asked_for_its_last_tokens_outputs_gives_the_full_blocks_there_and_the_same_gradients(kind):
    block, layout, x = block_and_input(kind)
    n = layout.shape[1]
    for start in (1, n // 2, n - 1):
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
