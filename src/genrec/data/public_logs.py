"""The public multi-action logs, as :class:`~genrec.data.eventlog.EventLogSpec` over the publishers' files.

Each reader maps a dataset's published layout onto the generic event-log input; the formats are
taken from the publishers' own documentation:

* **KuaiRand** (Pure / 1K / 27K; kuairand.com, Zenodo 10439422): ``data/log_standard_*.csv`` and
  ``data/log_random_*.csv`` with a header, ``user_id, video_id, date, hourmin, time_ms, is_click,
  is_like, is_follow, is_comment, is_forward, is_hate, long_view, play_time_ms, duration_ms,
  profile_stay_time, comment_stay_time, is_profile_enter, is_rand, tab``; ``time_ms`` in milliseconds.
  The random-exposure log is left out unless asked for (the paper keeps it for unbiased evaluation).
* **KuaiSAR** (kuaisar.github.io): ``rec_inter.csv`` with ``user_id, item_id, playing_time,
  duration_ms, time, timestamp, click, forward, like, follow, search, search_item_related``;
  ``timestamp`` is Unix milliseconds (written as a float); items sent together share a timestamp.
* **RecFlow** (RecFlow-ICLR/RecFlow): ``realshow/<date>.feather`` (the exposure space) with
  ``request_id, request_timestamp, user_id, device_id, age, gender, province, video_id, author_id,
  category_level_one, category_level_two, upload_type, upload_timestamp, duration, …, playing_time,
  effective_view, long_view, like, follow, forward, comment``; ``request_timestamp`` in milliseconds.
* **Taobao UserBehavior** (Tianchi dataset 649): ``UserBehavior.csv`` without a header,
  ``user_id, item_id, category_id, behavior_type, timestamp`` (seconds), ``behavior_type`` one of
  ``pv, buy, cart, fav`` — one binary signal per behaviour.
* **Amazon reviews** 2014 (``reviews_<Category>[_5].json.gz``) and 2018 (``<Category>[_5].json.gz``),
  McAuley lab: one JSON object per line with ``reviewerID, asin, overall, unixReviewTime`` (and text
  fields we do not read). Converted once, streaming, to Parquet (:func:`amazon_to_parquet`); the
  signals are ``rating > 3`` and ``rating = 5``.

Downloads (:data:`PUBLIC_LOGS`): KuaiRand from Zenodo, checked against the md5 that Zenodo publishes
for the file; Amazon from the McAuley lab's servers (no checksum is published). KuaiSAR, RecFlow and
Taobao are served behind a browser form or a drive link: put the files under the data root.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from genrec.data.errors import DataError
from genrec.data.eventlog import EventLogSpec, SignalSpec
from genrec.data.registry import data_root, file_digest

KUAIRAND_SIGNALS = {"click": "is_click", "like": "is_like", "follow": "is_follow", "comment": "is_comment",
                    "forward": "is_forward", "long_view": "long_view", "hate": "is_hate",
                    "profile_enter": "is_profile_enter"}
KUAISAR_SIGNALS = ("click", "like", "follow", "forward", "search")
RECFLOW_SIGNALS = ("effective_view", "long_view", "like", "follow", "forward", "comment")
TAOBAO_BEHAVIOURS = ("pv", "cart", "fav", "buy")


def _folder(path: str | Path, marker: str) -> Path:
    """The folder holding ``marker`` files: ``path`` itself or its ``data/`` (as the archives extract)."""
    p = Path(path)
    for base in (p, p / "data", *sorted(q for q in p.glob("*") if q.is_dir()), *sorted(p.glob("*/data"))):
        if base.is_dir() and any(base.glob(marker)):
            return base
    raise DataError(str(p), f"no {marker} files here (nor in data/ or one folder down)")


def kuairand(path: str | Path, signals: tuple[str, ...] = ("click", "like", "follow", "comment", "forward",
                                                            "long_view"),
             include_random: bool = False) -> EventLogSpec:
    """KuaiRand-Pure, -1K or -27K: the standard logs (and the random-exposure log when asked)."""
    unknown = [s for s in signals if s not in KUAIRAND_SIGNALS]
    if unknown:
        raise ValueError(f"KuaiRand signals {unknown} unknown; known: {sorted(KUAIRAND_SIGNALS)}")
    base = _folder(path, "log_standard_*.csv")
    pattern = "log_*.csv" if include_random else "log_standard_*.csv"
    return EventLogSpec(str(base / pattern), tuple(SignalSpec(s, KUAIRAND_SIGNALS[s]) for s in signals),
                        user="user_id", item="video_id", timestamp="time_ms", time_unit="ms",
                        name=f"kuairand-{base.parent.name if base.name == 'data' else base.name}")


def kuaisar(path: str | Path, signals: tuple[str, ...] = KUAISAR_SIGNALS) -> EventLogSpec:
    """KuaiSAR's recommendation interactions (``rec_inter.csv``)."""
    base = _folder(path, "rec_inter.csv")
    return EventLogSpec(str(base / "rec_inter.csv"), tuple(SignalSpec(s, s) for s in signals),
                        user="user_id", item="item_id", timestamp="timestamp", time_unit="ms", name="kuaisar")


