"""The store's event order and policies against a plain in-memory polars reference: one full sort of
the whole log by (user, time, request, file row), the definition the bucketed fast path (file order
kept per bucket, a radix sort by user, a comparison sort only of users out of time order) must
reproduce exactly, on logs written out of order, with ties, duplicates and many buckets."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from genrec.data.eventlog import EventLogSpec, SignalSpec, scan
from genrec.data.store import (
    StoreConfig,
    _event_order,
    _last_of_duplicates,
    _later_duplicates,
    _stable_user_sort,
    _Vocabulary,
    build,
    load,
)


def reference(spec: EventLogSpec, cfg: StoreConfig) -> tuple[pl.DataFrame, dict]:
    """The store's events in store order, and its policy counts, from one in-memory full sort."""
    df = scan(spec, log=lambda *_: None).frame.collect()
    req = [pl.col("request").hash().alias("req")] if spec.request else [pl.lit(0, pl.UInt64).alias("req")]
    df = df.with_columns(*req).sort(["user", "ts", "req", "row"])
    group = ["user", "ts", "req"]
    # late: a file row below the latest file row of the user's earlier-time events
    runs = df.group_by(["user", "ts"], maintain_order=True).agg(pl.col("row").max().alias("run_max"))
    runs = runs.with_columns(pl.col("run_max").cum_max().shift(1).over("user").alias("before"))
    df = df.join(runs.select("user", "ts", "before"), on=["user", "ts"], maintain_order="left")
    late = int(df.select((pl.col("row") < pl.col("before")).sum()).item() or 0)
    dup = ~pl.col("item").is_last_distinct().over(group)
    n_dup = int(df.select(dup.sum()).item())
    if cfg.duplicates == "drop":  # the last of equal events stays, each signal the max over them
        df = df.with_columns(pl.col("^sig_.*$").max().over([*group, "item"])).filter(~dup)
    n = pl.len().over("user")
    short = df.filter(n < cfg.min_user_events)
    df = df.filter(n >= cfg.min_user_events)
    unit = {"s": 1, "ms": 1000, "us": 1_000_000}[spec.time_unit]
    if spec.request:
        new_request = pl.col("req") != pl.col("req").shift(1).over("user")
    else:
        new_request = (pl.col("ts") - pl.col("ts").shift(1).over("user")) > cfg.request_window_s * unit
    df = df.with_columns(request_id=(new_request.fill_null(True).cast(pl.Int32).cum_sum().over("user") - 1),
                         seconds=pl.col("ts") // unit)
    counts = {"out_of_order_events": late, "short_users_dropped": short["user"].n_unique(),
              "short_user_events_dropped": short.height,
              "duplicate_events_dropped" if cfg.duplicates == "drop" else "duplicate_events_kept": n_dup}
    return df, counts


def adversarial_log(path, rng: np.random.Generator, n: int = 4000) -> None:
    """Rows in random order, few distinct times (ties within and across requests), repeated items."""
    pl.DataFrame({
        "uid": [f"user-{u}" for u in rng.integers(0, 150, n)],
        "iid": rng.integers(0, 40, n),
        "t": rng.integers(0, 25, n) * 1000,
        "req": rng.integers(0, 3, n),
        "click": rng.integers(0, 2, n),
        "ratio": rng.random(n).astype(np.float32),
    }).write_parquet(path)


def spec_of(path, **kw) -> EventLogSpec:
    return EventLogSpec(str(path), (SignalSpec("click", "click"), SignalSpec("watch", "ratio", "graded", 0.5)),
                        user="uid", item="iid", timestamp="t", time_unit="ms", **{"request": "req", **kw})


@pytest.mark.parametrize("request_column", ["req", None])
@pytest.mark.parametrize("duplicates", ["drop", "keep"])
@pytest.mark.parametrize("bucket_events", [10**9, 211])
def test_store_matches_one_full_sort_of_the_log(tmp_path, request_column, duplicates, bucket_events):
    adversarial_log(tmp_path / "log.parquet", np.random.default_rng(7))
    spec = spec_of(tmp_path / "log.parquet", request=request_column)
    cfg = StoreConfig(min_user_events=25, duplicates=duplicates, bucket_events=bucket_events, request_window_s=2)
    seq = load(build(spec, tmp_path / "store", cfg, log=lambda *_: None))
    expected, counts = reference(spec, cfg)
    assert counts["out_of_order_events"] > 0 and counts["short_users_dropped"] > 0
    assert {k: seq.report[k] for k in counts} == counts
    assert seq.user_raw == expected["user"].unique(maintain_order=True).to_list()
    assert np.diff(seq.user_offsets).tolist() == expected.group_by("user", maintain_order=True).len()["len"].to_list()
    assert [seq.item_raw[i - 1] for i in seq.items] == expected["item"].cast(pl.String).to_list()
    assert seq.timestamps.tolist() == expected["seconds"].to_list()
    assert seq.request_ids.tolist() == expected["request_id"].to_list()
    assert np.array_equal(seq.signal_values, expected.select("sig_click", "sig_watch").to_numpy())


def test_event_order_equals_a_four_key_lexsort_whatever_the_file_order():
    rng = np.random.default_rng(1)
    n = 20_000
    uc = rng.integers(0, 300, n).astype(np.int32)
    ts = np.sort(rng.integers(0, 50, n))  # a time-sorted log ...
    late = rng.random(n) < 0.02
    ts[late] = rng.integers(0, 50, int(late.sum()))  # ... with some events written late
    req = (ts // 3 + (rng.random(n) < 0.01)).astype(np.uint64)  # requests mostly follow the time
    for row in (np.arange(n, dtype=np.int64), rng.permutation(n).astype(np.int64)):  # kept / lost file order
        expected = np.lexsort((row, req, ts, uc))
        order, resorted = _event_order(uc, ts, req, row)
        assert np.array_equal(order, expected)
        assert resorted.any()
        order, _ = _event_order(uc, ts, None, row)
        assert np.array_equal(order, np.lexsort((row, ts, uc)))
    _, resorted = _event_order(uc, ts, req, np.arange(n, dtype=np.int64))
    assert resorted.mean() < 0.9  # users already in time order are not sorted again


def test_user_radix_sort_is_stable_beyond_one_16_bit_digit():
    rng = np.random.default_rng(2)
    uc = (rng.integers(0, 3 * 2**16, 50_000) + 10**6).astype(np.int32)
    assert np.array_equal(_stable_user_sort(uc), np.argsort(uc, kind="stable"))
    assert np.array_equal(_stable_user_sort(np.zeros(5, dtype=np.int32)), np.arange(5))


@pytest.mark.parametrize("items", [3, 50, 10**6])
def test_later_duplicates_equal_a_hash_of_every_group_and_item(items):
    rng = np.random.default_rng(items)
    sizes = rng.geometric(0.2, 5000)
    new_group = np.zeros(int(sizes.sum()), dtype=bool)
    new_group[np.r_[0, np.cumsum(sizes)[:-1]]] = True
    ic = rng.integers(0, items, len(new_group)).astype(np.int32)
    key = (np.cumsum(new_group).astype(np.int64) << 32) | ic
    expected = ~pl.Series(key).is_last_distinct().to_numpy()
    assert expected.any() or items == 10**6
    assert np.array_equal(_later_duplicates(new_group, ic), expected)


def test_duplicates_merge_into_the_last_event_of_their_group_and_item():
    rng = np.random.default_rng(3)
    sizes = rng.geometric(0.2, 3000)
    new_group = np.zeros(int(sizes.sum()), dtype=bool)
    new_group[np.r_[0, np.cumsum(sizes)[:-1]]] = True
    ic = rng.integers(0, 6, len(new_group)).astype(np.int32)
    later = _later_duplicates(new_group, ic)
    frame = pl.DataFrame({"group": np.cumsum(new_group), "item": ic}).with_row_index("pos")
    last = frame.select(pl.col("pos").last().over("group", "item"))["pos"].to_numpy()
    assert later.any() and np.array_equal(_last_of_duplicates(new_group, ic, later), last[later])


@pytest.mark.parametrize("raw,table", [([7, 3, 3, 12, 7], True), ([7 * 10**15, 3, 3, 12, 7 * 10**15], False),
                                       (["b", "a", "a", "c", "b"], False)])
def test_vocabulary_codes_are_ranks_among_the_sorted_distinct_ids(raw, table):
    # compact integers: a lookup table; spread-out integers: binary search; text: a polars map
    vocabulary = _Vocabulary(pl.Series(raw).unique().sort())
    assert (vocabulary.table is not None) == table
    assert vocabulary.codes(pl.Series(raw)).tolist() == [sorted(set(raw)).index(v) for v in raw]
