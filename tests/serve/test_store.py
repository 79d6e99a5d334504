"""The user store: LRU eviction of KV caches under a byte budget, host histories that survive
eviction, request numbering as in preprocessing, and a Parquet snapshot that round-trips."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from genrec.serve.store import History, UserStore, save_histories


def _history(times, items=None) -> History:
    n = len(times)
    return History.build(items or list(range(1, n + 1)), [0] * n, [1.0] * n, times, request_window_s=0)


def test_requests_are_numbered_as_the_preprocessing_does():
    assert _history([5, 5, 9, 9, 9, 12]).request_ids.tolist() == [0, 0, 1, 1, 1, 2]
    windowed = History.build([1, 2, 3, 4], [0] * 4, [0.0] * 4, [0, 10, 50, 55], request_window_s=10)
    assert windowed.request_ids.tolist() == [0, 0, 1, 1]
    grown = _history([5, 5]).appended(_history([5, 8]), request_window_s=0)  # same time: same request
    assert grown.request_ids.tolist() == [0, 0, 0, 1]
    assert _history([1, 2, 2, 3]).last(2, 0).request_ids.tolist() == [0, 1]


def test_caches_are_evicted_least_recently_used_and_histories_stay():
    store = UserStore(cache_budget_bytes=250, seed=lambda u: _history([1, 2]) if u.startswith("known") else None)
    for user in ("a", "b", "c"):
        store.set_history(user, _history([1, 2, 3]))
        assert store.put_cache(user, f"cache-{user}", 100) == ([] if user != "c" else ["a"])
    assert store.cache_bytes == 200 and store.stats.evictions == 1 and store.cached_users() == 2
    assert store.get("a").cache is None and len(store.get("a").history) == 3  # evicted, history kept
    store.get("b")  # b is now more recent than c
    assert store.put_cache("a", "cache-a", 100) == ["c"]
    assert store.get("b").cache == "cache-b" and store.get("c").cache is None
    store.set_history("huge", _history([1]))
    assert store.put_cache("huge", "x", 251) == [] and store.get("huge").cache is None  # over the whole budget
    assert store.get("known-1") is not None and store.get("stranger") is None
    store.set_history("b", _history([1, 2, 3, 4]))  # a new history drops the old cache
    assert store.get("b").cache is None and store.cache_bytes == 100
    assert store.cached_users() == sum(s.cache is not None for s in store.users.values()) == 1  # kept count


def test_snapshot_round_trips_raw_ids_and_refuses_unknown_ones(tmp_path):
    items, actions = ["10", "20", "30"], [0.5, 4.0]
    store = UserStore(1000)
    store.set_history("u1", History.build([1, 3, 2], [0, 1, 1], [0.0, 1.0, 1.0], [7, 7, 9], 0), "cache", 10)
    store.set_history("u2", History.build([2], [1], [1.0], [100], 0))
    path = tmp_path / "state" / "users.parquet"
    assert store.save(path, items, actions) == 4
    again = UserStore(1000)
    assert again.load(path, {raw: i for i, raw in enumerate(items, 1)}, {v: i for i, v in enumerate(actions)}, 0) == 2
    for user in ("u1", "u2"):
        a, b = store.get(user).history, again.get(user).history
        for field in ("items", "actions", "labels", "timestamps", "request_ids"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert again.get(user).cache is None  # caches are rebuilt on demand, never saved
    with pytest.raises(ValueError, match="u1.*does not know"):
        UserStore(1000).load(path, {"10": 1, "20": 2}, {0.5: 0, 4.0: 1}, 0)


def test_snapshot_keeps_seen_items_that_left_the_window(tmp_path):
    """Seen items beyond the events and the seed's are seen-only rows (no action, label or time) and
    come back as seen; a user with such rows and no event is refused."""
    items = [str(i) for i in range(10, 30)]  # raw ids of dense items 1..20

    def seed(user):
        return History.build([1], [0], [1.0], [5], 0, 0, np.array([1, 2, 3])) if user == "d" else None

    store = UserStore(1000, seed)
    store.set_history("d", History.build([4, 5], [0, 0], [1.0, 0.0], [7, 8], 0, 0, np.array([1, 2, 3, 9, 12])))
    store.set_history("n", History.build([6], [0], [1.0], [9], 0, None, np.array([7])))
    path = tmp_path / "users.parquet"
    assert store.save(path, items, [0.5]) == 3 + 3  # three events, and the seen-only items 9, 12 (d) and 7 (n)
    again = UserStore(1000, seed)
    assert again.load(path, {raw: i for i, raw in enumerate(items, 1)}, {0.5: 0}, 0) == 2
    assert again.get("d").history.seen.tolist() == [1, 2, 3, 4, 5, 9, 12]
    assert again.get("n").history.seen.tolist() == [6, 7]
    assert again.get("d").history.timestamps.tolist() == [7, 8] and again.get("n").history.items.tolist() == [6]
    table = pq.read_table(path)
    pq.write_table(table.filter(pc.is_null(table.column("time"))), path)
    with pytest.raises(ValueError, match="'d' has seen-only rows .* but no events"):
        UserStore(1000, seed).load(path, {raw: i for i, raw in enumerate(items, 1)}, {0.5: 0}, 0)
    actions = table.column("action").to_pylist()
    pq.write_table(table.set_column(2, "action", pa.array([None, *actions[1:]], pa.float64())), path)
    with pytest.raises(ValueError, match="'d' has an event .* without its action"):
        UserStore(1000, seed).load(path, {raw: i for i, raw in enumerate(items, 1)}, {0.5: 0}, 0)


def test_a_snapshot_of_many_users_round_trips_every_field_as_history_build_gives_it(tmp_path):
    """The column-wise save and load against the per-user definition (:meth:`History.build`): random
    users, some from a seed, request windows, seen-only items, rows of users interleaved in the file,
    a file written in many row groups."""
    rng = np.random.default_rng(3)
    items = [f"i{k}" for k in range(1, 61)]
    seeds = {f"d{u}": History.build(rng.integers(1, 61, 4), [0] * 4, [1.0] * 4, [1, 2, 3, 4], 0, u,
                                    np.unique(rng.integers(1, 61, 9))) for u in range(5)}
    store = UserStore(0, seeds.get)
    for name in [*seeds, *(f"n{u}" for u in range(7))]:
        n = int(rng.integers(1, 30))
        h = History.build(rng.integers(1, 61, n), rng.integers(0, 3, n), rng.random(n).astype(np.float32),
                          np.sort(rng.integers(0, 100, n)), 5, seeds[name].user if name in seeds else None,
                          np.unique(rng.integers(1, 61, 6)) if n % 2 else None)
        store.set_history(name, h)
    path = tmp_path / "users.parquet"
    store.save(path, items, [0.5, 1.0, 4.0])
    table = pq.read_table(path)  # users' rows interleaved by time, each user's rows in their order
    by_time = pc.sort_indices(pa.table({"t": table.column("time").fill_null(-1), "r": np.arange(table.num_rows)}),
                              [("t", "ascending"), ("r", "ascending")])
    pq.write_table(table.take(by_time), tmp_path / "interleaved.parquet")
    assert save_histories(tmp_path / "chunked.parquet", *store.histories(), seeds.get, items, [0.5, 1.0, 4.0],
                          chunk_rows=7) == table.num_rows  # row groups of a few users each
    assert pq.ParquetFile(tmp_path / "chunked.parquet").num_row_groups > 5
    for target in (path, tmp_path / "interleaved.parquet", tmp_path / "chunked.parquet"):
        again = UserStore(0, seeds.get)
        assert again.load(target, {raw: i for i, raw in enumerate(items, 1)}, {0.5: 0, 1.0: 1, 4.0: 2}, 5,
                          {name: h.user for name, h in seeds.items()}) == len(store)
        first_rows = list(dict.fromkeys(pq.read_table(target).column("user").to_pylist()))
        assert again.histories()[0] == first_rows  # in the file's order (LRU first)
        for name, state in store.users.items():
            want, got = state.history, again.get(name).history
            seen = want.seen if name not in seeds else np.union1d(want.seen, seeds[name].seen)  # load adds the seed's
            rebuilt = History.build(want.items, want.actions, want.labels, want.timestamps, 5, want.user, seen)
            for field in ("items", "actions", "labels", "timestamps", "request_ids", "seen"):
                np.testing.assert_array_equal(getattr(got, field), getattr(rebuilt, field), err_msg=f"{name}.{field}")
                assert getattr(got, field).dtype == getattr(rebuilt, field).dtype
            assert got.user == want.user
    interleaved = pq.read_table(tmp_path / "interleaved.parquet").column("user").to_pylist()
    assert list(dict.fromkeys(interleaved)) != list(store.users)  # that file really reorders the users
    empty = UserStore(0)
    empty.save(tmp_path / "empty.parquet", items, [0.5])
    assert UserStore(0).load(tmp_path / "empty.parquet", {}, {}, 5) == 0
    index, actions = {raw: i for i, raw in enumerate(items, 1)}, {0.5: 0, 1.0: 1, 4.0: 2}
    late_first = table.filter(pc.equal(table.column("user"), "n3"))  # n3's events, the latest first
    late_first = late_first.filter(pc.is_valid(late_first.column("time"))).take([1, 0])
    pq.write_table(pa.concat_tables([table, late_first]), path)
    with pytest.raises(ValueError, match="'n3' has events out of time order"):
        UserStore(0).load(path, index, actions, 5)
    pq.write_table(table.set_column(2, "action", pc.if_else(pc.equal(table.column("user"), "n5"), 9.0,
                                                            table.column("action"))), path)
    with pytest.raises(ValueError, match="'n5' has an id the model does not know: 9.0"):
        UserStore(0).load(path, index, actions, 5)


def test_a_store_view_keeps_the_histories_it_opened_with_while_the_store_changes():
    """A snapshot's view (copy-on-write): replaced histories read as they were when it opened, users
    added after it are not in it, the order is the LRU order it opened with; once closed, the store
    keeps nothing for it. One view at a time."""
    store = UserStore(0)
    for user in "abc":
        store.set_history(user, _history([ord(user), ord(user) + 1]))
    opened = {user: store.users[user].history for user in "abc"}
    view = store.open_view()
    with pytest.raises(RuntimeError, match="already open"):
        store.open_view()
    store.set_history("b", _history([1_000, 1_001]))  # replaced twice: the first history is the one kept
    store.set_history("b", _history([2_000, 2_001]))
    store.set_history("d", _history([3_000, 3_001]))  # new
    store.get("a")  # touched: most recent now, but the view keeps its order
    assert view.users == ["a", "b", "c"]
    assert all(got is opened[u] for u, got in zip(view.users, view.histories(), strict=True))
    store.close_view(view)
    assert store.view is None
    store.set_history("c", _history([4_000, 4_001]))
    assert view.before.keys() == {"a", "b"} and store.histories()[0] == ["b", "d", "a", "c"]  # "a": touched


class _Interleaved(dict):
    """The live users as the writer thread reads them while the scoring thread works on ``user``:
    replacing its history just before the writer's read (``"before"``) or just after it (``"after"``),
    or the writer reading every history while the store has the user's key out of the dict, in the
    middle of moving it to the end of the LRU order (``"key out"``, on a touch and on a replacement)."""

    def __init__(self, store: UserStore, user: str, when: str):
        super().__init__(store.users)
        self.store, self.user, self.when, self.read_with_key_out = store, user, when, []

    def get(self, key, default=None):
        replace = self.when if key == self.user and self.when in ("before", "after") else None
        if replace:
            self.when = None  # once
        if replace == "before":
            self.store.set_history(key, _history([9_000, 9_001]))
        state = super().get(key, default)
        if replace == "after":
            self.store.set_history(key, _history([9_000, 9_001]))
        return state

    def __delitem__(self, key):
        super().__delitem__(key)
        if self.when == "key out":
            self.read_with_key_out.append(self.store.view.histories())


@pytest.mark.parametrize("when", ["before", "after", "key out"])
def test_a_store_view_reads_the_opened_histories_however_the_scoring_thread_interleaves(when):
    """The order that makes the view consistent without a lock: the store records a user's history
    before it takes the user's key out of its dict (a replacement, or a move to the LRU end), and the
    view reads the live state before the recorded ones."""
    store = UserStore(0)
    store.set_history("a", _history([10, 11]))
    store.set_history("b", _history([20, 21]))
    opened = [store.users[u].history for u in ("a", "b")]
    live = _Interleaved(store, "a", when)
    store.users = live  # the scoring thread's changes land in the dict the view reads
    view = store.open_view()
    if when == "key out":
        store.get("a")  # a touch: the key goes out and comes back at the end
        store.set_history("b", _history([30, 31]))  # a replacement
        assert len(live.read_with_key_out) == 2
        assert all(got is want for read in live.read_with_key_out for got, want in zip(read, opened, strict=True))
    assert all(got is want for got, want in zip(view.histories(), opened, strict=True))
    assert store.users["a"].history is not opened[0] or when == "key out"  # "before"/"after": replaced
