"""Evaluation protocols as *windows* over the per-user sequences.

A window is ``(user, start, end, target_start)`` in flat event indices: the model reads events
``[start, end)`` and is trained or scored on the targets ``[target_start, end)``, always a suffix,
so every target sees exactly the history before it. Long sequences are tiled into windows of at most
``max_len`` events whose target suffixes partition the targets: every target is used exactly once
and has at least ``max_len - stride`` events of context (except near the start of a history).

* Leave-one-out (HSTU, UniGRF): per user, the last event is the test target and the second-to-last
  the validation target; training sees the rest, every event a target.
* Temporal (DFGR, GenRank style): global cut times at quantiles ``val_quantile`` < ``test_quantile``
  of all timestamps. Training reads events before the validation cut; validation targets the events
  in ``[t_val, t_test)`` with everything earlier as history; test targets events from ``t_test`` on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from genrec.data.preprocess import Sequences
from genrec.settings import Fraction, Invalid

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitConfig:
    protocol: Literal["loo", "temporal"] = "loo"  # leave-one-out per user, or a global cut in time
    val_quantile: Fraction = 0.8  # temporal: validation targets from this quantile of all timestamps
    test_quantile: Fraction = 0.9  # temporal: test targets from this quantile on

    def check(self) -> None:
        if not self.val_quantile < self.test_quantile:
            raise Invalid("val_quantile", f"expected a value below test_quantile ({self.test_quantile})")


def tile(user: int, start: int, end: int, target_start: int, max_len: int, stride: int) -> list[tuple]:
    """Windows of at most ``max_len`` events whose target suffixes partition ``[target_start, end)``.

    Example (max_len=4, stride=2, events 0..7, all targets)::

        window  events      targets
        0       0 1 2 3     0 1 2 3
        1       2 3 4 5     4 5
        2       4 5 6 7     6 7
    """
    one = [np.array([v], dtype=np.int64) for v in (user, start, end, target_start)]
    return [tuple(int(v) for v in w) for w in tile_all(*one, max_len, stride)]


def tile_all(users: np.ndarray, starts: np.ndarray, ends: np.ndarray, target_starts: np.ndarray,
             max_len: int, stride: int) -> np.ndarray:
    """:func:`tile` of many sequences at once (arrays ``[U]``; no loop over users): ``[W, 4]`` windows
    grouped by sequence in the given order. Counting windows back from the end, window ``k`` ends at
    ``end - k * stride``; the last one is the first to reach the sequence start (its events) or the
    first target (its targets)."""
    if not 0 < stride <= max_len:
        raise ValueError(f"need 0 < stride <= max_len, got stride={stride}, max_len={max_len}")
    live = ends > target_starts
    users, starts, ends, firsts = (np.asarray(a, dtype=np.int64)[live] for a in (users, starts, ends, target_starts))
    reach_start = np.maximum(0, -(-(ends - max_len - starts) // stride))  # first k with end_k - max_len <= start
    reach_first = np.maximum(0, -(-(ends - firsts - stride) // stride))  # first k with end_k - stride <= first
    count = np.minimum(reach_start, reach_first) + 1  # [U] windows per sequence
    seq = np.repeat(np.arange(len(users)), count)  # [W]
    back = np.cumsum(count)[seq] - 1 - np.arange(len(seq))  # k: windows after this one in its sequence
    t_end = ends[seq] - back * stride
    w_start = np.maximum(starts[seq], t_end - max_len)
    t_start = np.where(back == count[seq] - 1, firsts[seq], t_end - stride)  # the earliest window: every target
    return np.stack([users[seq], w_start, t_end, t_start], axis=1).reshape(-1, 4)


def windows(seq: Sequences, split: str, cfg: SplitConfig, max_len: int, stride: int | None = None) -> np.ndarray:
    """``[W, 4]`` int64 windows (user, start, end, target_start) of ``split`` under ``cfg.protocol``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    stride = stride or max(1, max_len // 2)
    off = np.asarray(seq.user_offsets, dtype=np.int64)
    users = np.arange(seq.num_users)
    starts, ends = off[:-1], off[1:]
    if cfg.protocol == "loo":
        drop = {"train": 2, "valid": 1, "test": 0}[split]
        ends = ends - drop
        firsts = starts if split == "train" else ends - 1
        live = ends - starts >= 1
        return tile_all(users[live], starts[live], ends[live], firsts[live], max_len, stride)
    if cfg.protocol == "temporal":
        if not 0 < cfg.val_quantile < cfg.test_quantile < 1:
            raise ValueError("temporal split needs 0 < val_quantile < test_quantile < 1")
        t_val, t_test = np.quantile(seq.timestamps, [cfg.val_quantile, cfg.test_quantile])
        # events before a cut, per user (each user's timestamps are sorted): the first index at the cut
        before_val = np.r_[0, np.cumsum(np.asarray(seq.timestamps) < t_val)]
        before_test = np.r_[0, np.cumsum(np.asarray(seq.timestamps) < t_test)]
        i_val = starts + before_val[ends] - before_val[starts]
        i_test = starts + before_test[ends] - before_test[starts]
        first, end = {"train": (starts, i_val), "valid": (i_val, i_test), "test": (i_test, ends)}[split]
        return tile_all(users, starts, end, first, max_len, stride)
    raise ValueError(f"protocol must be 'loo' or 'temporal', got {cfg.protocol!r}")
