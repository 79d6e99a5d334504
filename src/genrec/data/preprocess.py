"""Raw rating events -> per-user chronological sequences, cached as Parquet.

The result, :class:`Sequences`, is a CSR layout: flat per-event arrays in user-then-time order and
``user_offsets`` delimiting each user. Item ids are dense ``1..num_items`` (0 is reserved for
padding/"no item"). Each event carries its raw rating, a multi-class action (index of the rating in
the dataset's sorted rating values), a binary label (``rating > label_threshold``; the UniGRF paper's
"rating > 3"), its timestamp and a per-user request index (events of a user with equal timestamps,
or gaps of at most ``request_window_s`` seconds, form one request).

Policies (printed with counts, never silent): exact duplicate events (same user, item and timestamp)
are collapsed keeping the last line, or rejected with ``duplicates="error"``; users with fewer than
``min_user_events`` events are dropped; users listed in a users file with no events are counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrec.data import registry
from genrec.data.errors import DataError
from genrec.data.readers import RawData
from genrec.settings import Range

PREP_VERSION = 2  # bump when the preprocessing output changes, to invalidate caches


@dataclass(frozen=True)
class PrepConfig:
    label_threshold: float = 3.0  # binary label = rating > threshold (UniGRF: "rating > 3")
    request_window_s: Annotated[int, Range(0)] = 0  # events of a user within this gap form one request (0: equal times)
    min_user_events: Annotated[int, Range(1)] = 3  # users with fewer events are dropped (UniGRF §5.1.1: three)
    duplicates: Literal["drop", "error"] = "drop"  # equal (user, item, timestamp): keep the last line, or reject


@dataclass
class Sequences:
    """Per-user chronological event sequences in CSR form."""

    user_offsets: np.ndarray  # [U+1] int64
    items: np.ndarray  # [E] int32, 1..num_items
    ratings: np.ndarray  # [E] float32
    actions: np.ndarray  # [E] int64, index into rating_values
    labels: np.ndarray  # [E] int8, rating > threshold
    timestamps: np.ndarray  # [E] int64 (seconds)
    request_ids: np.ndarray  # [E] int32, per user from 0
    user_raw: list[str]
    item_raw: list[str]  # item_raw[i - 1] is dense item i
    item_genres: list[list[str]]  # per dense item i at [i - 1]
    item_titles: list[str]  # per dense item i at [i - 1] ("" without metadata)
    rating_values: list[float]
    report: dict = field(default_factory=dict)  # counts of every policy applied
    # several action signals per event (event logs, genrec.data.store); empty for one-signal data
    signal_names: list[str] = field(default_factory=list)
    signal_values: np.ndarray | None = None  # [E, S] float32 raw values (0/1, or graded)
    signal_labels: np.ndarray | None = None  # [E, S] int8 binary targets per signal
    source_digest: str = ""  # identity of the input files and options (set by prepare; part of a run's fingerprint)

    def __getstate__(self) -> dict:
        """Memory-mapped arrays pickle as their file names, so data-loader workers map the same pages
        instead of receiving a copy of the dataset."""
        state = dict(self.__dict__)
        for key, value in state.items():
            if isinstance(value, np.memmap) and value.filename is not None:
                state[key] = ("memmap", value.filename, value.dtype.str, value.shape, value.offset)
        return state

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            if isinstance(value, tuple) and len(value) == 5 and value[0] == "memmap":
                _, name, dtype, shape, offset = value
                state[key] = np.memmap(name, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)

    @property
    def num_users(self) -> int:
        return len(self.user_offsets) - 1

    @property
    def num_items(self) -> int:
        return len(self.item_raw)

    @property
    def num_actions(self) -> int:
        return len(self.rating_values)

    def stats(self) -> dict:
        lengths = np.diff(self.user_offsets)
        requests = int(np.sum(self.request_ids[self.user_offsets[1:] - 1] + 1)) if self.num_users else 0
        return {
            "users": self.num_users,
            "items": self.num_items,
            "events": int(len(self.items)),
            "requests": requests,
            "label_rate": float(self.labels.mean()) if len(self.labels) else 0.0,
            "mean_sequence_length": float(lengths.mean()) if len(lengths) else 0.0,
            "max_sequence_length": int(lengths.max()) if len(lengths) else 0,
            **self.report,
        }

    def genre_matrix(self) -> tuple[np.ndarray, list[str]]:
        """Multi-hot genres ``[num_items + 1, G]`` (row 0 = padding) and the genre vocabulary."""
        vocab = sorted({g for gs in self.item_genres for g in gs})
        index = {g: i for i, g in enumerate(vocab)}
        matrix = np.zeros((self.num_items + 1, max(len(vocab), 1)), dtype=np.float32)
        for item, genres in enumerate(self.item_genres, start=1):
            for g in genres:
                matrix[item, index[g]] = 1.0
        return matrix, vocab


def _dense(values: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Dense codes ordered by raw id (numerically when every id is an integer)."""
    uniques = pc.unique(values)
    try:
        order = np.argsort(pc.cast(uniques, pa.int64()).to_numpy(), kind="stable")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        order = np.argsort(np.asarray(uniques.to_pylist(), dtype=object), kind="stable")
    sorted_uniques = uniques.take(pa.array(order))
    codes = pc.index_in(values, value_set=sorted_uniques).to_numpy()
    return codes.astype(np.int64), sorted_uniques.to_pylist()


