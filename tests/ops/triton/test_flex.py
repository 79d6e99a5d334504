"""The mask function ``flex_attention`` compiles (:mod:`genrec.ops.triton.flex`) against the dense
masks, evaluated on CPU over every (query, key) pair of each rule's layouts, including queries after
a KV cache. flex_attention itself runs on the GPU (tests/ops/triton/test_hstu.py)."""

from __future__ import annotations

import pytest
import torch

from genrec.nn import events
from genrec.nn.events import Events, append_candidates, dual_flow_layout, event_layout, item_action_layout
from genrec.ops.masks import build_mask
from genrec.ops.triton.flex import PAD, _mask_mod
from genrec.ops.triton.tiles import KernelMeta
from tests.helpers import make_batch


def FLEX_LAYOUTS():  # noqa: N802 (a table, built on call)
    ev = Events.from_batch(make_batch([37, 9, 1, 21], seed=4, all_targets=False))
    history = event_layout(ev, "dual_flow")
    return {"causal": (event_layout(ev, "causal"), 0), "request_causal": (item_action_layout(ev), 0),
            "dual_flow": (dual_flow_layout(ev), 0), "genrank_candidates": (dual_flow_layout(ev, ev.target), 0),
            "dfgr_target_fake_flow": (events.target_dual_flow_layout(ev)[0], 0),
            "hstu_cache": (append_candidates(item_action_layout(ev), ev, 5), 2 * ev.valid.shape[1]),
            "dfgr_cache": (append_candidates(history, ev, 5, fake=True), history.shape[1])}


@pytest.mark.parametrize("name", list(FLEX_LAYOUTS()))
def test_flex_mask_equals_the_dense_mask(name):
    layout, q_offset = FLEX_LAYOUTS()[name]
    b, seq = layout.shape
    length = -(-seq // PAD) * PAD
    tokens = torch.arange(length)
    allowed = _mask_mod(KernelMeta.from_layout(layout).padded(length), layout.rule, tokens >= q_offset)
    got = allowed(torch.arange(b)[:, None, None], 0, tokens[None, :, None], tokens[None, None, :])  # [B, L, L] padded
    valid = layout.valid
    want = (build_mask(layout) & valid[:, :, None] & valid[:, None, :])[:, q_offset:]  # padding reads nothing
    assert torch.equal(got[:, q_offset:seq, :seq], want)
    assert not got[:, :q_offset].any() and not got[:, seq:].any() and not got[:, :, seq:].any()


def test_flex_attention_from_a_tail_matches_the_reference_and_shares_the_full_blocks_compiled_call():
    """GenRank's blocks: all queries, then the last block's from the candidates on (offset N = 150,
    past the first 128-token edge), ALiBi on. Both match the reference at every valid query (fp32;
    flex_attention has no backward on the CPU: tests/ops/triton/test_hstu.py checks the gradients
    on a GPU), and the two calls compile flex_attention once: the offset is a mask tensor, the
    query rows padded to the keys' length."""
    from torch._dynamo.utils import counters

    from genrec.ops.reference import attention as reference
    from genrec.ops.triton import flex

    ev = Events.from_batch(make_batch([150, 40, 133], seed=2, all_targets=False))
    layout = dual_flow_layout(ev, ev.target)  # [B, 2N]: history, then a candidate per target event
    n = ev.valid.shape[1]
    assert n == 150 and n % PAD
    gen = torch.Generator().manual_seed(0)
    b, seq, heads, dh = layout.shape[0], layout.shape[1], 2, 16
    q, k, v = (torch.randn(b, heads, seq, dh, generator=gen) for _ in range(3))
    slopes = reference.alibi_slopes(heads)
    torch._dynamo.reset()
    counters.clear()
    for offset in (0, n):
        got = flex.softmax_attention(q[:, :, offset:], k, v, layout, slopes, q_offset=offset)
        want = reference.softmax_attention(q[:, :, offset:], k, v, layout, slopes, q_offset=offset)
        rows = layout.valid[:, None, offset:, None].expand_as(got)  # the queries that exist
        assert rows.any(dim=2).all()
        torch.testing.assert_close(got[rows], want[rows], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
