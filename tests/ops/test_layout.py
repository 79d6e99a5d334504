"""One table of mask rules (:data:`genrec.ops.layout.Rule`), and a test per place a rule must be
known: each fails naming the rule and the place that lacks it. Adding a rule is one table entry and
one pure function in :mod:`genrec.ops.masks`; these tests list the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genrec.nn.events import Events, event_layout
from genrec.ops import masks
from genrec.ops.layout import (
    RULE_IDS,
    RULES,
    TIME_LIMIT_S,
    TokenLayout,
    check_time_span,
    host_checked,
    time_spans_checked_on_host,
    times_within_limit,
)
from genrec.ops.triton import tiles
from tests.helpers import make_batch

KERNEL_SOURCE = Path(__file__).resolve().parents[2] / "src" / "genrec" / "ops" / "triton" / "hstu.py"


def test_rule_ids_are_the_places_in_the_table():
    assert list(RULE_IDS) == list(RULES) and list(RULE_IDS.values()) == list(range(len(RULES)))


def test_an_unknown_rule_is_refused_by_the_layout():
    t = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown mask rule 'sliding'"):
        TokenLayout(t.bool(), t, t, t.bool(), t, t, rule="sliding")


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_has_a_dense_mask(rule):
    assert rule in masks.RULE_MASKS, f"mask rule {rule!r} has no dense mask in genrec.ops.masks.RULE_MASKS"


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_has_a_drawing_test(rule):
    from tests.ops.test_masks import DRAWINGS

    assert rule in DRAWINGS, f"mask rule {rule!r} has no drawing test in tests/ops/test_masks.py (DRAWINGS)"


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_has_a_tile_schedule(rule):
    layout = event_layout(Events.from_batch(make_batch([9, 4], seed=0)), rule)
    meta = tiles.KernelMeta.from_layout(layout)
    try:
        tiles.tile_pairs(meta, rule, 16, 16)
        tiles.tile_full(meta, rule, 16, 16)
    except ValueError as err:
        pytest.fail(f"mask rule {rule!r} has no tile schedule in genrec.ops.triton.tiles: {err}")


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_is_in_the_tile_schedule_tests(rule):
    from tests.ops.triton.test_tiles import _layouts

    assert rule in {layout.rule for layout, _ in _layouts().values()}, (
        f"mask rule {rule!r} is not among the layouts of tests/ops/triton/test_tiles.py")


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_has_a_branch_in_the_hstu_kernel(rule):
    """Read from the kernel's source, so that it holds without Triton too (the interpreter and GPU
    parity tests run the branch)."""
    source = KERNEL_SOURCE.read_text()
    constant = rule.upper()
    assert f'{constant}: tl.constexpr = tl.constexpr(RULE_IDS["{rule}"])' in source and (
        f"RULE == {constant}" in source), f"mask rule {rule!r} has no branch in genrec.ops.triton.hstu._allowed"


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_is_in_the_kernel_parity_tests(rule):
    from tests.ops.triton.test_hstu import LAYOUTS

    assert rule in LAYOUTS.values(), f"mask rule {rule!r} has no layout in tests/ops/triton/test_hstu.py"


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_has_a_flex_mask(rule):
    from tests.ops.triton.test_flex import FLEX_LAYOUTS

    assert rule in {layout.rule for layout, _ in FLEX_LAYOUTS().values()}, (
        f"mask rule {rule!r} is not among the layouts of tests/ops/triton/test_flex.py")


def test_the_schedule_and_flex_refuse_an_unknown_rule():
    from genrec.ops.triton.flex import _mask_mod

    meta = tiles.KernelMeta.from_layout(event_layout(Events.from_batch(make_batch([5], seed=0)), "causal"))
    for place in (tiles.tile_pairs, tiles.tile_full):
        with pytest.raises(ValueError, match="'sliding'"):
            place(meta, "sliding", 16, 16)
    with pytest.raises(ValueError, match="'sliding'"):
        _mask_mod(meta, "sliding", 0)


def test_timestamps_spanning_int32_seconds_are_refused():
    check_time_span(torch.tensor([0, 2**31 - 1]))
    with pytest.raises(ValueError, match="2\\^31 s"):
        check_time_span(torch.tensor([0, 2**31]))
    with time_spans_checked_on_host():  # the caller checked on the host: no device read-back, no refusal
        check_time_span(torch.tensor([0, 2**31]))
        with time_spans_checked_on_host():
            pass
        check_time_span(torch.tensor([0, 2**31]))  # still inside the outer one
    with pytest.raises(ValueError, match="2\\^31 s"):  # and checked again after it
        check_time_span(torch.tensor([0, 2**31]))


def test_host_times_within_the_kernels_limit():
    assert times_within_limit(torch.tensor([], dtype=torch.int64))
    assert times_within_limit(torch.tensor([0, TIME_LIMIT_S - 1]))
    assert not times_within_limit(torch.tensor([5, TIME_LIMIT_S]))
    assert not times_within_limit(torch.tensor([-1, 5]))
    assert not times_within_limit(torch.tensor([0, 5], device="meta"))  # not read: the device check decides


SPANNING = torch.tensor([0, TIME_LIMIT_S])  # a span the device check refuses


def test_a_step_over_host_times_within_the_limit_skips_the_device_check():
    with host_checked(torch.tensor([1_000_000_000, TIME_LIMIT_S - 1])):
        check_time_span(SPANNING)  # not read back: the host batch was checked
    with pytest.raises(ValueError, match="2\\^31 s"):  # and only inside
        check_time_span(SPANNING)


def test_a_step_over_host_times_beyond_the_limit_keeps_the_device_check():
    with host_checked(torch.tensor([-1, 5])), pytest.raises(ValueError, match="2\\^31 s"):
        check_time_span(SPANNING)


def test_a_step_over_device_times_keeps_the_device_check():
    with host_checked(torch.tensor([0, 5], device="meta")), pytest.raises(ValueError, match="2\\^31 s"):
        check_time_span(SPANNING)  # the device batch was not read on the host: nothing was checked
