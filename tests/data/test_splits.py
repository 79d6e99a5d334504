"""Protocols: leave-one-out and temporal windows; tiling uses every target exactly once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from genrec.data.preprocess import prepare
from genrec.data.splits import SplitConfig, tile, windows


def test_tile_matches_the_docstring_example():
    assert tile(0, 0, 8, 0, max_len=4, stride=2) == [(0, 0, 4, 0), (0, 2, 6, 4), (0, 4, 8, 6)]


@pytest.mark.parametrize("n,first,max_len,stride", [(1, 0, 4, 2), (13, 0, 5, 3), (13, 9, 5, 1), (50, 20, 7, 7)])
def test_tile_partitions_targets_and_keeps_context(n, first, max_len, stride):
    ws = tile(3, 0, n, first, max_len, stride)
    targets = [i for _, s, e, t in ws for i in range(t, e)]
    assert targets == list(range(first, n))
    for _, s, e, t in ws:
        assert e - s <= max_len and s <= t < e
        assert s == 0 or t - s >= max_len - stride  # enough history unless at the sequence start


@pytest.fixture(scope="module")
def seq(shared_data):
    return prepare("ml-latest-small", shared_data)


def test_leave_one_out_targets_last_and_second_to_last(seq):
    cfg = SplitConfig(protocol="loo")
    test = windows(seq, "test", cfg, max_len=50)
    valid = windows(seq, "valid", cfg, max_len=50)
    ends = seq.user_offsets[1:]
    assert len(test) == len(valid) == seq.num_users
    np.testing.assert_array_equal(test[:, 2], ends)
    np.testing.assert_array_equal(test[:, 3], ends - 1)
    np.testing.assert_array_equal(valid[:, 2], ends - 1)
    assert (test[:, 2] - test[:, 1] <= 50).all()
    train = windows(seq, "train", cfg, max_len=50)
    assert (train[:, 2] - train[:, 3]).sum() == len(seq.items) - 2 * seq.num_users
    for u, _s, e, _t in train[:50]:
        assert e <= seq.user_offsets[u + 1] - 2


def test_temporal_split_cuts_by_global_time(seq):
    cfg = SplitConfig(protocol="temporal", val_quantile=0.8, test_quantile=0.9)
    t_val, t_test = np.quantile(seq.timestamps, [0.8, 0.9])
    target_times = {}
    for split in ("train", "valid", "test"):
        w = windows(seq, split, cfg, max_len=100)
        idx = np.concatenate([np.arange(t, e) for _, _, e, t in w])
        target_times[split] = seq.timestamps[idx]
        assert len(np.unique(idx)) == len(idx)
    assert target_times["train"].max() < t_val
    assert t_val <= target_times["valid"].min() and target_times["valid"].max() < t_test
    assert target_times["test"].min() >= t_test
    total = sum(len(v) for v in target_times.values())
    assert total == len(seq.items)


def test_unknown_protocol_is_rejected(seq):
    with pytest.raises(ValueError, match="protocol"):
        windows(seq, "train", SplitConfig(protocol="random"), max_len=10)


def loop_windows(offsets: np.ndarray, timestamps: np.ndarray, split: str, cfg: SplitConfig, max_len: int,
                 stride: int) -> np.ndarray:
    """The per-user loop that :func:`windows` replaces (one ``while`` per user), as the oracle."""

    def one(user, start, end, target_start):
        out, t_end = [], end
        while t_end > target_start:
            w_start = max(start, t_end - max_len)
            t_start = max(target_start, w_start if w_start == start else t_end - stride)
            out.append((user, w_start, t_end, t_start))
            t_end = t_start
        return out[::-1]

    out = []
    if cfg.protocol == "loo":
        drop = {"train": 2, "valid": 1, "test": 0}[split]
        for u in range(len(offsets) - 1):
            s, e = int(offsets[u]), int(offsets[u + 1]) - drop
            if e - s >= 1:
                out += one(u, s, e, s if split == "train" else e - 1)
    else:
        t_val, t_test = np.quantile(timestamps, [cfg.val_quantile, cfg.test_quantile])
        for u in range(len(offsets) - 1):
            s, e = int(offsets[u]), int(offsets[u + 1])
            i_val = s + int(np.searchsorted(timestamps[s:e], t_val))
            i_test = s + int(np.searchsorted(timestamps[s:e], t_test))
            first, end = {"train": (s, i_val), "valid": (i_val, i_test), "test": (i_test, e)}[split]
            out += one(u, s, end, first)
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)


@pytest.mark.parametrize("protocol", ["loo", "temporal"])
@pytest.mark.parametrize("max_len,stride", [(1, 1), (4, 2), (7, 3), (16, 16), (50, 25)])
def test_vectorised_windows_equal_the_per_user_loop(protocol, max_len, stride):
    rng = np.random.default_rng(max_len)
    lengths = rng.integers(1, 120, 300)
    offsets = np.r_[0, np.cumsum(lengths)]
    timestamps = np.concatenate([np.sort(rng.integers(0, 1000, n)) for n in lengths])
    seq = SimpleNamespace(user_offsets=offsets, timestamps=timestamps, num_users=len(lengths))
    cfg = SplitConfig(protocol=protocol)
    for split in ("train", "valid", "test"):
        expected = loop_windows(offsets, timestamps, split, cfg, max_len, stride)
        assert len(expected) > 0
        np.testing.assert_array_equal(windows(seq, split, cfg, max_len, stride), expected)
