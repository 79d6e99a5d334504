"""A team's own event log: column mapping, validation errors naming file/row/column, printed policies,
and the out-of-core store that the data loader maps without copying."""

from __future__ import annotations

import pickle

import numpy as np
import polars as pl
import pytest
import torch

from genrec.data.batching import WindowDataset, make_loader
from genrec.data.errors import DataError
from genrec.data.eventlog import EventLogSpec, SignalSpec, scan
from genrec.data.splits import SplitConfig, windows
from genrec.data.store import StoreConfig, build, load, prepare

# user, item, ts (ms), request, click, like, watch ratio: written out of time order for user "u2"
EVENTS = {
    "uid": ["u1", "u1", "u1", "u1", "u2", "u2", "u2", "u3", "u3", "u2"],
    "iid": [10, 11, 12, 10, 11, 13, 10, 12, 13, 12],
    "t_ms": [1000, 1000, 5000, 9000, 7000, 2000, 2000, 3000, 4000, 8000],
    "req": [1, 1, 2, 3, 7, 5, 5, 8, 9, 7],
    "click": [1, 0, 1, 1, 0, 1, 1, 0, 1, 1],
    "like": [0, 0, 1, 0, 0, 0, 1, 0, 0, 1],
    "ratio": [0.9, 0.1, 1.5, 0.2, 0.0, 0.7, 0.3, 0.05, 2.0, 0.6],
    "category": ["a", "b", "a", "a", "b", "c", "a", "a", "c", "a"],
}


def spec_for(path, **kw) -> EventLogSpec:
    args = dict(signals=(SignalSpec("click", "click"), SignalSpec("like", "like"),
                         SignalSpec("watch", "ratio", "graded", 0.5)),
                user="uid", item="iid", timestamp="t_ms", time_unit="ms", request="req")
    args.update(kw)
    return EventLogSpec(str(path), **args)


def make(spec: EventLogSpec, out, cfg: StoreConfig | None = None, log=print):
    """Build a store keeping every user (the fixture's users have 2-4 events)."""
    return build(spec, out, cfg or StoreConfig(min_user_events=1), log=log)


def write_parquet(path, events=EVENTS):
    pl.DataFrame(events).write_parquet(path)
    return path


def write_csv(path, events=EVENTS):
    pl.DataFrame(events).write_csv(path)
    return path


def user_events(seq, raw_user: str) -> dict:
    u = seq.user_raw.index(raw_user)
    s, e = int(seq.user_offsets[u]), int(seq.user_offsets[u + 1])
    return {"items": [seq.item_raw[i - 1] for i in seq.items[s:e]], "ts": seq.timestamps[s:e].tolist(),
            "requests": seq.request_ids[s:e].tolist(), "labels": seq.signal_labels[s:e].tolist(),
            "values": seq.signal_values[s:e].tolist(), "actions": seq.actions[s:e].tolist()}


def test_parquet_log_becomes_time_sorted_sequences_with_every_signal(tmp_path):
    logs = []
    seq = load(make(spec_for(write_parquet(tmp_path / "log.parquet")), tmp_path / "store", log=logs.append))
    assert seq.num_users == 3 and seq.signal_names == ["click", "like", "watch"]
    u2 = user_events(seq, "u2")
    assert u2["items"] == ["13", "10", "11", "12"]  # sorted by time; ties (time 2000) keep the file order
    assert u2["ts"] == [2, 2, 7, 8]  # milliseconds floored to seconds
    assert u2["requests"] == [0, 0, 1, 1]  # request ids 5, 5, 7, 7
    assert u2["labels"] == [[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]]  # watch = ratio > 0.5
    assert u2["values"][1] == [1.0, 1.0, pytest.approx(0.3)]
    assert u2["actions"] == [1 + 4, 1 + 2, 0, 7]  # joint code sum 2^s
    assert seq.labels[seq.user_offsets[1]] == 1  # the label is the first signal (click)
    assert seq.report["out_of_order_events"] == 1  # u2's time-7000 event came before its time-2000 ones
    assert any("out of time order" in line for line in logs)
    assert isinstance(seq.items, np.memmap) and isinstance(seq.signal_values, np.memmap)


def test_folder_glob_and_csv_inputs_give_the_same_sequences(tmp_path):
    one = load(make(spec_for(write_parquet(tmp_path / "one.parquet")), tmp_path / "s1"))
    folder = tmp_path / "parts"
    folder.mkdir()
    half = {k: v[:5] for k, v in EVENTS.items()}
    rest = {k: v[5:] for k, v in EVENTS.items()}
    write_parquet(folder / "a.parquet", half)
    write_parquet(folder / "b.parquet", rest)
    by_folder = load(make(spec_for(folder), tmp_path / "s2"))
    by_glob = load(make(spec_for(folder / "*.parquet"), tmp_path / "s3"))
    by_csv = load(make(spec_for(write_csv(tmp_path / "log.csv")), tmp_path / "s4"))
    for other in (by_folder, by_glob, by_csv):
        for name in ("user_offsets", "items", "timestamps", "request_ids", "signal_labels", "actions"):
            assert np.array_equal(getattr(one, name), getattr(other, name)), name


