"""benchmarks/tile_pairs.py on CPU: tile pairs counted on a small training layout against a count by
hand, and the per-pair times and ratios it derives from a speed file's profiled train rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from genrec.ops.triton.hstu import KernelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
tile_pairs = pytest.importorskip("tile_pairs")
CONFIG = KernelConfig(fwd=(64, 64, 4, 3), bwd=(64, 64, 4, 2), dq=(128, 64, 8, 2))


def _by_hand(model: str, n: int, share: float, batch: int, block_q: int, block_k: int) -> tuple[int, ...]:
    """(tile pairs with an allowed element pair, those with a forbidden one too, allowed element
    pairs, query tiles and key tiles with a pair) from the reference backend's dense mask of the
    same layout."""
    from genrec.nn.events import Events
    from genrec.ops.masks import build_mask
    from speed import TRAIN_LAYOUTS, synthetic_batch

    mask = build_mask(TRAIN_LAYOUTS[model](Events.from_batch(synthetic_batch(batch, n, 0, device="cpu",
                                                                                 target_share=share))))
    b, lq, lk = mask.shape
    pad = mask.new_zeros(b, -(-lq // block_q) * block_q, -(-lk // block_k) * block_k)
    pad[:, :lq, :lk] = mask
    blocks = pad.view(b, pad.shape[1] // block_q, block_q, pad.shape[2] // block_k, block_k)
    visited = blocks.any(4).any(2)
    full = blocks.all(4).all(2)
    return (int(visited.sum()), int((visited & ~full).sum()), int(mask.sum()), int(visited.any(2).sum()),
            int(visited.any(1).sum()))


@pytest.mark.parametrize("model, share", [("hstu", 1.0), ("dfgr", 1.0), ("dfgr_sparse", 0.1)])
def test_pairs_partial_pairs_and_fill_agree_with_the_dense_mask(model, share):
    c = tile_pairs.count(model, 160, share, 2, 64, CONFIG)
    for kernel, (bq, bk) in (("fwd", (64, 64)), ("dkdv", (64, 64)), ("dq", (128, 64))):
        pairs, partial, allowed, query_tiles, key_tiles = _by_hand(model, 160, share, 2, bq, bk)
        assert c[f"{kernel}_pairs"] == pairs
        assert c[f"{kernel}_partial_share"] == pytest.approx(partial / pairs)
        assert c[f"{kernel}_fill"] == pytest.approx(allowed / (pairs * bq * bk))
        assert c[f"{kernel}_programs"] == (key_tiles if kernel == "dkdv" else query_tiles)


def test_layouts_hold_two_tokens_per_event_or_the_real_flow_and_the_targets_fake_tokens():
    assert tile_pairs.count("hstu", 128, 0.1, 2, 64, CONFIG)["tokens"] == 256
    assert 128 < tile_pairs.count("dfgr_sparse", 128, 0.1, 2, 64, CONFIG)["tokens"] < 256


def _speed_row(model: str, step_ms: float, fwd_ms: float) -> dict:
    return {"bench": "train", "model": model, "n": 128, "target_share": 1.0, "batch": 2, "d": 128, "heads": 2,
            "layers": 3, "mode": "compiled", "step_ms": step_ms, "attention_ms": fwd_ms + 2.0,
            "attention_fwd_ms": fwd_ms, "attention_dkdv_ms": 1.0, "attention_dq_ms": 1.0}


def test_times_per_pair_and_the_ratio_at_hstus_time_per_pair():
    rows, _ = tile_pairs.rows_of({"rows": [_speed_row("hstu", 10.0, 2.0), _speed_row("dfgr", 8.0, 3.0),
                                         {"bench": "kernel"}]}, CONFIG)
    hstu, dfgr = (next(r for r in rows if r["model"] == m) for m in ("hstu", "dfgr"))
    copies = 2 * 3  # heads x layers
    assert hstu["fwd_pairs"] == 20 * copies
    assert hstu["fwd_ns_per_pair"] == pytest.approx(2.0e6 / (20 * copies))
    assert dfgr["fwd_per_pair_over_hstu"] == pytest.approx(3.0 / dfgr["fwd_pairs"] / (2.0 / hstu["fwd_pairs"]))
    assert dfgr["train_ratio"] == pytest.approx(10.0 / 8.0)
    # at HSTU's time per pair DFGR's three kernels would take HSTU's times scaled by its share of the pairs
    scaled = sum(ms * dfgr[f"{k}_pairs"] / hstu[f"{k}_pairs"] for k, ms in (("fwd", 2.0), ("dkdv", 1.0), ("dq", 1.0)))
    assert dfgr["train_ratio_at_hstu_per_pair"] == pytest.approx(10.0 / (8.0 - 5.0 + scaled))
    assert "train_ratio" not in hstu or hstu["train_ratio"] == pytest.approx(1.0)
    assert hstu["fwd_per_pair_over_fit"] == pytest.approx(1.0)  # HSTU's one row: its fit goes through it


def test_program_fits_recover_a_time_per_pair_and_per_program_and_rows_read_over_them():
    """HSTU rows timed as exactly ``a + b / pairs_per_program`` give back ``a`` and ``b`` per kernel
    and mode; other models' rows are not fitted."""
    def row(model, ppp, scale=1.0, mode="compiled"):
        return {"model": model, "mode": mode, **{f"{k}_pairs_per_program": ppp for k in tile_pairs.KERNELS},
                **{f"{k}_ns_per_pair": scale * (a + b / ppp) for k, (a, b) in TRUE.items()}}

    TRUE = {"fwd": (2.5, 8.0), "dkdv": (6.0, 13.0), "dq": (3.5, 11.0)}
    rows = [row("hstu", ppp) for ppp in (16.5, 32.5, 64.5, 128.5)] + [row("hstu", 20.0, mode="eager")] * 2
    fits = tile_pairs.program_fits(rows + [row("dfgr_sparse", 9.0, scale=2.0)])  # only HSTU's rows are fitted
    for kernel, (a, b) in TRUE.items():
        assert fits["compiled"][kernel] == pytest.approx((a, b))
    assert fits["eager"]["fwd"][0] + fits["eager"]["fwd"][1] / 20.0 == pytest.approx(2.5 + 8.0 / 20.0)
    assert "no bias" not in tile_pairs.program_fits(rows + [row("dfgr", 9.0, mode="no bias")])  # no HSTU row there