def recflow(path: str | Path, signals: tuple[str, ...] = RECFLOW_SIGNALS) -> EventLogSpec:
    """RecFlow's exposure space (``realshow/*.feather``), one request id per recommendation request."""
    base = _folder(path, "realshow/*.feather") if not Path(path).name == "realshow" else Path(path).parent
    return EventLogSpec(str(base / "realshow" / "*.feather"), tuple(SignalSpec(s, s) for s in signals),
                        user="user_id", item="video_id", timestamp="request_timestamp", time_unit="ms",
                        request="request_id", item_features=("author_id", "category_level_one"), format="ipc",
                        name="recflow")


def taobao(path: str | Path) -> EventLogSpec:
    """Taobao UserBehavior: one binary signal per behaviour type (pv, cart, fav, buy), label ``buy``."""
    p = Path(path)
    file = p if p.is_file() else _folder(p, "UserBehavior.csv") / "UserBehavior.csv"
    return EventLogSpec(str(file), tuple(SignalSpec(b, "behavior_type", equals=b) for b in TAOBAO_BEHAVIOURS),
                        user="user_id", item="item_id", timestamp="timestamp", time_unit="s",
                        csv_columns=("user_id", "item_id", "category_id", "behavior_type", "timestamp"),
                        item_features=("category_id",), label="buy", name="taobao")


AMAZON_FIELDS = {"reviewerID": pa.string(), "asin": pa.string(), "overall": pa.float64(),
                 "unixReviewTime": pa.int64()}


def amazon_to_parquet(source: str | Path, target: str | Path, block_bytes: int = 64 << 20) -> Path:
    """Stream an Amazon review dump (``.json`` or ``.json.gz``, one object per line) into Parquet with
    the four fields genrec reads. Memory: one block of lines. A line that is not a JSON object with
    these fields is an error naming the file and line."""
    source, target = Path(source), Path(target)
    schema = pa.schema(AMAZON_FIELDS)
    opener: Callable = gzip.open if source.suffix == ".gz" else open
    tmp = target.with_suffix(".part")
    line_no = 0
    try:
        with opener(source, "rb") as f, pq.ParquetWriter(tmp, schema) as writer:
            while True:
                block = f.read(block_bytes)
                if not block:
                    break
                block += f.readline()  # end on a line boundary
                lines = block.count(b"\n") + (not block.endswith(b"\n"))
                try:
                    table = pajson.read_json(io.BytesIO(block), parse_options=pajson.ParseOptions(
                        explicit_schema=schema, unexpected_field_behavior="ignore"))
                except pa.ArrowInvalid:
                    _raise_bad_line(source, block, line_no)
                for name in AMAZON_FIELDS:
                    nulls = table.column(name).null_count
                    if nulls:
                        row = next(i for i, v in enumerate(table.column(name).to_pylist()) if v is None)
                        raise DataError(str(source), f"field {name!r} is missing",
                                        line_no + _line_of_row(block, row))
                writer.write_table(table)
                line_no += lines
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _line_of_row(block: bytes, row: int) -> int:
    """Line (1-based, within ``block``) of the JSON reader's row ``row``: the reader skips blank lines."""
    filled = (i for i, line in enumerate(block.split(b"\n")) if line.strip())
    return next(i for k, i in enumerate(filled) if k == row) + 1


