"""The block-sparse schedule the fused kernels follow, against the dense masks (plain PyTorch)."""

from __future__ import annotations

import itertools

import pytest
import torch

from genrec.nn import events
from genrec.nn.events import Events, append_candidates, dual_flow_layout, event_layout, item_action_layout
from genrec.ops.layout import TokenLayout
from genrec.ops.masks import build_mask, time_bucket
from genrec.ops.triton import tiles
from genrec.ops.triton.tiles import (
    KernelMeta,
    bias_forms,
    simple_bias_pairs,
    tile_extremes,
    tile_full,
    tile_lists,
    tile_pairs,
)
from tests.helpers import make_batch


def _layouts(lengths: tuple[int, ...] = (37, 90, 5, 61, 1)):
    ev = Events.from_batch(make_batch(list(lengths), seed=2, all_targets=False))
    history = event_layout(ev, "dual_flow")
    return {"causal": (event_layout(ev, "causal"), 0), "request_causal": (item_action_layout(ev), 0),
            "dual_flow": (dual_flow_layout(ev), 0), "genrank_candidates": (dual_flow_layout(ev, ev.target), 0),
            "dfgr_target_fake_flow": (events.target_dual_flow_layout(ev)[0], 0),
            "hstu_cache": (append_candidates(item_action_layout(ev), ev, 9), 2 * ev.valid.shape[1]),
            "dfgr_cache": (append_candidates(history, ev, 9, fake=True), history.shape[1])}


def test_kernel_metadata_refuses_timestamps_beyond_int32_differences():
    ev = Events.from_batch(make_batch([5, 3], seed=1))
    layout = event_layout(ev, "causal")
    KernelMeta.from_layout(layout)  # days apart: fine
    layout.timestamp[0, 0] -= 2**31
    with pytest.raises(ValueError, match="2\\^31 s"):
        KernelMeta.from_layout(layout)


def _dense_tiles(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """[B, Lq, L] -> [B, nQ, nK]: does the tile hold an allowed pair?"""
    b, lq, seq = mask.shape
    padded = torch.nn.functional.pad(mask, (0, -seq % bk, 0, -lq % bq))
    return padded.view(b, padded.shape[1] // bq, bq, padded.shape[2] // bk, bk).any(4).any(2)


@pytest.mark.parametrize("name", list(_layouts()))
@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (16, 64)])
def test_schedule_lists_every_tile_with_an_allowed_pair(name, tiles):
    layout, q_offset = _layouts()[name]
    valid = layout.valid
    mask = build_mask(layout) & valid[:, :, None] & valid[:, None, :]  # no padded self-reads
    needed = _dense_tiles(mask[:, q_offset:], *tiles)
    pairs = tile_pairs(KernelMeta.from_layout(layout), layout.rule, *tiles, q_offset)
    assert pairs.shape == needed.shape
    assert not (needed & ~pairs).any(), "a tile with allowed pairs would be skipped"
    assert pairs.sum() <= 1.5 * needed.sum(), "the schedule visits far more tiles than the mask needs"
    full = tile_full(KernelMeta.from_layout(layout), layout.rule, *tiles, q_offset)
    everything = _dense_tiles(~mask[:, q_offset:], *tiles)  # a pair the rule forbids, or padding
    assert not (full & everything).any(), "a tile marked full holds a masked pair: the kernel would read it"
    counts, index, listed_full = tile_lists(pairs, full)
    count = counts[..., 0]
    assert not counts[..., 1].any(), "without the simple pairs given, none may lead a list as simple"
    for b, i in torch.nonzero(count).tolist():
        listed = index[b, i, : count[b, i]].long()
        assert torch.equal(listed, torch.nonzero(pairs[b, i]).flatten())
        assert torch.equal(listed_full[b, i, : count[b, i]].bool(), full[b, i, listed])


