"""Preprocessing: dense ids, chronological order, requests, labels, policies with counts, caching."""

from __future__ import annotations

import numpy as np
import pytest

from genrec.data import registry
from genrec.data.errors import DataError
from genrec.data.preprocess import PrepConfig, build_sequences, prepare
from genrec.data.readers import read_movielens_1m, read_movielens_csv
from tests.conftest import ML1M_RATINGS, write_ml1m, write_ml_csv


def _user(seq, u):
    s, e = seq.user_offsets[u], seq.user_offsets[u + 1]
    return slice(s, e)


def test_sequences_are_chronological_with_dense_ids(tmp_path):
    seq = build_sequences(read_movielens_1m(write_ml1m(tmp_path / "d")), PrepConfig(), log=lambda *_: None)
    assert seq.num_users == 3 and seq.num_items == 4  # item 50 is never rated: no id
    assert seq.item_raw == ["10", "20", "30", "40"]
    u0 = _user(seq, 0)
    assert list(seq.timestamps[u0]) == sorted(seq.timestamps[u0])
    assert list(seq.items[u0]) == [1, 1, 2]  # 978300760 (10), 978301968 (10), 978302109 (20)
    assert seq.items.min() == 1


def test_requests_group_equal_timestamps_and_windows(tmp_path):
    raw = read_movielens_1m(write_ml1m(tmp_path / "d"))
    seq = build_sequences(raw, PrepConfig(), log=lambda *_: None)
    u1 = _user(seq, 1)  # user 2: t=978300275, 978824291 x2, 978824300
    assert list(seq.request_ids[u1]) == [0, 1, 1, 2]
    windowed = build_sequences(raw, PrepConfig(request_window_s=60), log=lambda *_: None)
    assert list(windowed.request_ids[u1]) == [0, 1, 1, 1]
    assert seq.stats()["requests"] == 3 + 3 + 3


def test_labels_and_actions_follow_ratings(tmp_path):
    seq = build_sequences(read_movielens_csv(write_ml_csv(tmp_path / "d")), PrepConfig(label_threshold=3.0),
                          log=lambda *_: None)
    np.testing.assert_array_equal(seq.labels, (seq.ratings > 3.0).astype(np.int8))
    assert seq.rating_values == [0.5, 2.5, 3.5, 4.0, 5.0]
    np.testing.assert_array_equal(np.asarray(seq.rating_values)[seq.actions], seq.ratings)
    assert seq.item_genres[3] == []  # "(no genres listed)" is no genre


def test_duplicate_events_are_collapsed_and_counted(tmp_path):
    lines = ML1M_RATINGS + "1::10::2::978300760\n"  # same user, item, time as line 1, later line wins
    messages = []
    seq = build_sequences(read_movielens_1m(write_ml1m(tmp_path / "d", ratings=lines)), PrepConfig(),
                          log=messages.append)
    assert seq.report["duplicate_events_dropped"] == 1
    assert len(seq.items) == 10
    first = seq.user_offsets[0]
    assert seq.ratings[first] == 2.0
    assert any("duplicate" in m for m in messages)


def test_duplicate_events_can_be_rejected(tmp_path):
    lines = ML1M_RATINGS + "1::10::2::978300760\n"
    raw = read_movielens_1m(write_ml1m(tmp_path / "d", ratings=lines))
    with pytest.raises(DataError, match="duplicate event"):
        build_sequences(raw, PrepConfig(duplicates="error"), log=lambda *_: None)


def test_short_and_empty_users_are_dropped_and_counted(tmp_path):
    lines = ML1M_RATINGS + "9::10::4::978300000\n"  # user 9 has one event
    messages = []
    seq = build_sequences(read_movielens_1m(write_ml1m(tmp_path / "d", ratings=lines)),
                          PrepConfig(min_user_events=3), log=messages.append)
    assert seq.num_users == 3
    assert seq.report["short_users_dropped"] == 1 and seq.report["short_user_events_dropped"] == 1
    assert seq.report["users_without_events"] == 1
    assert any("fewer than 3" in m for m in messages) and any("no events" in m for m in messages)


def test_prepare_caches_by_inputs_and_options(tmp_path, monkeypatch):
    root = tmp_path / "root"
    write_ml1m(root / "ml-1m")
    calls = []
    spec = registry.DATASETS["ml-1m"]
    counting = registry.DatasetSpec(spec.name, spec.url, spec.checksum, spec.files,
                                    lambda p: calls.append(p) or read_movielens_1m(p))
    monkeypatch.setitem(registry.DATASETS, "ml-1m", counting)
    a = prepare("ml-1m", root, log=lambda *_: None)
    b = prepare("ml-1m", root, log=lambda *_: None)
    assert len(calls) == 1
    np.testing.assert_array_equal(a.items, b.items)
    assert a.item_genres == b.item_genres and a.rating_values == b.rating_values
    prepare("ml-1m", root, PrepConfig(label_threshold=4.0), log=lambda *_: None)
    assert len(calls) == 2
    (root / "ml-1m" / "ratings.dat").write_text(ML1M_RATINGS + "3::10::1::978300003\n")
    prepare("ml-1m", root, log=lambda *_: None)
    assert len(calls) == 3


def test_prepared_real_dataset_matches_published_counts(shared_data):
    stats = prepare("ml-latest-small", shared_data).stats()
    assert (stats["users"], stats["items"], stats["events"]) == (610, 9_724, 100_836)
    assert 0.5 < stats["label_rate"] < 0.7


def test_concurrent_prepares_of_one_dataset_do_not_collide(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("GENREC_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "root"
    write_ml1m(root / "ml-1m")
    results, errors = [], []

    def work():
        try:
            results.append(prepare("ml-1m", root, log=lambda *_: None))
        except Exception as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert all(np.array_equal(r.items, results[0].items) for r in results)
    assert not list((tmp_path / "cache" / "prepared").glob("*.tmp*"))