def test_small_buckets_give_the_same_store_as_one_bucket(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    events = {"uid": rng.integers(0, 97, n), "iid": rng.integers(0, 20, n), "t_ms": rng.integers(0, 30, n) * 1000,
              "req": rng.integers(0, 2, n), "click": rng.integers(0, 2, n), "like": rng.integers(0, 2, n),
              "ratio": rng.random(n), "category": ["x"] * n}
    spec = spec_for(write_parquet(tmp_path / "log.parquet", events))
    whole = load(make(spec, tmp_path / "whole", StoreConfig(bucket_events=10**9)))
    pieces = load(make(spec, tmp_path / "pieces", StoreConfig(bucket_events=97)))
    assert pieces.report == whole.report and whole.report["duplicate_events_dropped"] > 0
    for name in ("user_offsets", "items", "timestamps", "request_ids", "signal_values", "actions"):
        assert np.array_equal(getattr(whole, name), getattr(pieces, name)), name
    assert whole.user_raw == pieces.user_raw


def test_duplicate_policy_merges_the_signals_or_rejects(tmp_path):
    events = {k: [*v, v[2]] for k, v in EVENTS.items()}
    events["like"][-1], events["ratio"][-1] = 0, 1.7  # same user, item, time, request as row 3, other signals
    path = write_parquet(tmp_path / "log.parquet", events)
    logs = []
    seq = load(make(spec_for(path), tmp_path / "s", log=logs.append))
    assert seq.report["duplicate_events_dropped"] == 1 and any("1 duplicate events" in line for line in logs)
    u1 = user_events(seq, "u1")
    assert u1["labels"][2] == [1, 1, 1]  # the earlier line's like is not lost
    assert u1["values"][2] == pytest.approx([1, 1, 1.7]) and len(u1["items"]) == 4  # one event, each signal's max
    with pytest.raises(DataError, match=r"log.parquet row 3.*duplicate"):
        build(spec_for(path), tmp_path / "s2", StoreConfig(duplicates="error"))
    kept = load(make(spec_for(path), tmp_path / "s3", StoreConfig(min_user_events=1, duplicates="keep")))
    assert len(kept.items) == len(seq.items) + 1


def test_short_users_are_dropped_and_counted(tmp_path):
    seq = load(make(spec_for(write_parquet(tmp_path / "log.parquet")), tmp_path / "s",
                    StoreConfig(min_user_events=3)))
    assert "u3" not in seq.user_raw and seq.report["short_users_dropped"] == 1
    assert seq.report["short_user_events_dropped"] == 2


def test_unsorted_times_are_an_error_when_asked(tmp_path):
    path = write_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError, match=r"log.parquet row \d+.*earlier in the file"):
        build(spec_for(path), tmp_path / "s", StoreConfig(time_order="error"))


def test_missing_column_names_the_file_and_its_columns(tmp_path):
    path = write_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError, match=r"log.parquet: missing column\(s\) \['clicks'\]; the file has"):
        scan(spec_for(path, signals=(SignalSpec("click", "clicks"),)))


def test_non_numeric_time_names_file_line_and_column(tmp_path):
    path = write_csv(tmp_path / "log.csv")
    text = path.read_text().splitlines()
    text[4] = text[4].replace(",9000,", ",soon,")
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"log.csv:5: column 't_ms' is 'soon', expected an integer time"):
        scan(spec_for(path))


@pytest.mark.parametrize("text,columns,error", [
    ('user_id,item_id,timestamp,click\n"a\nb",1,10,0\n1,2,20,1\n1,3,30,x\n', None,
     r"log.csv:5: column 'click' is 'x'"),  # a quoted line break: the record spans lines 2 and 3
    ("user_id,item_id,timestamp,click\n1,1,10,0\n1,2,20,1,9\n1,3,30,1\n", None,
     r"log.csv:3: more fields than the 4 columns"),
    ('1,1,10,0\n"x\n""y""",2,20,1\n1,3,30,1,9\n', ("user_id", "item_id", "timestamp", "click"),
     r"log.csv:4: more fields than the 4 columns"),  # no header; a quoted field with quotes and a break
])
def test_csv_errors_name_the_physical_line(tmp_path, text, columns, error):
    path = tmp_path / "log.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=error):
        scan(EventLogSpec(str(path), (SignalSpec("click", "click"),), csv_columns=columns))


