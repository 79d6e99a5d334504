"""The analytic FLOP counter: pair counts agree with the masks, and the papers' ratios follow."""

from __future__ import annotations

import pytest
import torch

from genrec.flops import flops, layout_flops, tokens_and_pairs
from genrec.ops.layout import TokenLayout
from genrec.ops.masks import build_mask


def _layout(n: int, layout_kind: str) -> TokenLayout:
    """One event per request: HSTU's interleaved tokens or DFGR's [real | fake] flows."""
    e = torch.arange(n)
    if layout_kind == "hstu":
        ev = e.repeat_interleave(2)
        layout = TokenLayout(torch.ones(1, 2 * n, dtype=torch.bool), ev[None], ev[None],
                             torch.zeros(1, 2 * n, dtype=torch.bool), ev[None], ev[None], "request_causal")
    else:
        ev = torch.cat([e, e])
        fake = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
        layout = TokenLayout(torch.ones(1, 2 * n, dtype=torch.bool), ev[None], ev[None], fake[None], ev[None],
                             ev[None], "dual_flow")
    return layout


def _pairs_from_mask(n: int, layout_kind: str) -> int:
    return int(build_mask(_layout(n, layout_kind)).sum())


@pytest.mark.parametrize("n", [1, 5, 17])
def test_pair_counts_match_the_masks(n):
    assert tokens_and_pairs("hstu", n)[1] == _pairs_from_mask(n, "hstu")
    assert tokens_and_pairs("dfgr", n)[1] == _pairs_from_mask(n, "dfgr")


@pytest.mark.parametrize("kind", ["hstu", "dfgr"])
def test_flops_counted_on_a_layout_match_the_closed_form(kind):
    """A third of the training count (forward only) when every request holds one event."""
    linear, attention = layout_flops(_layout(9, kind), d=16, layers=3)
    want = flops(kind, 9, 16, 3)
    assert (linear, attention) == (want["linear"] / 3, want["attention"] / 3)


def test_a_last_block_computing_a_tail_is_counted_with_its_tail_queries_and_every_tokens_keys():
    """DFGR's last block from its fake flow (one event per request, N = 9): every token's keys and
    values (4·D² each), the fake tokens' queries, gates and output projection (6·D²), and the fake
    flow's N(N+1)/2 pairs; the two earlier blocks count in full."""
    n, d, layers = 9, 16, 3
    layout = _layout(n, "dfgr")
    full_linear, full_attention = layout_flops(layout, d, layers)
    linear, attention = layout_flops(layout, d, layers, outputs_from=n)
    assert linear == full_linear * 2 / 3 + (4 * 2 * n + 6 * n) * d * d
    assert attention == full_attention * 2 / 3 + 4 * d * n * (n + 1) // 2
    assert layout_flops(layout, d, layers, outputs_from=0) == (full_linear, full_attention)
    with pytest.raises(ValueError, match="do not go together"):
        layout_flops(layout, d, layers, q_offset=2, outputs_from=n)


def test_genranks_last_block_counts_every_tokens_keys_and_its_candidates_other_projections():
    """GenRank's softmax blocks (24·D² a token) on its [history | candidates] layout, the last block
    from the candidates: every token's keys and values (4·D²), the candidates' queries, output and
    feed-forward (20·D²), the candidates' N(N+1)/2 pairs (one event per request, N = 9)."""
    n, d, layers = 9, 16, 3
    layout = _layout(n, "dfgr")  # the same dual-flow layout, every event a target
    full_linear, full_attention = layout_flops(layout, d, layers, model="genrank")
    assert full_linear == layers * 24 * 2 * n * d * d
    linear, attention = layout_flops(layout, d, layers, outputs_from=n, model="genrank")
    assert linear == full_linear * 2 / 3 + (4 * 2 * n + 20 * n) * d * d
    assert attention == full_attention * 2 / 3 + 4 * d * n * (n + 1) // 2


def test_dfgr_is_about_2x_cheaper_to_train_and_4x_to_serve_than_hstu():
    n, d = 4096, 512
    attention_train = flops("hstu", n, d, 4)["attention"] / flops("dfgr", n, d, 4)["attention"]
    assert attention_train == pytest.approx(2.0, rel=1e-3)
    hstu_serve, dfgr_serve = flops("hstu", n, d, 4, m=64, mode="serve"), flops("dfgr", n, d, 4, m=64, mode="serve")
    assert 3.8 < hstu_serve["attention"] / dfgr_serve["attention"] < 4.0  # the quadratic term: ~4x
    assert 3.0 < hstu_serve["total"] / dfgr_serve["total"] < 3.5  # projections only halve: ~3.2x at d=512
    cached = flops("hstu", n, d, 4, m=64, mode="serve")["total"] / flops("dfgr", n, d, 4, m=64,
                                                                         mode="serve_cached")["total"]
    assert cached > 50
