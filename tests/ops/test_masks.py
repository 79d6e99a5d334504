"""Masks against the drawings in their docstrings (three events; e1 and e2 share request r1)."""

from __future__ import annotations

import pytest
import torch

from genrec.ops.layout import TokenLayout
from genrec.ops.masks import build_mask, causal_mask, dual_flow_mask, request_causal_mask, time_bucket


def _draw(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in r.split()] for r in rows])


def _layout(request, event, fake, rule, valid=None):
    t = torch.tensor
    n = len(request)
    return TokenLayout(valid=t([valid or [True] * n]), request=t([request]), event=t([event]),
                       fake=t([fake]), position=t([event]), timestamp=t([[0] * n]), rule=rule)


def test_causal_mask_drawing():
    layout = _layout([0, 1, 1], [0, 1, 2], [False] * 3, "causal")
    assert torch.equal(causal_mask(layout)[0], _draw(["x . .", "x x .", "x x x"]))


def test_hstu_interleaved_mask_drawing():
    layout = _layout([0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2], [False] * 6, "request_causal")
    expected = _draw([
        "x . . . . .",
        "x x . . . .",
        "x x x . . .",
        "x x x x . .",
        "x x . . x .",
        "x x . . x x",
    ])
    assert torch.equal(request_causal_mask(layout)[0], expected)


def test_dual_flow_cross_triangle_drawing():
    layout = _layout([0, 1, 1, 0, 1, 1], [0, 1, 2, 0, 1, 2], [False] * 3 + [True] * 3, "dual_flow")
    expected = _draw([
        "x . . . . .",
        "x x . . . .",
        "x x x . . .",
        ". . . x . .",
        "x . . . x .",
        "x . . . . x",
    ])
    assert torch.equal(dual_flow_mask(layout)[0], expected)


def test_fake_flow_never_sees_own_request_actions():
    layout = _layout([0, 0, 1, 0, 0, 1], [0, 1, 2, 0, 1, 2], [False] * 3 + [True] * 3, "dual_flow")
    mask = dual_flow_mask(layout)[0]
    assert not mask[4, 0] and not mask[4, 1]  # F1 shares request r0 with R0 and R1
    assert mask[5, 0] and mask[5, 1] and not mask[5, 2]


def test_padding_is_masked_and_padded_queries_read_only_themselves():
    layout = _layout([0, 1, 2], [0, 1, 2], [False] * 3, "causal", valid=[True, True, False])
    assert torch.equal(build_mask(layout)[0], _draw(["x . .", "x x .", ". . x"]))


# rule -> the test drawing its mask (tests/ops/test_layout.py checks every rule has one)
DRAWINGS = {"causal": test_causal_mask_drawing, "request_causal": test_hstu_interleaved_mask_drawing,
            "dual_flow": test_dual_flow_cross_triangle_drawing}


def test_time_buckets_are_log2():
    assert time_bucket(torch.tensor([0, 1, 2, 3, 4, 10**9]), 32).tolist() == [0, 1, 1, 2, 2, 29]


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_time_buckets_are_exact_at_every_power_of_two(device):
    """Bucket t starts at 2^t - 1 s, on every device: CUDA's float64 log2 misses some exact powers of
    two (2^12 = 4096 gives 11.99...), which put a float-log2 bucket one low on the GPU only."""
    k = torch.arange(1, 45, device=device)
    start = 2**k - 1  # the first second of bucket k
    assert time_bucket(start, 64).tolist() == k.tolist()
    assert time_bucket(start - 1, 64).tolist() == (k - 1).tolist()
    assert time_bucket(start, 20).tolist() == k.clamp(max=19).tolist()