def request_ids(timestamps: np.ndarray, offsets: np.ndarray, request_window_s: int) -> np.ndarray:
    """Each event's request, numbered from 0 per user ([N] int64): events grouped by user (user ``u``'s
    are ``timestamps[offsets[u]:offsets[u + 1]]``, in time order), a request starting at a user's
    first event and after every gap longer than ``request_window_s``. The one definition the data,
    the service's histories and their snapshots share."""
    lengths = np.diff(offsets)
    starts = offsets[:-1][lengths > 0]  # [U'] the first event of each user that has one
    new_request = np.diff(timestamps, prepend=timestamps[:1]) > request_window_s
    new_request[starts] = True
    numbered = np.cumsum(new_request)
    return numbered - np.repeat(numbered[starts], lengths[lengths > 0])


def build_sequences(raw: RawData, cfg: PrepConfig, log=print) -> Sequences:
    if cfg.duplicates not in ("drop", "error"):
        raise ValueError(f"duplicates must be 'drop' or 'error', got {cfg.duplicates!r}")
    ev = raw.events
    if ev.num_rows == 0:
        raise DataError(raw.source, "no rating events")
    user_code, user_raw_all = _dense(ev.column("user"))
    item_code, item_raw_all = _dense(ev.column("item"))
    ts = ev.column("timestamp").to_numpy()
    rating = ev.column("rating").to_numpy().astype(np.float32)
    row = np.arange(ev.num_rows)
    order = np.lexsort((row, item_code, ts, user_code))  # user, then time, then item, then file line
    user_code, item_code, ts, rating, row = (a[order] for a in (user_code, item_code, ts, rating, row))
    report: dict = {"source_events": int(ev.num_rows)}

    same = (user_code[1:] == user_code[:-1]) & (item_code[1:] == item_code[:-1]) & (ts[1:] == ts[:-1])
    n_dup = int(same.sum())
    if n_dup and cfg.duplicates == "error":
        first = int(np.flatnonzero(same)[0])
        raise DataError(raw.source, f"duplicate event (user {ev.column('user')[int(row[first + 1])]}, "
                        f"item {ev.column('item')[int(row[first + 1])]}, same timestamp) on data rows "
                        f"{int(row[first]) + 1} and {int(row[first + 1]) + 1}")
    keep = np.ones(len(user_code), dtype=bool)
    keep[:-1] &= ~same  # of a run of duplicates keep the last (the latest line in the file)
    report["duplicate_events_dropped"] = n_dup
    if n_dup:
        log(f"[data] {raw.source}: {n_dup} duplicate events (same user, item, timestamp) collapsed, kept the last")

    user_code, item_code, ts, rating = (a[keep] for a in (user_code, item_code, ts, rating))
    counts = np.bincount(user_code)
    short = counts < cfg.min_user_events
    report["short_users_dropped"] = int(np.sum(short & (counts > 0)))
    report["short_user_events_dropped"] = int(counts[short].sum())
    if report["short_users_dropped"]:
        log(f"[data] {raw.source}: {report['short_users_dropped']} users with fewer than "
            f"{cfg.min_user_events} events dropped ({report['short_user_events_dropped']} events)")
    report["users_without_events"] = int(raw.users_without_events)
    if raw.users_without_events:
        log(f"[data] {raw.source}: {raw.users_without_events} listed users have no events (not in sequences)")
    keep = ~short[user_code]
    user_code, item_code, ts, rating = (a[keep] for a in (user_code, item_code, ts, rating))
    if len(user_code) == 0:
        raise DataError(raw.source, f"no user has {cfg.min_user_events} or more events")

    # Re-index users and items densely over what remains (items in raw-id order).
    users_left, user_dense = np.unique(user_code, return_inverse=True)
    items_left, item_dense = np.unique(item_code, return_inverse=True)
    user_raw = [user_raw_all[i] for i in users_left]
    item_raw = [item_raw_all[i] for i in items_left]
    meta_index = {k: i for i, k in enumerate(raw.items.column("item").to_pylist())}
    genre_lists = raw.items.column("genres").to_pylist()
    title_list = raw.items.column("title").to_pylist()
    item_genres, item_titles, missing_meta = [], [], 0
    for raw_id in item_raw:
        j = meta_index.get(raw_id)
        missing_meta += j is None
        gs = [] if j is None else [g for g in (genre_lists[j] or []) if g and g != "(no genres listed)"]
        item_genres.append(gs)
        item_titles.append("" if j is None else title_list[j] or "")
    report["items_without_metadata"] = missing_meta
    if missing_meta and raw.items.num_rows:
        log(f"[data] {raw.source}: {missing_meta} rated items have no metadata row (no genres)")

    offsets = np.zeros(len(users_left) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_dense, minlength=len(users_left)), out=offsets[1:])
    requests = request_ids(ts, offsets, cfg.request_window_s).astype(np.int32)

    rating_values = np.unique(rating)
    return Sequences(
        user_offsets=offsets,
        items=(item_dense + 1).astype(np.int32),
        ratings=rating,
        actions=np.searchsorted(rating_values, rating).astype(np.int64),
        labels=(rating > cfg.label_threshold).astype(np.int8),
        timestamps=ts.astype(np.int64),
        request_ids=requests,
        user_raw=[str(u) for u in user_raw],
        item_raw=[str(i) for i in item_raw],
        item_genres=item_genres,
        item_titles=item_titles,
        rating_values=[float(v) for v in rating_values],
        report=report,
    )