def test_binary_signal_out_of_range_names_the_row(tmp_path):
    events = dict(EVENTS, like=[0, 0, 2, 0, 0, 0, 1, 0, 0, 1])
    with pytest.raises(DataError, match=r"row 3: column 'like' is 2.0, a binary signal must be 0 or 1"):
        scan(spec_for(write_parquet(tmp_path / "log.parquet", events)))


def test_wrong_column_type_is_named(tmp_path):
    events = dict(EVENTS, t_ms=[[1]] * 10)
    with pytest.raises(DataError, match=r"column 't_ms' has type List"):
        scan(spec_for(write_parquet(tmp_path / "log.parquet", events)))


def test_missing_values_are_an_error_or_dropped_and_counted(tmp_path):
    events = dict(EVENTS, uid=["u1", None, *EVENTS["uid"][2:]])
    path = write_parquet(tmp_path / "log.parquet", events)
    with pytest.raises(DataError, match=r"row 2: column 'uid' is missing a value"):
        scan(spec_for(path))
    logs = []
    seq = load(make(spec_for(path, missing="drop"), tmp_path / "s", log=logs.append))
    assert seq.report["missing_rows_dropped"] == 1 and len(seq.items) == 9
    assert any("1 rows with a missing uid dropped" in line for line in logs)


def test_negative_times_are_an_error_or_dropped(tmp_path):
    events = dict(EVENTS, t_ms=[-5, *EVENTS["t_ms"][1:]])
    path = write_csv(tmp_path / "log.csv", events)
    with pytest.raises(DataError, match=r"log.csv:2: column 't_ms' is -5, a negative time"):
        scan(spec_for(path))
    seq = load(make(spec_for(path, negative_time="drop"), tmp_path / "s"))
    assert seq.report["negative_time_rows_dropped"] == 1


def test_without_request_column_equal_times_form_a_request(tmp_path):
    seq = load(make(spec_for(write_parquet(tmp_path / "log.parquet"), request=None), tmp_path / "s"))
    assert user_events(seq, "u2")["requests"] == [0, 0, 1, 2]  # 2000, 2000, 7000, 8000 ms
    wide = load(make(spec_for(write_parquet(tmp_path / "log.parquet"), request=None), tmp_path / "w",
                     StoreConfig(min_user_events=1, request_window_s=1)))
    assert user_events(wide, "u2")["requests"] == [0, 0, 1, 1]  # gaps of 5 s and 1 s: the second is within


def test_item_side_features_become_item_tokens(tmp_path):
    seq = load(make(spec_for(write_parquet(tmp_path / "log.parquet"), item_features=("category",)),
                     tmp_path / "s"))
    assert seq.item_genres[seq.item_raw.index("13")] == ["category=c"]
    matrix, vocab = seq.genre_matrix()
    assert vocab == ["category=a", "category=b", "category=c"] and matrix.shape == (5, 3)


def test_spec_from_config_mapping_rejects_unknown_keys(tmp_path):
    spec = EventLogSpec.from_dict({"path": "x.parquet", "signals": ["click", {"name": "watch", "column": "ratio",
                                                                              "kind": "graded", "threshold": 0.5}]})
    assert spec.signals[1] == SignalSpec("watch", "ratio", "graded", 0.5)
    with pytest.raises(ValueError, match="unknown field"):
        EventLogSpec.from_dict({"path": "x", "signals": ["a"], "colour": 1})


def test_user_features_are_refused_not_silently_ignored():
    # no model reads user side features: a config naming them must hear so, not train without them
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['user_features'\]"):
        EventLogSpec.from_dict({"path": "x", "signals": ["a"], "user_features": ["age"]})


def test_pickled_store_sequences_carry_file_names_not_arrays(tmp_path):
    rng = np.random.default_rng(1)
    n = 20000
    events = {"uid": rng.integers(0, 50, n), "iid": rng.integers(0, 500, n), "t_ms": np.arange(n) * 1000,
              "req": np.arange(n), "click": rng.integers(0, 2, n), "like": rng.integers(0, 2, n),
              "ratio": rng.random(n), "category": ["x"] * n}
    seq = load(make(spec_for(write_parquet(tmp_path / "log.parquet", events)), tmp_path / "s"))
    blob = pickle.dumps(seq)
    assert len(blob) < 40_000  # 20k events x ~30 bytes would be > 600 kB if copied
    back = pickle.loads(blob)
    assert isinstance(back.signal_labels, np.memmap)
    assert np.array_equal(back.signal_labels, seq.signal_labels) and np.array_equal(back.items, seq.items)