@pytest.mark.parametrize("name", list(_layouts()))
@pytest.mark.parametrize("block", [16, 64])
def test_tile_extremes_are_those_of_each_tiles_valid_tokens(name, block):
    """What the bias forms and the bias-gradient kernel read: per tile of ``block`` tokens from the
    queries' start, the lowest and highest position and time of the valid ones (the layouts hold
    padding, fake tokens and cache offsets that are not multiples of the tile), and the empty fill."""
    layout, q_offset = _layouts()[name]
    meta = KernelMeta.from_layout(layout)
    extremes = tile_extremes(meta, q_offset, block)
    b, seq = meta.flags.shape
    assert extremes.dtype == torch.int32 and extremes.shape == (b, -(-(seq - q_offset) // block), 4)
    empty = 0
    for row in range(b):
        for tile in range(extremes.shape[1]):
            at = slice(q_offset + tile * block, min(q_offset + (tile + 1) * block, seq))
            valid = meta.flags[row, at] & 1 != 0
            if not valid.any():
                empty += 1
                assert extremes[row, tile].tolist() == [tiles.POS_BOUND, -tiles.POS_BOUND, tiles.TS_TOP, 0]
                continue
            pos, ts = meta.position[row, at][valid], meta.timestamp[row, at][valid]
            assert extremes[row, tile].tolist() == [pos.min(), pos.max(), ts.min(), ts.max()]
    assert empty or name.endswith("_cache"), "no empty tile: the fill is not exercised"


@pytest.mark.parametrize("name", ["causal", "dual_flow", "hstu_cache", "dfgr_cache"])
@pytest.mark.parametrize("block_q", [16, 128])
def test_each_tile_pairs_bias_form_and_dq_share_hold_for_every_token_pair_in_it(name, block_q):
    """What the kernels assume of a pair's flags, checked per token pair (brute force over the valid
    ones): NEAR exactly where some distance falls before the position table's last slot, and the
    lowest and highest time bucket of its pairs; BIAS_IN_DQ (:func:`simple_bias_pairs`) exactly where
    the pair is not NEAR and holds at most two adjacent buckets. Near pairs occur, and flagged ones
    (the dQ share is not vacuous)."""
    layout, q_offset = _layouts((300, 170, 5))[name]
    meta = KernelMeta.from_layout(layout)
    num_pos, num_time = 6, 32
    forms = bias_forms(tile_extremes(meta, q_offset, block_q), tile_extremes(meta, 0, 64), num_pos, num_time)
    in_dq = simple_bias_pairs(forms)
    b, seq = meta.flags.shape
    assert forms.dtype == torch.int32 and forms.shape == in_dq.shape == (b, -(-(seq - q_offset) // block_q),
                                                                         -(-seq // 64))
    valid = meta.flags & 1 != 0
    seen = set()
    for row, qt, kt in itertools.product(*map(range, forms.shape)):
        q = torch.arange(q_offset + qt * block_q, min(q_offset + (qt + 1) * block_q, seq))
        k = torch.arange(kt * 64, min((kt + 1) * 64, seq))
        q, k = q[valid[row, q]], k[valid[row, k]]
        if len(q) == 0 or len(k) == 0:
            continue
        dist = meta.position[row, q, None] - meta.position[row, None, k]
        buckets = time_bucket(meta.timestamp[row, q, None].long() - meta.timestamp[row, None, k], num_time)
        form = int(forms[row, qt, kt])
        near = bool(dist.min() < num_pos - 1)
        low, high = (form >> tiles.LO_SHIFT) & tiles.BUCKET_MASK, (form >> tiles.HI_SHIFT) & tiles.BUCKET_MASK
        assert (bool(form & tiles.NEAR), low, high) == (near, int(buckets.min()), int(buckets.max())), (row, qt, kt)
        assert bool(in_dq[row, qt, kt]) == (not near and high - low <= 1), (row, qt, kt)
        seen.add((near, min(high - low, 2)))
    assert any(not near and spread <= 1 for near, spread in seen) and any(near for near, _ in seen), seen


@pytest.mark.parametrize("num_time", [32, 8])
def test_bias_forms_bucket_the_time_extremes_as_the_reference_does(num_time):
    """bias_forms buckets a tile pair's extreme time differences by float exponents, not through
    genrec.ops.masks.time_bucket: the same bucket at each bucket's first second and the one before
    (2^t - 1, 2^t - 2), at the widest span (2^31 - 1 s, bucket 31), below zero and capped."""
    seconds = torch.tensor([-5, 0] + [e for t in range(1, 32) for e in (2**t - 2, 2**t - 1)])
    # one query tile per difference against one key tile at time 0 (positions far apart: not near)
    q_ext = torch.stack([torch.full_like(seconds, 10**6), torch.full_like(seconds, 10**6), seconds.clamp(min=0),
                         seconds], -1)[None].int()  # [1, n, 4]: low 0.. (negatives clamp), high = the difference
    k_ext = torch.tensor([[[0, 0, 0, 0]]], dtype=torch.int32)
    forms = bias_forms(q_ext, k_ext, 16, num_time)[0, :, 0]
    want_low, want_high = time_bucket(seconds.clamp(min=0), num_time), time_bucket(seconds, num_time)
    assert torch.equal((forms >> tiles.LO_SHIFT) & tiles.BUCKET_MASK, want_low.int())
    assert torch.equal((forms >> tiles.HI_SHIFT) & tiles.BUCKET_MASK, want_high.int())
    assert not (forms & tiles.NEAR).any() and want_high.max() == min(31, num_time - 1)


@pytest.mark.parametrize("name", ["causal", "dual_flow", "hstu_cache"])
@pytest.mark.parametrize("transpose", [False, True])
def test_lists_with_the_bias_put_the_simple_pairs_first_and_keep_the_rest(name, transpose):
    """The kernels run a list's first ``counts[..., 1]`` pairs through the loop compiled for the simple
    bias form and the rest through the general one: those must be exactly the listed pairs that are
    simple, then the other listed ones, each in ascending order (the dQ kernel's bias gradients
    need it), each with its own flags. Both kinds occur."""
    layout, q_offset = _layouts((300, 170, 5))[name]
    meta = KernelMeta.from_layout(layout)
    pairs, full = tile_pairs(meta, layout.rule, 32, 16, q_offset), tile_full(meta, layout.rule, 32, 16, q_offset)
    simple = simple_bias_pairs(bias_forms(tile_extremes(meta, q_offset, 32), tile_extremes(meta, 0, 16), 40, 32))
    if transpose:  # the dK/dV orientation: per key tile
        pairs, full, simple = pairs.mT, full.mT, simple.mT
    counts, index, flags = tile_lists(pairs, full, simple)
    for b, row in itertools.product(*map(range, pairs.shape[:2])):
        listed, first = int(counts[b, row, 0]), int(counts[b, row, 1])
        easy = torch.nonzero(pairs[b, row] & simple[b, row]).flatten()
        other = torch.nonzero(pairs[b, row] & ~simple[b, row]).flatten()
        assert listed == len(easy) + len(other) and first == len(easy), (b, row)
        assert torch.equal(index[b, row, :listed].long(), torch.cat([easy, other])), (b, row)
        assert torch.equal(flags[b, row, :listed].bool(), full[b, row, index[b, row, :listed].long()]), (b, row)
    assert counts[..., 1].any() and (counts[..., 1] < counts[..., 0]).any()


@pytest.mark.parametrize("name", ["dual_flow", "dfgr_cache"])
def test_both_orientations_of_a_schedule_come_from_one_set_of_tile_pairs(name):
    """The kernels' cached schedules (forward / dQ per query tile, dK/dV per key tile) equal the
    lists of the tile pairs computed afresh, the second built from the first's pairs."""
    from genrec.ops.triton.hstu import _schedule

    layout, q_offset = _layouts()[name]
    meta = KernelMeta.from_layout(layout)
    pairs = tile_pairs(meta, layout.rule, 32, 16, q_offset)
    full = tile_full(meta, layout.rule, 32, 16, q_offset)
    forward = _schedule(layout, (32, 16, 4, 1), q_offset, transpose=False)
    backward = _schedule(layout, (32, 16, 4, 1), q_offset, transpose=True)
    for got, want in ((forward, tile_lists(pairs, full)), (backward, tile_lists(pairs.mT, full.mT))):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert sum(key[0] == "triton_pairs" for key in layout._cache) == 1


@pytest.mark.parametrize("name", ["causal", "request_causal", "dual_flow", "dfgr_target_fake_flow"])
def test_a_training_steps_layout_metadata_and_schedules_read_nothing_back_from_the_device(name):
    """On the ``meta`` device a tensor has no values, so any host read (``int()``, ``.item()``, a
    ``repeat_interleave`` without its output size) raises: events, layout, kernel metadata (times
    checked on the host), tile schedules (also with the bias), extremes and bias forms of a moved
    batch build there, so on CUDA they queue without a sync. The target-only fake flow's T is the
    moved batch's host-known count."""
    from genrec.ops.layout import time_spans_checked_on_host
    from genrec.ops.triton.hstu import _bias_flags, _kernel_meta, _schedule

    batch = make_batch([37, 90, 5, 61, 1], seed=2, all_targets=False).to("meta")
    ev = Events.from_batch(batch)
    layout = {"causal": lambda: event_layout(ev, "causal"), "request_causal": lambda: item_action_layout(ev),
              "dual_flow": lambda: dual_flow_layout(ev),
              "dfgr_target_fake_flow": lambda: events.target_dual_flow_layout(ev, batch.max_targets)[0]}[name]()
    with time_spans_checked_on_host():  # cached in the layout, where the schedules read it
        meta = _kernel_meta(layout)
    for tile, transpose in (((64, 64, 4, 3), False), ((64, 64, 4, 2), True), ((128, 64, 8, 2), False)):
        count, index, full = _schedule(layout, tile, 0, transpose)
        assert count.device.type == "meta" and index.shape[1:] == full.shape[1:]
    extremes = tile_extremes(meta, 0, 64)
    assert simple_bias_pairs(bias_forms(extremes, extremes, 256, 32)).device.type == "meta"
    tiles_64 = ((64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2))
    for schedule in _bias_flags(layout, True, True, tiles_64, 0, 256, 32, split=True, bands=True)[:4]:  # bias
        assert all(t.device.type == "meta" for t in schedule)
    with pytest.raises(RuntimeError, match="meta"):  # the test can fail: a read of the span is caught
        KernelMeta.from_layout(layout)


def test_schedule_skips_the_upper_triangle_and_marks_the_lower_full():
    layout, _ = _layouts()["causal"]
    meta = KernelMeta.from_layout(layout)
    pairs, full = tile_pairs(meta, "causal", 16, 16), tile_full(meta, "causal", 16, 16)
    assert not torch.triu(pairs, diagonal=1).any() and pairs.diagonal(dim1=1, dim2=2)[:, :1].all()
    assert full[1, 3, :3].all() and not full.diagonal(dim1=1, dim2=2).any()  # row 1 holds 90 events


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_asking_for_the_triton_backend_without_a_gpu_is_a_clear_error():
    from genrec.ops.dispatch import get_backend

    with pytest.raises(ValueError, match="'triton' cannot run here: no CUDA device"):
        get_backend("triton")


def test_consecutive_tiles_need_every_token_valid_at_consecutive_positions():
    """The band kernel's tiles (hstu._bias_flags): all valid, positions running on by one from the
    tile's first. A tile that jumps back, holds one position out of line, is partial or starts at a
    query offset is judged on its own tokens."""
    idx = torch.arange(150)
    pos = torch.stack([torch.where(idx < 100, idx, idx // 2), idx, idx])  # row 0: tile 1 jumps back at 100
    pos[1, 5] = 77  # row 1: one token of tile 0 out of line
    valid = torch.stack([idx < 150, idx < 140, idx != 20])  # row 2: token 20 padding
    layout = TokenLayout(valid=valid, request=idx.expand(3, -1), event=idx.expand(3, -1),
                         fake=torch.zeros(3, 150, dtype=torch.bool), position=pos, timestamp=idx.expand(3, -1),
                         rule="causal")
    meta = KernelMeta.from_layout(layout)
    assert tiles.consecutive_tiles(meta, 0, 64).tolist() == [[True, False, False], [False, True, False],
                                                              [False, True, False]]
    assert tiles.consecutive_tiles(meta, 10, 64).tolist() == [[True, False, False], [True, True, False],
                                                               [False, True, False]]
