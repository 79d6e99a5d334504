"""The service's user state: raw event history on the host, per-user KV caches under a byte budget.

Every user the service has seen keeps its event history on the host (a few numbers per event). The
model's per-user cache (the history's keys and values at every layer, on the model's device) is an
optimisation on top of it: caches are evicted least-recently-used when their bytes pass the budget,
and an evicted user is re-encoded from the host history on its next request, transparently. The host
history is the state that matters; :meth:`UserStore.save` writes it as Parquet (raw ids, so a file
outlives a model) and :meth:`UserStore.load` reads it back; appends between two snapshots are kept
by the write-ahead journal (:mod:`genrec.serve.journal`), so neither a restart nor a crash loses any.

The store is not thread-safe: the service touches it from its one scoring thread only. A snapshot
written in the background reads a :class:`StoreView` of it, copy-on-write: opening one copies the
list of users only, and the store keeps each user's history as the view saw it when it replaces
one while the view is open; the view calls the store's seed (a function of the training data).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrec.data.preprocess import request_ids


@dataclass
class History:
    """One user's events in time order, in the model's dense ids (items ``1..I``, action classes).

    ``user`` is the dataset's dense user index (what models with a user embedding read: BPR-MF and
    the CTR rankers), or None for a user the training data does not have (a user that started with
    ``/events``, an inline history without a dataset user). ``seen`` is every item the user has
    interacted with, also the dataset events and appended events that fell out of the ``max_len``
    window: what ``/recommend`` leaves out, as offline :func:`~genrec.serve.recommend.recommend`
    leaves out the whole dataset history. It is a sorted array of distinct ids, 4 bytes each, so it is
    bounded by the catalogue (at most ``4 · I`` bytes per user; ~400 KB for all 610 users of
    ml-latest-small), beside the ``max_len`` events' ~40 bytes each.
    """

    items: np.ndarray  # [N] int64
    actions: np.ndarray  # [N] int64 action class (index into the dataset's rating values)
    labels: np.ndarray  # [N] float32 binary label of the event
    timestamps: np.ndarray  # [N] int64 seconds, non-decreasing
    request_ids: np.ndarray  # [N] int64 from 0: a new request starts after a gap > the request window
    user: int | None = None  # dense user index, None: not a dataset user
    seen: np.ndarray | None = None  # [S] int32 sorted distinct item ids, a superset of items (None: items')

    def __post_init__(self):
        if self.seen is None:
            self.seen = np.unique(self.items).astype(np.int32)

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def build(cls, items, actions, labels, timestamps, request_window_s: int, user: int | None = None,
              seen: np.ndarray | None = None) -> History:
        """A history from per-event arrays, numbering requests as the preprocessing does."""
        timestamps = np.asarray(timestamps, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        seen = None if seen is None else np.union1d(seen, items).astype(np.int32)
        return cls(items, np.asarray(actions, dtype=np.int64), np.asarray(labels, dtype=np.float32), timestamps,
                   request_ids(timestamps, np.array([0, len(timestamps)]), request_window_s), user, seen)

    def appended(self, other: History, request_window_s: int) -> History:
        """This history followed by ``other`` (whose times must not precede this one's last)."""
        return History.build(*(np.concatenate([getattr(self, f), getattr(other, f)])
                               for f in ("items", "actions", "labels", "timestamps")), request_window_s,
                             self.user, self.seen)

    def last(self, n: int, request_window_s: int) -> History:
        """The latest ``n`` events (request ids renumbered from 0); the user and seen items stay."""
        return History.build(self.items[-n:], self.actions[-n:], self.labels[-n:], self.timestamps[-n:],
                             request_window_s, self.user, self.seen)

    def sample(self) -> tuple:
        """The history as one :func:`genrec.data.batching.collate` sample (no targets). A history
        without a dataset user goes in as user 0: the engine lets only models that never read the user
        index score one (:attr:`genrec.models.base.RecModel.reads_user_ids`)."""
        user = 0 if self.user is None else self.user
        return (user, self.items, self.actions, self.labels, self.timestamps, self.request_ids, len(self))


@dataclass
class UserState:
    history: History
    cache: Any = None  # the model's cache of this history, or None (never encoded, or evicted)
    cache_bytes: int = 0


@dataclass
class StoreStats:
    hits: int = 0  # requests that found the user's cache
    misses: int = 0  # requests that had to encode the history (new, evicted or changed user)
    evictions: int = 0  # caches dropped to stay under the byte budget


class StoreView:
    """Every user of a store and its history as they were when the view opened, read later on another
    thread while the store goes on changing (a snapshot's write). Opening copies the list of users (a
    C-level copy of the keys: ~1 ms at 100k users); while the view is open the store records a user's
    history in ``before`` before it takes the user's key out of its dict (to replace the history, or
    to move the user to the end of the LRU order), and users added later are not in the view. A
    :class:`History` is never changed in place, only replaced."""

    def __init__(self, users: dict[str, UserState]):
        self.users = list(users)  # [U] least recently used first
        self.before: dict[str, History] = {}  # user -> its history when the view opened, if replaced since
        self._live = users

    def histories(self) -> list[History]:
        """The view's histories, in the order of :attr:`users`. Each user's live state is read before
        ``before`` is: the store fills ``before`` before it takes a key out, so whichever comes first
        (and while the key is out), the history read is the one the view opened with."""
        live, before = self._live, self.before
        out = []
        for user in self.users:
            state = live.get(user)
            kept = before.get(user)
            out.append(kept if kept is not None else state.history)
        return out


class UserStore:
    """Users by raw id in least-recently-used order; ``seed(user)`` gives the starting history of a
    user the store does not hold yet (e.g. its training history), or None for an unknown user."""

    def __init__(self, cache_budget_bytes: int, seed: Callable[[str], History | None] | None = None):
        if cache_budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {cache_budget_bytes}")
        self.budget = cache_budget_bytes
        self.seed = seed or (lambda user: None)
        # least recently used first: a plain dict (insertion-ordered; a use re-inserts the user at the
        # end), whose list of keys copies ~10x faster than an OrderedDict's (a snapshot's view copies it)
        self.users: dict[str, UserState] = {}
        self.cache_bytes = 0
        self.cached = 0  # users whose cache is held (counted, not recounted per batch: a gauge reads it)
        self.stats = StoreStats()
        self.view: StoreView | None = None  # the open view (a snapshot being written), which sees no change

    def __len__(self) -> int:
        return len(self.users)

    def get(self, user: str) -> UserState | None:
        """The user's state (seeded on first sight), marked most recently used; None if unknown."""
        state = self.users.get(user)
        if state is None:
            history = self.seed(user)
            if history is None or len(history) == 0:
                return None
            state = UserState(history)
        self._put_last(user, state)
        return state

    def set_history(self, user: str, history: History, cache: Any = None, cache_bytes: int = 0) -> list[str]:
        """Replace the user's history (and its cache, which must encode exactly this history)."""
        state = self.users.get(user)
        if state is not None:
            self._drop_cache(state)
        self._put_last(user, UserState(history))
        return self.put_cache(user, cache, cache_bytes) if cache is not None else []

    def put_cache(self, user: str, cache: Any, cache_bytes: int) -> list[str]:
        """Keep ``cache`` for the user's current history; returns the users whose caches were evicted.
        A cache larger than the whole budget is not kept."""
        state = self.users[user]
        self._drop_cache(state)
        evicted = []
        if cache_bytes > self.budget:
            return evicted
        for other in list(self.users):
            if self.cache_bytes + cache_bytes <= self.budget:
                break
            victim = self.users[other]
            if other != user and victim.cache is not None:
                self._drop_cache(victim)
                evicted.append(other)
        state.cache, state.cache_bytes = cache, cache_bytes
        self.cache_bytes += cache_bytes
        self.cached += 1
        self.stats.evictions += len(evicted)
        return evicted

    def _put_last(self, user: str, state: UserState) -> None:
        """``user`` with ``state``, last in the LRU order: its key leaves the dict and comes back at the
        end. An open view is given the user's history first (:meth:`StoreView.histories` reads it
        there, also while the key is out)."""
        old = self.users.get(user)
        if old is not None:
            if self.view is not None:
                self.view.before.setdefault(user, old.history)
            del self.users[user]
        self.users[user] = state

    def _drop_cache(self, state: UserState) -> None:
        self.cached -= state.cache is not None
        self.cache_bytes -= state.cache_bytes
        state.cache, state.cache_bytes = None, 0

    def cached_users(self) -> int:
        return self.cached

    # ------------------------------------------------------------------------------------ snapshot
    def open_view(self) -> StoreView:
        """A :class:`StoreView` of the store as it is now, kept unchanged until :meth:`close_view`
        (one at a time)."""
        if self.view is not None:
            raise RuntimeError("a store view is already open: close it first (one snapshot at a time)")
        self.view = StoreView(self.users)
        return self.view

    def close_view(self, view: StoreView) -> None:
        """Stop keeping earlier histories for ``view`` (called from any thread once it is read)."""
        if self.view is view:
            self.view = None

    def histories(self) -> tuple[list[str], list[History]]:
        """Every user and its history, least recently used first (two lists of references, not pairs:
        no object per user to allocate, or for the collector to see)."""
        view = StoreView(self.users)
        return view.users, view.histories()

    def save(self, path: Path, item_raw: list[str], action_values: list[float], generation: int = 0) -> int:
        """Write every user's history (:func:`save_histories`). Returns rows."""
        return save_histories(path, *self.histories(), self.seed, item_raw, action_values, generation)

    def load(self, path: Path, item_index: dict[str, int], action_index: dict[float, int],
             request_window_s: int, user_index: dict[str, int] | None = None) -> int:
        """Read a snapshot written by :meth:`save`; every id must be known to the model. A dataset user
        (in ``user_index``) gets its dense index, and its seen items include the seed's (the whole
        dataset history, which the snapshot's ``max_len`` events do not hold) and the snapshot's
        seen-only rows. Users come back in the file's order (least recently used first). Returns users.

        Column-wise (pyarrow, numpy): the ids are mapped once per distinct value, and the only loop in
        Python is the one that builds each user's :class:`History`."""
        user_index = user_index or {}
        table = pq.read_table(path)
        expected = {"user", "item", "action", "label", "time"}
        if set(table.column_names) != expected:
            raise ValueError(f"{path}: columns {sorted(table.column_names)}, expected {sorted(expected)}")
        user_codes, users = _codes(table.column("user"))  # [R], [U] in order of first appearance
        event = table.column("time").is_valid().to_numpy(zero_copy_only=False)  # [R] False: a seen-only row

        def refuse(rows: np.ndarray, why: str):
            """The error for the first row of ``rows`` (a bool mask over rows), if any, naming its user."""
            if rows.any():
                raise ValueError(f"{path}: user {users[user_codes[np.argmax(rows)]]!r} {why}")

        refuse(np.bincount(user_codes[event], minlength=len(users))[user_codes] == 0,
               "has seen-only rows (no time) but no events")
        for field in ("action", "label"):
            refuse(event & table.column(field).is_null().to_numpy(zero_copy_only=False),
                   f"has an event (a row with a time) without its {field}")
        item = _mapped(table.column("item"), item_index)  # [R] dense ids, 0: unknown
        action = _mapped(table.column("action").fill_null(np.nan), action_index, missing=-1)  # [R]
        for ids, raw, missing in ((item, "item", 0), (action, "action", -1)):
            bad = (ids == missing) & (event | (raw == "item"))
            if bad.any():
                value = table.column(raw)[int(np.argmax(bad))].as_py()
                refuse(bad, f"has an id the model does not know: {value!r}")
        times = table.column("time").fill_null(0).to_numpy()  # [R]
        labels = table.column("label").fill_null(0).to_numpy()
        order = np.argsort(user_codes, kind="stable")  # rows grouped by user, in file order within a user
        ev = order[event[order]]  # event rows, grouped by user
        step_back = np.zeros(len(event), dtype=bool)  # an event before its user's previous one
        step_back[ev[1:]] = (times[ev[1:]] < times[ev[:-1]]) & (user_codes[ev[1:]] == user_codes[ev[:-1]])
        refuse(step_back, "has events out of time order")
        event_bounds = np.searchsorted(user_codes[ev], np.arange(len(users) + 1))  # [U + 1] (each has one)
        requests = request_ids(times[ev], event_bounds, request_window_s)  # [E]
        # seen: the user's rows' items and its seed's, as sorted distinct (user, item) keys
        width = max(len(item_index), int(item.max(initial=0))) + 1
        seeds = [self.seed(user) for user in users]
        seen = np.sort(np.concatenate([user_codes * width + item, _user_item_keys(
            [np.zeros(0, np.int64) if s is None else s.seen for s in seeds], width)]))
        seen = seen[np.append(True, seen[1:] != seen[:-1])] if len(seen) else seen
        seen_bounds = np.searchsorted(seen, np.arange(len(users) + 1) * width)
        seen_items = (seen % width).astype(np.int32)
        fields = (item[ev], action[ev], labels[ev].astype(np.float32), times[ev], requests)
        for u, user in enumerate(users):  # views into the columns: one allocation per column, not per user
            a, b = event_bounds[u], event_bounds[u + 1]
            self.set_history(user, History(*(f[a:b] for f in fields), user_index.get(user),
                                           seen_items[seen_bounds[u]:seen_bounds[u + 1]]))
        return len(users)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """A column as codes into its distinct values: ``([R] int64, [V] values in order of first appearance)``."""
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()


def _user_item_keys(arrays: list[np.ndarray], width: int) -> np.ndarray:
    """The items of ``arrays`` (one per user, in the users' order) as (user, item) keys
    ``user · width + item`` (int64), the users numbered from 0."""
    users = np.repeat(np.arange(len(arrays), dtype=np.int64), [len(a) for a in arrays])
    return users * width + np.concatenate(arrays or [np.zeros(0, np.int64)]).astype(np.int64, copy=False)


def _mapped(column: pa.ChunkedArray, index: dict, missing: int = 0) -> np.ndarray:
    """``index[value]`` for every row of ``column`` (``missing`` where it has none), looking up each
    distinct value once."""
    codes, values = _codes(column)
    return np.array([index.get(v, missing) for v in values], dtype=np.int64)[codes] if values else codes


def save_histories(path: Path, users: list[str], histories: list[History], seed: Callable[[str], History | None],
                   item_raw: list[str], action_values: list[float], generation: int = 0,
                   chunk_rows: int = 1 << 20) -> int:
    """Write the ``users``' ``histories`` as Parquet (one row per event, raw ids); atomic and on disk
    when it returns (temp file, fsync, ``os.replace``, fsync of the folder). ``generation`` goes into
    the file's metadata (:func:`snapshot_generation`). Returns rows. Reads only its arguments (and calls
    ``seed``), so it can run on another thread than the store's (:meth:`UserStore.histories`).

    Written a row group of about ``chunk_rows`` events at a time: memory stays bounded by a chunk, and
    no single array operation (which may hold the interpreter's lock) spans the whole store."""
    schema = pa.schema({"user": pa.string(), "item": pa.string(), "action": pa.float64(), "label": pa.float32(),
                        "time": pa.int64()}, metadata={GENERATION_KEY: str(generation)})
    raw_items, values = pa.array(item_raw, pa.string()), np.asarray(action_values, dtype=np.float64)
    ends = np.cumsum([len(h) for h in histories], dtype=np.int64)  # [U] rows up to each user's last event
    cuts = np.searchsorted(ends, np.arange(chunk_rows, ends[-1] if len(ends) else 0, chunk_rows), side="right")
    bounds = [0, *np.unique(cuts).tolist(), len(users)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi > lo:
                table = _snapshot_rows(users[lo:hi], histories[lo:hi], seed, raw_items, values, schema)
                writer.write_table(table)
                rows += table.num_rows
    replace_durably(tmp, path)
    return rows


def _snapshot_rows(users: list[str], histories: list[History], seed: Callable[[str], History | None],
                   raw_items: pa.Array, action_values: np.ndarray, schema: pa.Schema) -> pa.Table:
    """The snapshot's rows of some users: their events, then the items each has seen beyond its events
    and its seed's (appended events that left the ``max_len`` window) as rows with no action, label or
    time, so ``/recommend`` still leaves them out after a restart. Column-wise: ids become raw ids by
    one ``take`` each; the seen-only items are found over sorted (user, item) keys."""
    user_at = np.arange(len(users), dtype=np.int64)
    width = len(raw_items) + 1  # (user, item) pairs as one int64 key: user * width + item

    def joined(arrays: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype, copy=False)

    seeds = [seed(user) for user in users]
    seen = _user_item_keys([h.seen for h in histories], width)  # sorted: users in order, each one's seen sorted
    have = np.sort(np.concatenate([_user_item_keys([h.items for h in histories], width), _user_item_keys(
        [np.zeros(0, np.int64) if s is None else s.seen for s in seeds], width)]))
    at = np.minimum(np.searchsorted(have, seen), max(len(have) - 1, 0))  # (numpy's set ops hash: slower here)
    extra = seen[have[at] != seen] if len(have) else seen  # [E] keys of seen-only items
    names = pa.array(users, pa.string())
    events = pa.table({
        "user": names.take(np.repeat(user_at, [len(h) for h in histories])),
        "item": raw_items.take(joined([h.items for h in histories], np.int64) - 1),
        "action": action_values[joined([h.actions for h in histories], np.int64)],
        "label": joined([h.labels for h in histories], np.float32),
        "time": joined([h.timestamps for h in histories], np.int64)}, schema=schema)
    seen_only = pa.table({
        "user": names.take(extra // width), "item": raw_items.take(extra % width - 1),
        **{name: pa.nulls(len(extra), schema.field(name).type) for name in ("action", "label", "time")}},
        schema=schema)
    return pa.concat_tables([events, seen_only])


GENERATION_KEY = "genrec.journal_generation"


def snapshot_generation(path: Path) -> int:
    """The journal generation a snapshot was written at (0 for a file without one)."""
    metadata = pq.read_schema(path).metadata or {}
    return int(metadata.get(GENERATION_KEY.encode(), b"0"))


def replace_durably(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)`` that survives a power cut: the file's bytes are synced before the
    rename, the folder's entry after it."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