def test_loader_workers_read_the_same_batches_as_the_main_process(tmp_path):
    rng = np.random.default_rng(2)
    n = 2000
    events = {"uid": rng.integers(0, 20, n), "iid": rng.integers(0, 100, n), "t_ms": rng.integers(0, 10**7, n),
              "req": rng.integers(0, 10**6, n), "click": rng.integers(0, 2, n), "like": rng.integers(0, 2, n),
              "ratio": rng.random(n), "category": ["x"] * n}
    seq = load(make(spec_for(write_parquet(tmp_path / "log.parquet", events)), tmp_path / "s"))
    data = WindowDataset(seq, windows(seq, "train", SplitConfig(protocol="temporal"), 50))
    serial = list(make_loader(data, 8, shuffle=False))
    parallel = list(make_loader(data, 8, shuffle=False, num_workers=2))
    assert len(serial) == len(parallel) > 3
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.items, b.items) and torch.equal(a.labels, b.labels)


def test_prepare_reuses_the_cache_until_a_file_changes(tmp_path):
    path = write_parquet(tmp_path / "log.parquet")
    logs = []
    first = prepare(spec_for(path), root=tmp_path / "cache", log=logs.append)
    again = prepare(spec_for(path), root=tmp_path / "cache", log=logs.append)
    assert np.array_equal(first.items, again.items)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    write_parquet(path, {k: v[:-1] for k, v in EVENTS.items()})
    changed = prepare(spec_for(path), root=tmp_path / "cache", log=logs.append)
    assert len(changed.items) == len(first.items) - 1


def test_movielens_ratings_and_tags_become_four_signals(tmp_path):
    from genrec.data.multisignal import prepare_movielens_signals
    from genrec.data.preprocess import PrepConfig
    from tests.conftest import write_ml_csv

    root = tmp_path / "root"
    folder = write_ml_csv(root / "ml-latest-small")
    # user 1 tags movie 3 long after rating it, and movie 7 (never rated); user 2 tags movie 6 at its rating time
    (folder / "tags.csv").write_text('userId,movieId,tag,timestamp\n1,3,"funny, dry",1000000000\n'
                                     "1,3,politics,999999999\n1,7,remake,1000000500\n2,6,heist,1445715000\n")
    seq = prepare_movielens_signals("ml-latest-small", ("like", "five_star", "rated", "tagged"), root,
                                    PrepConfig(min_user_events=1), allow_download=False, log=lambda *_: None)
    assert seq.signal_names == ["like", "five_star", "rated", "tagged"]
    u1 = user_events(seq, "1")
    assert u1["items"] == ["3", "6", "1", "3", "7"]  # ratings at 964...; the tags at 999999999 and 1000000500
    assert u1["labels"] == [[1, 0, 1, 0], [1, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    u2 = user_events(seq, "2")
    assert u2["labels"][2] == [0, 0, 1, 1]  # rated 0.5 and tagged at the same time: one event
    assert len(seq.items) == 7 + 2  # seven ratings and two tag-only events
    assert seq.item_genres[seq.item_raw.index("6")] == ["Action", "Crime", "Thriller"]


def test_movielens_signals_cache_sees_files_edited_in_place(tmp_path):
    import os

    from genrec.data.multisignal import prepare_movielens_signals
    from genrec.data.preprocess import PrepConfig
    from tests.conftest import write_ml_csv

    folder = write_ml_csv(tmp_path / "root" / "ml-latest-small")
    (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,7,remake,1000000500\n")

    def signals():
        return prepare_movielens_signals("ml-latest-small", ("like", "tagged"), tmp_path / "root",
                                         PrepConfig(min_user_events=1), allow_download=False, log=lambda *_: None)

    before = signals()
    assert before.signal_labels.sum(0).tolist() == [5, 1]
    # the same sizes and modification times, only the contents differ: only a content hash can tell
    for name, old, new in (("ratings.csv", ",4.0,", ",1.0,"), ("tags.csv", "1,7,", "2,7,")):
        stat = (folder / name).stat()
        (folder / name).write_text((folder / name).read_text().replace(old, new))
        os.utime(folder / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = signals()
    assert after.signal_labels.sum(0).tolist() == [2, 1]
    assert user_events(after, "2")["labels"][0] == [0, 1]  # the tag moved to user 2 (its earliest event)


def test_batches_carry_every_signal_of_their_events(tmp_path):
    seq = load(make(spec_for(write_parquet(tmp_path / "log.parquet")), tmp_path / "s"))
    data = WindowDataset(seq, windows(seq, "train", SplitConfig("loo"), 10))
    batch = next(iter(make_loader(data, 8, shuffle=False)))
    assert batch.signals.shape == (batch.num_events, 3)
    assert torch.equal(batch.signals[:, 0], batch.labels)  # the label is the first signal
