"""Out-of-core preprocessing of an event log into memory-mapped per-user sequences.

Memory stays bounded by a bucket, not by the log: polars streams the validated log once to find
the users and items, and once more to write every event, with dense ids, into a per-bucket Arrow
IPC file (buckets are contiguous ranges of users, about ``bucket_events`` events each). Each bucket
is then sorted and its policies applied on its own, and its events are appended to flat binary
columns. The result is a folder that :func:`load` maps back with ``np.memmap``: a data loader reads
windows straight from the page cache, and worker processes share the pages (a pickled
:class:`~genrec.data.preprocess.Sequences` carries only the file names, never the arrays).

Folder layout::

    meta.json          sizes, signals, policies applied (counts), column dtypes and shapes
    users.parquet      raw user id of dense user u at row u
    items.parquet      raw item id of dense item i at row i - 1, plus item side features
    <column>.bin       user_offsets [U+1] int64; items [E] int32; timestamps [E] int64 (seconds);
                       request_ids [E] int32; actions [E] int16 (joint action code);
                       labels [E] int8; signal_values [E, S] float32; signal_labels [E, S] int8

Policies, each printed with its count: duplicates (same user, item, time, and request when given)
``"drop"`` keeps the last line / ``"error"`` / ``"keep"``; events out of time order within a user
(``time_order``) are ``"sort"``-ed (counted) or an ``"error"``; users with fewer than
``min_user_events`` events are dropped.

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
    duplicates: str = "drop"  # "drop" (keep the last line), "error" or "keep"
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
        self.files[name].write(np.ascontiguousarray(values).tobytes())
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



def _user_time(uc: np.ndarray, ts: np.ndarray) -> np.ndarray | tuple:
    """One int64 sort key for (user, time) when both fit (24 + 40 bits within a bucket), else the pair."""
    u = uc.astype(np.int64) - int(uc.min())
    t = ts - int(ts.min())
    if int(u.max()) < 2**23 and int(t.max()) < 2**40:
        return (u << 40) | t
    return np.lexsort((ts, uc)).argsort(kind="stable")  # rank of (user, time): one int64 key as well


def _sort_and_police(df: pl.DataFrame, signals: list[str], has_request: bool, cfg: StoreConfig,
                     scanned: ScannedLog, counts: dict) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """One bucket: sort by (user, time, request, file row), then apply the duplicate,
    time-order and short-user policies. Returns (user codes [n], per-user lengths, columns) or None.
    """
    uc = df["uc"].to_numpy()
    ic = df["ic"].to_numpy()
    ts = df["ts"].to_numpy()
    row = df["row"].to_numpy()
    # events of a request stay together; requests of a user at the same time are ordered by id hash
    req = df["request"].to_numpy() if has_request else None  # a hash: requests of one user at one time
    order = np.lexsort((row, req, _user_time(uc, ts)) if has_request else (row, _user_time(uc, ts)))
    uc, ic, ts, row = uc[order], ic[order], ts[order], row[order]
    req = req[order] if has_request else None
    values = df.select(signals).to_numpy().astype(np.float32, copy=False)[order]  # [n, S]

    # time order: an event is out of order when an earlier-time event of its user sits later in the file
    user_row = (uc.astype(np.int64) << 40) | row  # increasing user prefix keeps users apart
    run_start = np.r_[True, (uc[1:] != uc[:-1]) | (ts[1:] != ts[:-1])]
    starts = np.flatnonzero(run_start)
    run_max = np.maximum.reduceat(user_row, starts)
    before = np.r_[-1, np.maximum.accumulate(run_max)[:-1]]  # latest file row of all earlier-time events
    late = user_row < np.repeat(before, np.diff(np.r_[starts, len(uc)]))
    if late.any() and cfg.time_order == "error":
        i = int(np.flatnonzero(late)[0])
        raise DataError(scanned.locate(int(row[i])), "event is earlier in the file than an event of the same user "
                        "with an earlier time (time_order: error; 'sort' sorts them)")
    counts["out_of_order_events"] += int(late.sum())

    # duplicates: equal (user, time, [request], item); groups of (user, time, request) are contiguous
    group = np.cumsum(run_start if not has_request else np.r_[True, (uc[1:] != uc[:-1]) | (ts[1:] != ts[:-1])
                                                             | (req[1:] != req[:-1])])
    later = ~pl.Series((group.astype(np.int64) << 32) | ic.astype(np.int64)).is_last_distinct().to_numpy()
    n_dup = int(later.sum())
    if n_dup and cfg.duplicates == "error":
        i = int(np.flatnonzero(later)[0])
        raise DataError(scanned.locate(int(row[i])), f"duplicate event: the same user, item, time"
                        f"{', request' if has_request else ''} appear again later in the input (duplicates: error)")
    keep = np.ones(len(uc), dtype=bool)
    if cfg.duplicates == "drop":
        keep &= ~later  # of equal events keep the last line
        counts["duplicate_events_dropped"] += n_dup
    else:
        counts["duplicate_events_kept"] += n_dup

    # short users
    new_user = np.r_[True, uc[1:] != uc[:-1]]
    user_of = np.cumsum(new_user) - 1
    lengths = np.bincount(user_of, weights=keep).astype(np.int64)
    short = lengths < cfg.min_user_events
    counts["short_users_dropped"] += int(short.sum())
    counts["short_user_events_dropped"] += int(lengths[short].sum())
    keep &= ~short[user_of]
    if not keep.any():
        return None
    cols = {"ic": ic[keep], "ts": ts[keep], "values": values[keep]}
    if has_request:
        cols["request"] = req[keep]
    return uc[keep], lengths[~short], cols


def build(spec: EventLogSpec, out: str | Path, cfg: StoreConfig = StoreConfig(), log=print,
          scanned: ScannedLog | None = None) -> Path:
    """Preprocess ``spec`` into the store folder ``out`` (written privately, then renamed)."""
    if len(spec.signals) > MAX_SIGNALS:
        raise ValueError(f"{len(spec.signals)} signals: at most {MAX_SIGNALS} (joint action codes up to "
                         f"2^{MAX_SIGNALS})")
    t_start = time.perf_counter()
    scanned = scanned or scan(spec, log=log)
    report = dict(scanned.report)
    frame = scanned.frame
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        users, items, buckets = _dense_ids(frame, cfg.bucket_events)
        if users.height == 0:
            raise DataError(spec.path, "no events")
        signals = [f"sig_{s}" for s in spec.signal_names]
        request = ["request"] if spec.request else []
        part_dir = tmp / "parts"
        coded = (frame.join(users.lazy(), on="user").join(items.lazy(), on="item")
                 .select(pl.col("uc"), pl.col("ic"), "ts", *([pl.col("request").hash()] if request else []),
                         *signals, "row", "bucket"))
        coded.sink_ipc(pl.PartitionBy(part_dir, key="bucket", include_key=False), mkdir=True)
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
            bucket = _sort_and_police(df, signals, bool(request), cfg, scanned, counts)
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
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _log_policies(spec: EventLogSpec, cfg: StoreConfig, report: dict, log) -> None:
    name = spec.path
    if report["duplicate_events_dropped"]:
        log(f"[data] {name}: {report['duplicate_events_dropped']} duplicate events (same user, item, time"
            f"{', request' if spec.request else ''}) collapsed, kept the last line (duplicates: drop)")
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
