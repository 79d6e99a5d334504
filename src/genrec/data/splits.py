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
    if not 0 < stride <= max_len:
        raise ValueError(f"need 0 < stride <= max_len, got stride={stride}, max_len={max_len}")
    windows = []
    t_end = end
    while t_end > target_start:
        w_start = max(start, t_end - max_len)
        t_start = max(target_start, w_start if w_start == start else t_end - stride)
        windows.append((user, w_start, t_end, t_start))
        t_end = t_start
    return windows[::-1]


def windows(seq: Sequences, split: str, cfg: SplitConfig, max_len: int, stride: int | None = None) -> np.ndarray:
    """``[W, 4]`` int64 windows (user, start, end, target_start) of ``split`` under ``cfg.protocol``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    stride = stride or max(1, max_len // 2)
    out: list[tuple] = []
    off = seq.user_offsets
    if cfg.protocol == "loo":
        drop = {"train": 2, "valid": 1, "test": 0}[split]
        for u in range(seq.num_users):
            s, e = int(off[u]), int(off[u + 1]) - drop
            if e - s < 1:
                continue
            out += tile(u, s, e, s if split == "train" else e - 1, max_len, stride)
    elif cfg.protocol == "temporal":
        if not 0 < cfg.val_quantile < cfg.test_quantile < 1:
            raise ValueError("temporal split needs 0 < val_quantile < test_quantile < 1")
        t_val, t_test = np.quantile(seq.timestamps, [cfg.val_quantile, cfg.test_quantile])
        for u in range(seq.num_users):
            s, e = int(off[u]), int(off[u + 1])
            ts = seq.timestamps[s:e]
            i_val = s + int(np.searchsorted(ts, t_val, side="left"))
            i_test = s + int(np.searchsorted(ts, t_test, side="left"))
            first, end = {"train": (s, i_val), "valid": (i_val, i_test), "test": (i_test, e)}[split]
            if end > first:
                out += tile(u, s, end, first, max_len, stride)
    else:
        raise ValueError(f"protocol must be 'loo' or 'temporal', got {cfg.protocol!r}")
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)
