"""Out-of-core preprocessing of an event log into memory-mapped per-user sequences.

Memory stays bounded by a bucket, not by the log: polars streams the validated log once to find
the users and items, and once more to write every event, in file order, into a per-bucket Arrow
IPC file (buckets are contiguous ranges of users, about ``bucket_events`` events each). Each bucket
then gets its dense ids (lookup tables), is sorted (a radix sort by user; a full sort only of the
users whose file order is not their time order) and has its policies applied on its own, and its
events are appended to flat binary columns. The result is a folder that :func:`load` maps back
with ``np.memmap``: a data loader reads windows straight from the page cache, and worker processes
share the pages (a pickled :class:`~genrec.data.preprocess.Sequences` carries only the file names,
never the arrays).

Folder layout::

    meta.json          sizes, signals, policies applied (counts), column dtypes and shapes
    users.parquet      raw user id of dense user u at row u
    items.parquet      raw item id of dense item i at row i - 1, plus item side features
    <column>.bin       user_offsets [U+1] int64; items [E] int32; timestamps [E] int64 (seconds);
                       request_ids [E] int32; actions [E] int16 (joint action code);
                       labels [E] int8; signal_values [E, S] float32; signal_labels [E, S] int8

Policies, each printed with its count: duplicates (same user, item, time, and request when given)
``"drop"`` merges into one event (the last line's, each signal the maximum over the duplicates: a
view and a purchase in one second stay a purchase) / ``"error"`` / ``"keep"``; events out of time
order within a user (``time_order``) are ``"sort"``-ed (counted) or an ``"error"``; users with fewer
than ``min_user_events`` events are dropped.

The joint action code of an event is ``sum_s 2^s * signal_labels[s]``: the action token of the
single-action models, while multi-action models read ``signal_values`` / ``signal_labels``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from genrec.data.errors import DataError
from genrec.data.eventlog import TIME_UNITS, EventLogSpec, ScannedLog, scan
from genrec.data.preprocess import Sequences

STORE_VERSION = 1
MAX_SIGNALS = 10  # joint action codes up to 2^10


@dataclass(frozen=True)
class StoreConfig:
    request_window_s: int = 0  # without a request column: events of a user within this gap form one request
    min_user_events: int = 3
    duplicates: str = "drop"  # "drop" (merge into the last line, each signal's max), "error" or "keep"
    time_order: str = "sort"  # events out of time order within a user: "sort" (counted) or "error"
    bucket_events: int = 8_000_000  # events per sorting bucket: bounds peak memory

    def __post_init__(self):
        if self.duplicates not in ("drop", "error", "keep"):
            raise ValueError(f"duplicates must be 'drop', 'error' or 'keep', got {self.duplicates!r}")
        if self.time_order not in ("sort", "error"):
            raise ValueError(f"time_order must be 'sort' or 'error', got {self.time_order!r}")


class _Columns:
    """Append-only flat binary columns (one ``.bin`` per column), described in meta.json."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, object] = {}
        self.meta: dict[str, dict] = {}

    def append(self, name: str, values: np.ndarray) -> None:
        if name not in self.files:
            self.files[name] = open(self.folder / f"{name}.bin", "wb")
            self.meta[name] = {"dtype": values.dtype.str, "shape": [0, *values.shape[1:]]}
        assert self.meta[name]["dtype"] == values.dtype.str
        np.ascontiguousarray(values).tofile(self.files[name])
        self.meta[name]["shape"][0] += len(values)

    def close(self) -> dict:
        for f in self.files.values():
            f.close()
        return self.meta