def input_digest(path: Path, files: tuple[str, ...]) -> str:
    """sha256 over the names and contents of a dataset's input ``files`` (or of its archive): the
    cache key's view of the input, which an edit in place changes (a folder's size and time do not)."""
    h = hashlib.sha256()
    targets = [path] if path.is_file() else [path / f for f in files if (path / f).is_file()]
    for t in targets:
        h.update(t.name.encode())
        h.update(registry.file_digest(t, "sha256").encode())
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("GENREC_CACHE") or Path.home() / ".cache" / "genrec") / "prepared"


def _save(seq: Sequences, folder: Path) -> None:
    """Write into a private temporary folder, then rename: concurrent preparers never collide, and
    the first complete result to land wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp-"))
    off = pa.array(seq.user_offsets.astype(np.int32))

    def lists(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(off, pa.array(values))

    pq.write_table(pa.table({
        "user": pa.array(seq.user_raw),
        "items": lists(seq.items), "ratings": lists(seq.ratings), "actions": lists(seq.actions),
        "labels": lists(seq.labels), "timestamps": lists(seq.timestamps), "request_ids": lists(seq.request_ids),
    }), tmp / "sequences.parquet")
    pq.write_table(pa.table({
        "item": pa.array(seq.item_raw), "genres": pa.array(seq.item_genres, type=pa.list_(pa.string())),
        "title": pa.array(seq.item_titles, type=pa.string()),
    }), tmp / "items.parquet")
    (tmp / "meta.json").write_text(json.dumps({"rating_values": seq.rating_values, "report": seq.report}))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process landed the same result first (or left a partial folder)
        if not (folder / "meta.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> Sequences:
    t = pq.read_table(folder / "sequences.parquet")
    items = pq.read_table(folder / "items.parquet")
    meta = json.loads((folder / "meta.json").read_text())

    def flat(name: str) -> np.ndarray:
        return t.column(name).combine_chunks().values.to_numpy()

    offsets = t.column("items").combine_chunks().offsets.to_numpy().astype(np.int64)
    return Sequences(offsets, flat("items"), flat("ratings"), flat("actions"), flat("labels"),
                     flat("timestamps"), flat("request_ids"), t.column("user").to_pylist(),
                     items.column("item").to_pylist(), items.column("genres").to_pylist(),
                     items.column("title").to_pylist(), meta["rating_values"], meta["report"])


def prepare(name: str, data_dir: str | Path | None = None, cfg: PrepConfig = PrepConfig(), *,
            allow_download: bool = True, log=print) -> Sequences:
    """Sequences for dataset ``name``, from the Parquet cache when inputs and options are unchanged."""
    spec = registry.spec_for(name)
    path = registry.ensure(name, data_dir, allow_download=allow_download)
    key = hashlib.sha256(json.dumps(
        [name, input_digest(path, spec.files), asdict(cfg), PREP_VERSION]).encode()).hexdigest()[:16]
    folder = cache_root() / f"{name}-{key}"
    if (folder / "meta.json").is_file():
        seq = _load(folder)
    else:
        seq = build_sequences(spec.reader(path), cfg, log=log)
        _save(seq, folder)
    seq.source_digest = key
    return seq