def _raise_bad_line(source: Path, block: bytes, first_line: int) -> None:
    for i, line in enumerate(block.split(b"\n")):
        if not line.strip():  # the reader skips blank lines
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DataError(str(source), f"not a JSON object: {line[:80]!r}", first_line + i + 1) from None
        missing = [k for k in AMAZON_FIELDS if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise DataError(str(source), f"missing field(s) {missing}", first_line + i + 1)
        for k, t in AMAZON_FIELDS.items():
            v = obj[k]
            ok = isinstance(v, str) if t == pa.string() else isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok:
                raise DataError(str(source), f"field {k!r} is {v!r}", first_line + i + 1)
    raise DataError(str(source), "unreadable JSON block", first_line + 1)


def amazon(path: str | Path, cache: Path | None = None) -> EventLogSpec:
    """Amazon reviews 2014 or 2018 (a ``.json``/``.json.gz`` dump, or a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        dumps = sorted(q for q in p.iterdir() if q.name.endswith((".json.gz", ".json")))
        if len(dumps) != 1:
            raise DataError(str(p), f"expected one Amazon review dump (.json or .json.gz), found {len(dumps)}")
        p = dumps[0]
    if not p.is_file():
        raise DataError(str(p), "no such file")
    stem = p.name.removesuffix(".gz").removesuffix(".json")
    target = (cache or p.parent) / f"{stem}.genrec.parquet"
    if not target.is_file() or target.stat().st_mtime < p.stat().st_mtime:
        target.parent.mkdir(parents=True, exist_ok=True)
        amazon_to_parquet(p, target)
    return EventLogSpec(str(target), (SignalSpec("like", "overall", "graded", 3.0),
                                      SignalSpec("five_star", "overall", "graded", 4.5)),
                        user="reviewerID", item="asin", timestamp="unixReviewTime", time_unit="s",
                        name=f"amazon-{stem}")


@dataclass(frozen=True)
class PublicLog:
    name: str
    reader: Callable[..., EventLogSpec]
    url: str | None  # the publisher's download, None where a form or drive link stands in between
    checksum: str | None  # "zenodo": the md5 Zenodo publishes for the file; None: none published
    archive: str | None = None  # file name of the download


ZENODO_KUAIRAND = "https://zenodo.org/records/10439422"
PUBLIC_LOGS: dict[str, PublicLog] = {log.name: log for log in [
    PublicLog("kuairand-pure", kuairand, f"{ZENODO_KUAIRAND}/files/KuaiRand-Pure.tar.gz", "zenodo",
              "KuaiRand-Pure.tar.gz"),
    PublicLog("kuairand-1k", kuairand, f"{ZENODO_KUAIRAND}/files/KuaiRand-1K.tar.gz", "zenodo", "KuaiRand-1K.tar.gz"),
    PublicLog("kuairand-27k", kuairand, f"{ZENODO_KUAIRAND}/files/KuaiRand-27K.tar.gz", "zenodo",
              "KuaiRand-27K.tar.gz"),
    PublicLog("kuaisar", kuaisar, None, None),
    PublicLog("recflow", recflow, None, None),
    PublicLog("taobao", taobao, None, None),
    PublicLog("amazon-books-2014", amazon,
              "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Books_5.json.gz", None,
              "reviews_Books_5.json.gz"),
    PublicLog("amazon-books-2018", amazon,
              "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/categoryFilesSmall/Books_5.json.gz", None,
              "Books_5.json.gz"),
]}


def zenodo_md5(record_api: str, file_name: str, timeout: float = 60.0) -> str:
    """The md5 that Zenodo publishes for ``file_name`` of a record (``/api/records/<id>``)."""
    with urllib.request.urlopen(record_api, timeout=timeout) as response:
        record = json.load(response)
    for entry in record.get("files", []):
        if entry.get("key") == file_name:
            algorithm, _, digest = str(entry.get("checksum", "")).partition(":")
            if algorithm == "md5" and digest:
                return digest
    raise DataError(record_api, f"the record lists no md5 for {file_name}")


def ensure_log(name: str, data_dir: str | Path | None = None, *, allow_download: bool = True,
               url: str | None = None, checksum_api: str | None = None) -> Path:
    """The folder of public log ``name`` under the data root, downloaded and extracted when absent
    (KuaiRand and Amazon; checked against the publisher's md5 where one is published).

    The download and its extraction happen in a sibling folder of this run's own (``name.tmp-*``),
    renamed into place once complete: a run killed midway leaves no ``name`` folder, so that the next
    run starts again rather than reading the files extracted before the kill. Its own, because runs
    fetch at once (every rank of ``genrec train --nproc K``): one folder shared by name would have
    each run delete the other's download. A run cleans its folder up on any error. One killed by
    SIGKILL cannot, so each run holds a lock on its folder (``flock`` on ``.owner`` in it, released by
    the kernel when the process dies) and the next run deletes every ``name.tmp-*`` folder whose lock
    nobody holds (:func:`_remove_abandoned`). The folder gets the umask's permissions, as one made
    by ``mkdir`` would (``mkdtemp`` makes it private), so a shared data root stays readable."""
    if name not in PUBLIC_LOGS:
        raise DataError(name, f"unknown public log; known: {', '.join(sorted(PUBLIC_LOGS))}")
    log = PUBLIC_LOGS[name]
    folder = data_root(data_dir) / name
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    url = url or log.url
    if url is None or not allow_download:
        raise DataError(str(folder), f"{name} not found; the publisher serves it behind a form or drive link"
                        if url is None else f"{name} not found (downloading not allowed)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder.parent, name)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{name}.tmp-"))
    owner = None
    try:
        owner = _lock_owner(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        target = _download(log, url, tmp / (log.archive or Path(url).name), checksum_api, folder)
        if target.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(target) as archive:
                archive.extractall(tmp, filter="data")
        for lock_file in (OWNER, UNLOCKED_OWNER):  # not part of the log; the lock stays held through the descriptor
            (tmp / lock_file).unlink(missing_ok=True)
        try:
            os.replace(tmp, folder)  # an empty folder is replaced too
        except OSError:
            if not any(folder.iterdir()):  # not another run's complete folder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if owner is not None:
            os.close(owner)
    return folder


OWNER = ".owner"  # the lock file in a run's download folder
UNLOCKED_OWNER = ".owner.new"  # its name until it is locked


def _lock_owner(folder: Path) -> int:
    """Lock ``folder`` for this process: an flock on a file that gets the name ``.owner`` only once it
    is locked, so a sweep never finds it unlocked while this run lives. The kernel drops the lock when
    the process dies. Where the file system has no flock, the file keeps its temporary name and the
    folder is never swept (left behind on a kill, as before). On NFS, Linux emulates flock with
    POSIX locks, which belong to the process: runs are separate processes (ranks), so that holds;
    two threads of one process fetching the same log at once are not guarded there."""
    fd = os.open(folder / UNLOCKED_OWNER, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # ENOLCK, EOPNOTSUPP: no locks here
        return fd
    os.rename(folder / UNLOCKED_OWNER, folder / OWNER)
    return fd


def _remove_abandoned(parent: Path, name: str) -> None:
    """Delete the ``name.tmp-*`` download folders of runs that died (their lock is free). A folder
    without its lock file (a run not yet past :func:`_lock_owner`) or whose lock cannot be tried is
    kept."""
    for path in parent.glob(f"{name}.tmp-*"):
        try:
            fd = os.open(path / OWNER, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: a live run's; anything else: cannot tell
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _download(log: PublicLog, url: str, target: Path, checksum_api: str | None, folder: Path) -> Path:
    """Download ``url`` to ``target`` (inside the run's private folder, so no partial-file name is
    needed), checked against Zenodo's md5 where the log has one."""
    try:
        with urllib.request.urlopen(url, timeout=60.0) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
        if log.checksum == "zenodo":
            expected = zenodo_md5(checksum_api or ZENODO_KUAIRAND.replace("/records/", "/api/records/"), target.name)
            got = file_digest(target, "md5")
            if got != expected:
                raise DataError(url, f"md5 of the download is {got}, Zenodo publishes {expected}")
    except (urllib.error.URLError, OSError) as err:
        raise DataError(str(folder / target.name), f"could not download {log.name} from {url} ({err}); "
                        f"put the files in {folder}") from None
    return target


def read_log(name: str, data_dir: str | Path | None = None, *, allow_download: bool = True,
             **reader_args) -> EventLogSpec:
    """The event-log spec of public log ``name`` (downloading it first where the publisher allows)."""
    folder = ensure_log(name, data_dir, allow_download=allow_download)
    return PUBLIC_LOGS[name].reader(folder, **reader_args)