def _key(spec: EventLogSpec, cfg: StoreConfig, files: list[Path]) -> str:
    """Cache key: the spec, the options and each file's path, size and modification time (hashing
    the contents of a multi-GB log would cost as much as preprocessing it)."""
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cfg_key = {k: v for k, v in asdict(cfg).items() if k != "bucket_events"}
    blob = json.dumps([asdict(spec), cfg_key, stats, STORE_VERSION], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dense_ids(frame: pl.LazyFrame, bucket_events: int) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Sorted distinct raw users and items with their dense codes ``uc`` / ``ic`` (0-based), streamed;
    each user's ``bucket``: contiguous user ranges of about ``bucket_events`` events (by the users'
    event counts, so that a few very long histories cannot make one bucket hold most of the log)."""
    users, items = pl.collect_all([frame.group_by("user").len(), frame.select(pl.col("item").unique())],
                                  engine="streaming")
    users = users.sort("user").with_row_index("uc").with_columns(
        pl.col("uc").cast(pl.Int32),
        ((pl.col("len").cum_sum() - pl.col("len")) // bucket_events).cast(pl.Int32).alias("bucket")).drop("len")
    items = items.sort("item").with_row_index("ic").with_columns(pl.col("ic").cast(pl.Int32))
    return users, items, int(users["bucket"].max()) + 1 if users.height else 0


def _bucket_files(folder: Path, bucket: int) -> list[Path]:
    """The IPC files polars wrote for one bucket (hive layout ``bucket=B/``; none for an empty bucket)."""
    part = folder / f"bucket={bucket}"
    return sorted(f for f in part.iterdir() if f.is_file()) if part.is_dir() else []


class _Vocabulary:
    """Dense codes (0-based rank among the sorted distinct raw ids) of a bucket's raw ids, looked up
    per bucket rather than joined in the streaming pass: integer ids of a compact range through one
    lookup table (a gather), other integer ids by binary search, text ids through a polars map."""

    def __init__(self, ids: pl.Series):
        self.ids = ids  # sorted distinct raw ids
        self.table = None
        if ids.dtype.is_integer() and len(ids):
            self.low = int(ids[0])
            span = int(ids[-1]) - self.low + 1
            if span <= max(1 << 24, 4 * len(ids)):  # at most 64 MiB, or 16 bytes per id
                self.table = np.zeros(span, dtype=np.int32)
                self.table[ids.to_numpy() - self.low] = np.arange(len(ids), dtype=np.int32)

    def codes(self, raw: pl.Series) -> np.ndarray:
        if self.table is not None:
            return self.table[raw.to_numpy() - self.low]  # [n] int32
        if raw.dtype.is_integer():
            return np.searchsorted(self.ids.to_numpy(), raw.to_numpy()).astype(np.int32)
        return raw.replace_strict(self.ids, pl.Series(np.arange(len(self.ids), dtype=np.int32))).to_numpy()


def _stable_user_sort(uc: np.ndarray) -> np.ndarray:
    """Stable permutation ``[n]`` sorting the dense user codes ``uc`` of one bucket: an LSD radix sort
    over 16-bit digits (numpy's stable sort of ``uint16`` is a radix sort), one linear pass per digit."""
    local = (uc - uc.min()).astype(np.uint32)  # [n] bucket-local codes
    order = np.arange(len(uc))
    shift = 0
    while shift == 0 or int(local.max()) >> shift:
        digit = ((local[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
    return order


def _event_order(uc: np.ndarray, ts: np.ndarray, req: np.ndarray | None,
                 row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permutation ``[n]`` sorting one bucket by (user, time, request, file row), the store's event
    order, and the mask ``[n]`` (in that order) of the events of users whose file order was not
    already their time order.

    Logs are mostly written in time order, so a comparison sort on four keys is mostly wasted work:
    the events arrive in file order (``row`` increasing), a stable radix sort by user keeps that
    order within each user, and only the users whose events are then out of (time, request) order
    are sorted by all four keys. Four events of users 0 and 1, user 1's written out of time order::

        file row      0   1   2   3
        user          1   0   1   0
        time          7   5   3   9
        by user       1   3 | 0   2     user 0: times 5, 9 (in order); user 1: times 7, 3
        order         1   3 | 2   0     user 1 sorted by (time, request, row); mask . . | x x
    """
    order = None
    if len(row) > 1 and bool((row[1:] < row[:-1]).any()):  # a partition that did not keep file order
        order = np.argsort(row, kind="stable")
    by_user = _stable_user_sort(uc if order is None else uc[order])
    order = by_user if order is None else order[by_user]
    u, t = uc[order], ts[order]
    wrong = t[1:] < t[:-1]  # [n - 1] pairs of neighbours
    if req is not None:
        r = req[order]
        wrong |= (t[1:] == t[:-1]) & (r[1:] < r[:-1])
    wrong &= u[1:] == u[:-1]
    resorted = np.zeros(len(uc), dtype=bool)
    if wrong.any():  # those users' events are contiguous blocks: sort them in place
        resorted = np.isin(u, u[1:][wrong])
        sub = order[resorted]
        keys = (row[sub], ts[sub], uc[sub]) if req is None else (row[sub], req[sub], ts[sub], uc[sub])
        order[resorted] = sub[np.lexsort(keys)]
    return order, resorted


def _late_events(uc: np.ndarray, ts: np.ndarray, row: np.ndarray) -> np.ndarray:
    """``[n]`` events (sorted by user and time) that sit earlier in the file than an event of the same
    user with an earlier time."""
    user_row = (uc.astype(np.int64) << 40) | row  # increasing user prefix keeps users apart
    run_start = np.r_[True, (uc[1:] != uc[:-1]) | (ts[1:] != ts[:-1])]
    starts = np.flatnonzero(run_start)
    run_max = np.maximum.reduceat(user_row, starts)
    before = np.r_[-1, np.maximum.accumulate(run_max)[:-1]]  # latest file row of all earlier-time events
    return user_row < np.repeat(before, np.diff(np.r_[starts, len(uc)]))


def _later_duplicates(new_group: np.ndarray, ic: np.ndarray) -> np.ndarray:
    """``[n]`` events whose item appears again later in their group (groups: contiguous runs that
    ``new_group`` opens). Exact, but hashes only the groups that can hold a repeat: a repeated item
    sets the same bit twice in each of three 64-bit masks of its group (bits 0-5, 6-11 and 12-17 of
    its dense code pick the bit), so a group with a mask of fewer bits than events holds none: most
    groups of a log are cleared in a few linear passes."""
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.r_[starts, len(ic)])  # [G]
    candidate = sizes > 1
    code = ic.astype(np.uint64)
    for shift in (0, 6, 12):
        bit = np.left_shift(np.uint64(1), (code >> np.uint64(shift)) & np.uint64(63))  # [n]
        candidate &= np.bitwise_count(np.bitwise_or.reduceat(bit, starts)) < sizes
    later = np.zeros(len(ic), dtype=bool)
    if candidate.any():
        events = np.repeat(candidate, sizes)  # [n] events of candidate groups
        group = np.cumsum(new_group)[events].astype(np.int64)
        key = (group << 32) | ic[events].astype(np.int64)
        later[events] = ~pl.Series(key).is_last_distinct().to_numpy()
    return later


def _last_of_duplicates(new_group: np.ndarray, ic: np.ndarray, later: np.ndarray) -> np.ndarray:
    """``[d]`` for each event of ``later`` (in order), the position of the last event of its group with
    the same item: the event that it merges into. Looks only at the groups holding a duplicate."""
    group = np.cumsum(new_group) - 1  # [n]
    has_dup = np.zeros(int(group[-1]) + 1, dtype=bool)
    has_dup[group[later]] = True
    idx = np.flatnonzero(has_dup[group])  # [k] events of those groups
    key = (group[idx].astype(np.int64) << 32) | ic[idx].astype(np.int64)
    by_key = np.argsort(key, kind="stable")  # equal keys stay in position order: the last is the target
    sorted_key = key[by_key]
    run_end = np.r_[sorted_key[1:] != sorted_key[:-1], True]
    run = np.cumsum(np.r_[True, run_end[:-1]]) - 1  # [k] run of each sorted event
    target = np.empty(len(idx), dtype=np.int64)
    target[by_key] = idx[by_key[run_end]][run]
    return target[later[idx]]


def _sort_and_police(df: pl.DataFrame, signals: list[str], has_request: bool, cfg: StoreConfig,
                     scanned: ScannedLog, counts: dict, users: _Vocabulary,
                     items: _Vocabulary) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """One bucket: sort by (user, time, request, file row), then apply the time-order, duplicate and
    short-user policies. Returns (user codes [m], per-user lengths, columns of the m kept events in
    store order) or None when no event is left."""
    uc_in = users.codes(df["user"])
    ts_in = df["ts"].to_numpy()
    row_in = df["row"].to_numpy()
    # events of a request stay together; requests of a user at the same time are ordered by id hash
    req_in = df["request"].to_numpy() if has_request else None
    order, resorted = _event_order(uc_in, ts_in, req_in, row_in)
    uc, ts, ic = uc_in[order], ts_in[order], items.codes(df["item"])[order]
    req = req_in[order] if has_request else None

    # time order: only users whose file order was not their time order can hold late events
    late = np.zeros(len(uc), dtype=bool)
    if resorted.any():
        late[resorted] = _late_events(uc[resorted], ts[resorted], row_in[order[resorted]])
    if late.any() and cfg.time_order == "error":
        i = int(np.flatnonzero(late)[0])
        raise DataError(scanned.locate(int(row_in[order[i]])), "event is earlier in the file than an event of "
                        "the same user with an earlier time (time_order: error; 'sort' sorts them)")
    counts["out_of_order_events"] += int(late.sum())

    # duplicates: equal (user, time, [request], item); groups of (user, time, request) are contiguous
    new_user = np.r_[True, uc[1:] != uc[:-1]]
    new_group = new_user | np.r_[True, ts[1:] != ts[:-1]]
    if has_request:
        new_group |= np.r_[True, req[1:] != req[:-1]]
    later = _later_duplicates(new_group, ic)
    n_dup = int(later.sum())
    if n_dup and cfg.duplicates == "error":
        i = int(np.flatnonzero(later)[0])
        raise DataError(scanned.locate(int(row_in[order[i]])), f"duplicate event: the same user, item, time"
                        f"{', request' if has_request else ''} appear again later in the input (duplicates: error)")
    keep = np.ones(len(uc), dtype=bool)
    if cfg.duplicates == "drop":
        keep &= ~later  # of equal events keep the last line, merged with the others below
        counts["duplicate_events_dropped"] += n_dup
    else:
        counts["duplicate_events_kept"] += n_dup

    # short users
    user_starts = np.flatnonzero(new_user)
    lengths = np.add.reduceat(keep, user_starts, dtype=np.int64)  # [users of the bucket]
    short = lengths < cfg.min_user_events
    counts["short_users_dropped"] += int(short.sum())
    counts["short_user_events_dropped"] += int(lengths[short].sum())
    if short.any():
        keep &= ~np.repeat(short, np.diff(np.r_[user_starts, len(uc)]))
    if not keep.any():
        return None
    kept = order[keep]  # [m] positions in the bucket file, in store order
    merged = np.flatnonzero(later) if cfg.duplicates == "drop" else np.zeros(0, dtype=np.int64)  # [d]
    into = _last_of_duplicates(new_group, ic, later) if len(merged) else merged  # [d]
    alive = keep[into]  # a short user's duplicates go with the user
    slot = (np.cumsum(keep) - 1)[into[alive]]  # [d'] rows of values that they merge into
    values = np.empty((len(kept), len(signals)), dtype=np.float32)  # [m, S]
    for s, name in enumerate(signals):
        column = df[name].to_numpy()
        values[:, s] = column[kept]
        np.maximum.at(values[:, s], slot, column[order[merged[alive]]])  # each signal: max over duplicates
    cols = {"ic": ic[keep], "ts": ts[keep], "values": values}
    if has_request:
        cols["request"] = req[keep]
    return uc[keep], lengths[~short], cols


def build(spec: EventLogSpec, out: str | Path, cfg: StoreConfig = StoreConfig(), log=print,
          scanned: ScannedLog | None = None) -> Path:
    """Preprocess ``spec`` into the store folder ``out`` (written privately, then renamed). ``out`` must
    be absent, an empty folder or an earlier store, which is replaced."""
    if len(spec.signals) > MAX_SIGNALS:
        raise ValueError(f"{len(spec.signals)} signals: at most {MAX_SIGNALS} (joint action codes up to "
                         f"2^{MAX_SIGNALS})")
    out = Path(out)
    _check_replaceable(out)  # before the scan: fail fast
    t_start = time.perf_counter()
    scanned = scanned or scan(spec, log=log)
    report = dict(scanned.report)
    frame = scanned.frame
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        users, items, buckets = _dense_ids(frame, cfg.bucket_events)
        if users.height == 0:
            raise DataError(spec.path, "no events")
        signals = [f"sig_{s}" for s in spec.signal_names]
        request = ["request"] if spec.request else []
        part_dir = tmp / "parts"
        # raw ids, each row's bucket from its user by binary search over the buckets' first users: an
        # elementwise pass, so every bucket file keeps the file order (see _event_order)
        firsts = users.filter(pl.col("bucket").diff() > 0)["user"]  # first raw user of buckets 1..B-1
        bucket = pl.lit(firsts).search_sorted(pl.col("user"), side="right") if len(firsts) else pl.lit(0)
        coded = frame.select("user", "item", "ts", *([pl.col("request").hash()] if request else []), *signals,
                             "row", bucket.cast(pl.Int32).alias("bucket"))
        coded.sink_ipc(pl.PartitionBy(part_dir, key="bucket", include_key=False), mkdir=True)
        user_codes, item_codes = _Vocabulary(users["user"]), _Vocabulary(items["item"])
        t_partition = time.perf_counter()

        columns = _Columns(tmp)
        user_offset_parts = [np.zeros(1, dtype=np.int64)]
        kept_users: list[np.ndarray] = []
        counts = {"duplicate_events_dropped": 0, "duplicate_events_kept": 0, "out_of_order_events": 0,
                  "short_users_dropped": 0, "short_user_events_dropped": 0}
        unit = TIME_UNITS[spec.time_unit]
        thresholds = np.array([0.5 if s.kind == "binary" else s.threshold for s in spec.signals], dtype=np.float32)
        label_col = spec.signal_names.index(spec.label_signal)
        total = 0
        seen = np.zeros(items.height, dtype=bool)  # items with an event left after the policies
        for b in range(buckets):
            files = _bucket_files(part_dir, b)
            if not files:
                continue
            df = pl.concat([pl.read_ipc(f) for f in files])
            bucket = _sort_and_police(df, signals, bool(request), cfg, scanned, counts, user_codes, item_codes)
            del df
            if bucket is None:
                continue
            uc, lengths, cols = bucket
            kept_users.append(uc[np.r_[0, np.cumsum(lengths)[:-1]]])
            ts = cols.pop("ts")
            new_user = np.zeros(len(uc), dtype=bool)
            new_user[np.r_[0, np.cumsum(lengths)[:-1]]] = True
            if request:
                req = cols.pop("request")
                new_request = new_user | np.r_[True, req[1:] != req[:-1]]
            else:
                new_request = new_user | (np.diff(ts, prepend=ts[0]) > cfg.request_window_s * unit)
            request_global = np.cumsum(new_request) - 1
            first_of_user = np.repeat(request_global[new_user], lengths)
            values = cols["values"]  # [n, S]
            labels = (values > thresholds[None, :]).astype(np.int8)  # [n, S]
            code = (labels.astype(np.int16) << np.arange(len(signals), dtype=np.int16)[None, :]).sum(1)
            seen[cols["ic"]] = True
            columns.append("items", (cols["ic"] + 1).astype(np.int32))
            columns.append("timestamps", np.floor_divide(ts, unit).astype(np.int64))
            columns.append("request_ids", (request_global - first_of_user).astype(np.int32))
            columns.append("actions", code.astype(np.int16))
            columns.append("labels", np.ascontiguousarray(labels[:, label_col]))
            columns.append("signal_values", values)
            columns.append("signal_labels", labels)
            user_offset_parts.append(total + np.cumsum(lengths))
            total += len(uc)
        meta_columns = columns.close()
        if total == 0:
            raise DataError(spec.path, f"no user has {cfg.min_user_events} or more events")
        offsets = np.concatenate(user_offset_parts)
        np.asarray(offsets, dtype=np.int64).tofile(tmp / "user_offsets.bin")
        meta_columns["user_offsets"] = {"dtype": "<i8", "shape": [len(offsets)]}
        kept = np.concatenate(kept_users).astype(np.int64)
        kept_raw = users.filter(pl.col("uc").is_in(pl.Series(kept).implode())).select(pl.col("user").cast(pl.String))
        kept_raw.write_parquet(tmp / "users.parquet")
        item_table = items.select(pl.col("item").cast(pl.String))
        if spec.item_features:
            feats = (frame.select("item", *[f"item_{c}" for c in spec.item_features]).group_by("item")
                     .agg(pl.all().last()).collect(engine="streaming"))
            item_table = items.join(feats, on="item", how="left").sort("ic").select(
                pl.col("item").cast(pl.String), *[f"item_{c}" for c in spec.item_features])
        item_table.write_parquet(tmp / "items.parquet")
        for key, value in counts.items():
            report[key] = value
        report["items_without_events"] = int(items.height - seen.sum())
        _log_policies(spec, cfg, report, log)
        shutil.rmtree(part_dir, ignore_errors=True)
        meta = {
            "version": STORE_VERSION, "name": spec.name, "spec": asdict(spec), "config": asdict(cfg),
            "users": int(len(offsets) - 1), "items": int(items.height), "events": int(total),
            "signals": spec.signal_names, "signal_kinds": [s.kind for s in spec.signals],
            "signal_thresholds": thresholds.tolist(), "label": spec.label_signal, "columns": meta_columns,
            "report": report, "item_features": list(spec.item_features),
            "seconds": {"partition": t_partition - t_start, "total": time.perf_counter() - t_start},
            "buckets": buckets,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _is_store(folder: Path) -> bool:
    """Whether ``folder`` is a store that :func:`build` wrote: its meta.json is ours (a bare file name
    such as meta.json is too common to trust on its own)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"version", "columns", "report"} <= meta.keys()


def _check_replaceable(out: Path) -> None:
    """Refuse an ``out`` that holds anything but a store: replacing it deletes it, and ``--out`` may
    well name the folder of the user's own files (the input log among them)."""
    if not out.exists() or out.is_dir() and (not any(out.iterdir()) or _is_store(out)):
        return
    raise DataError(str(out), "exists and is not an empty folder or a genrec event store (no store meta.json); "
                    "refusing to replace it: choose a new or empty output folder")


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished store ``tmp`` at ``out`` with renames only, so that a kill at any point leaves
    ``out`` the old store, the new one, or absent, never part of one: the old store is renamed aside
    (a sibling), the new one renamed in, and only then is the old one deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".old-"))
        os.replace(out, old / "store")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _log_policies(spec: EventLogSpec, cfg: StoreConfig, report: dict, log) -> None:
    name = spec.path
    if report["duplicate_events_dropped"]:
        log(f"[data] {name}: {report['duplicate_events_dropped']} duplicate events (same user, item, time"
            f"{', request' if spec.request else ''}) collapsed into the last line of each, every signal the "
            "maximum over them (duplicates: drop)")
    if report["duplicate_events_kept"]:
        log(f"[data] {name}: {report['duplicate_events_kept']} duplicate events kept (duplicates: keep)")
    if report["out_of_order_events"]:
        log(f"[data] {name}: {report['out_of_order_events']} events were out of time order within their user "
            "in the files; sorted by time (time_order: sort)")
    if report["short_users_dropped"]:
        log(f"[data] {name}: {report['short_users_dropped']} users with fewer than {cfg.min_user_events} events "
            f"dropped ({report['short_user_events_dropped']} events)")
    if report["items_without_events"]:
        log(f"[data] {name}: {report['items_without_events']} items have no events left after the policies "
            "(kept in the item vocabulary)")


def cache_folder(spec: EventLogSpec, cfg: StoreConfig, root: Path) -> Path:
    from genrec.data.eventlog import resolve_files

    return root / f"{spec.name}-{_key(spec, cfg, resolve_files(spec.path, spec.format))}"


def prepare(spec: EventLogSpec, cfg: StoreConfig = StoreConfig(), root: Path | None = None, log=print) -> Sequences:
    """Sequences of the event log, from the store cache when the files and options are unchanged."""
    from genrec.data.preprocess import cache_root

    folder = cache_folder(spec, cfg, root or cache_root())
    if not (folder / "meta.json").is_file():
        build(spec, folder, cfg, log=log)
    seq = load(folder)
    seq.source_digest = folder.name  # the spec, the options and the files' identity (part of a run's fingerprint)
    return seq


def _map(folder: Path, meta: dict, name: str) -> np.ndarray:
    info = meta["columns"][name]
    shape = tuple(info["shape"])
    if shape[0] == 0:
        return np.zeros(shape, dtype=np.dtype(info["dtype"]))
    return np.memmap(folder / f"{name}.bin", dtype=np.dtype(info["dtype"]), mode="r", shape=shape)


def load(folder: str | Path) -> Sequences:
    """Map a store folder back as :class:`Sequences` (arrays are read-only ``np.memmap`` views)."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise DataError(str(folder), "not a genrec event store (no meta.json)")
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("version") != STORE_VERSION:
        raise DataError(str(folder), f"store version {meta.get('version')}, this genrec reads {STORE_VERSION}; "
                        "rebuild it")
    items = pl.read_parquet(folder / "items.parquet")
    item_raw = items["item"].to_list()
    features = [c for c in items.columns if c != "item"]
    genres = ([[f"{c[len('item_'):]}={v}" for c, v in zip(features, row, strict=True) if v is not None]
               for row in items.select(features).iter_rows()] if features else [[] for _ in item_raw])
    s = len(meta["signals"])
    return Sequences(
        user_offsets=_map(folder, meta, "user_offsets"),
        items=_map(folder, meta, "items"),
        ratings=_map(folder, meta, "actions"),
        actions=_map(folder, meta, "actions"),
        labels=_map(folder, meta, "labels"),
        timestamps=_map(folder, meta, "timestamps"),
        request_ids=_map(folder, meta, "request_ids"),
        user_raw=pl.read_parquet(folder / "users.parquet")["user"].to_list(),
        item_raw=item_raw,
        item_genres=genres,
        item_titles=[""] * len(item_raw),
        rating_values=[float(c) for c in range(2 ** s)],
        report=meta["report"],
        signal_names=list(meta["signals"]),
        signal_values=_map(folder, meta, "signal_values"),
        signal_labels=_map(folder, meta, "signal_labels"),
    )
