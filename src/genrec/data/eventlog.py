"""A team's own event log as input: Parquet or CSV files with a column mapping, read lazily with polars.

An :class:`EventLogSpec` names the files (one file, a folder, or a glob) and which columns hold the
user, the item, the time, an optional request/session id, one or more action signals and optional
item side features (no model reads user features, so the spec takes none rather than ignore them).
:func:`scan` validates every file and returns one polars ``LazyFrame`` in canonical columns, never
materialising the log::

    user, item          raw ids (integer or string, as in the files)
    ts                  int64 time in the spec's ``time_unit``
    request             optional request/session id (any type; equal ids within a user = one request)
    sig_<name>          float32 signal value (binary 0/1, or graded such as a rating or watch ratio)
    row                 int64 position in the concatenated input (file order), for policies and errors
    item_<col>          item side features as strings

Validation names the file, the row (Parquet, 1-based) or line (CSV, header = line 1) and the column:
missing columns, values that are not numbers, binary signals outside {0, 1}, missing values,
negative times. Policies (each printed with its count, never silent): ``missing`` / ``negative_time``
= ``"error"`` (default) or ``"drop"``; time order and duplicates are handled when sequences are built
(:mod:`genrec.data.store`).
"""

from __future__ import annotations

import csv
import glob as globlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from genrec.data.errors import DataError

TIME_UNITS = {"s": 1, "ms": 1000, "us": 1_000_000}


@dataclass(frozen=True)
class SignalSpec:
    """One action signal. ``binary`` columns hold 0/1; ``graded`` ones any number, and their
    binary target is ``value > threshold`` (e.g. a rating > 3, a watch ratio > 0.5). With ``equals``
    the signal is 1 where a categorical column holds that value (Taobao's ``behavior`` = ``buy``); such
    a column must hold one of the values its signals name."""

    name: str
    column: str
    kind: str = "binary"  # "binary" | "graded"
    threshold: float = 0.0
    equals: str | None = None  # binary signal "column == equals" of a categorical behaviour column

    def __post_init__(self):
        if self.kind not in ("binary", "graded"):
            raise ValueError(f"signal {self.name!r}: kind must be 'binary' or 'graded', got {self.kind!r}")


@dataclass(frozen=True)
class EventLogSpec:
    path: str  # a file, a folder (every *.parquet / *.csv inside) or a glob
    signals: tuple[SignalSpec, ...]
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    time_unit: str = "s"  # unit of the timestamp column: "s", "ms" or "us"
    request: str | None = None  # request / session id column; None: equal timestamps form a request
    item_features: tuple[str, ...] = ()
    format: str = "auto"  # "parquet", "csv", "ipc" (Feather / Arrow) or "auto" (by file suffix)
    separator: str = ","  # CSV only
    csv_columns: tuple[str, ...] | None = None  # CSV without a header line: its column names
    missing: str = "error"  # a required value missing: "error" or "drop"
    negative_time: str = "error"  # a timestamp < 0: "error" or "drop"
    label: str | None = None  # the primary signal (default: the first)
    name: str = "event-log"

    def __post_init__(self):
        if not self.signals:
            raise ValueError("an event log needs at least one signal column")
        names = [s.name for s in self.signals]
        if len(set(names)) != len(names):
            raise ValueError(f"signal names must be distinct, got {names}")
        if self.time_unit not in TIME_UNITS:
            raise ValueError(f"time_unit must be one of {sorted(TIME_UNITS)}, got {self.time_unit!r}")
        for key in ("missing", "negative_time"):
            if getattr(self, key) not in ("error", "drop"):
                raise ValueError(f"{key} must be 'error' or 'drop', got {getattr(self, key)!r}")
        if self.format not in ("auto", "parquet", "csv", "ipc"):
            raise ValueError(f"format must be 'auto', 'parquet', 'csv' or 'ipc', got {self.format!r}")
        if self.label is not None and self.label not in names:
            raise ValueError(f"label {self.label!r} is not one of the signals {names}")

    @property
    def signal_names(self) -> list[str]:
        return [s.name for s in self.signals]

    @property
    def label_signal(self) -> str:
        return self.label or self.signals[0].name

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "event_log") -> EventLogSpec:
        """From a config mapping; ``signals`` is a list of ``{name, column, kind, threshold}`` mappings,
        of column names, or a mapping ``name: column``."""
        values = dict(values)
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        if "path" not in values or "signals" not in values:
            raise ValueError(f"{where}: needs 'path' and 'signals'")
        raw = values.pop("signals")
        if isinstance(raw, dict):
            signals = tuple(SignalSpec(str(k), str(v)) for k, v in raw.items())
        else:
            signals = tuple(SignalSpec(s, s) if isinstance(s, str) else SignalSpec(**s) for s in raw)
        for key in ("item_features", "csv_columns"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(signals=signals, **values)


@dataclass
class ScannedLog:
    """A validated log: the lazy canonical frame, its files, and the policy counts applied."""

    frame: pl.LazyFrame
    spec: EventLogSpec
    files: list[Path]
    file_rows: list[int]  # rows per file, in order (global ``row`` = sum of earlier files + row in file)
    report: dict = field(default_factory=dict)

    def locate(self, row: int) -> str:
        """``file row N`` (Parquet) or ``file:line`` (CSV) of a global row index."""
        start = 0
        for f, n in zip(self.files, self.file_rows, strict=True):
            if row < start + n:
                return _where(f, row - start, self.spec)
            start += n
        return f"row {row}"


def _csv_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """(first physical line, bytes) of each record of a CSV file, the header and blank lines included
    (polars reads a blank line as a row). A quoted field may hold line breaks: a line with an odd
    number of quotes opens or closes one (an escaped quote is doubled, so it keeps the count even)."""
    start, parts, quoted = 1, [], False
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not parts:
                start = n
            parts.append(line)
            quoted ^= line.count(b'"') % 2 == 1
            if not quoted:
                yield start, b"".join(parts)
                parts = []
    if parts:
        yield start, b"".join(parts)


def _line(path: Path, row: int, spec: EventLogSpec) -> int:
    """Physical line of a CSV data row (1-based; the header, when there is one, is line 1). Read from
    the file, which only an error pays for: a quoted line break makes a record longer than a line."""
    record = row + (0 if spec.csv_columns else 1)
    for i, (line, _) in enumerate(_csv_records(path)):
        if i == record:
            return line
    return record + 1


def _long_record(path: Path, spec: EventLogSpec, columns: int) -> int | None:
    """Line of the first CSV record with more than ``columns`` fields, or None."""
    sep = spec.separator.encode()
    for i, (line, record) in enumerate(_csv_records(path)):
        text = record.rstrip(b"\r\n")
        fields = (text.count(sep) + 1 if b'"' not in text else
                  len(next(csv.reader([text.decode(errors="replace")], delimiter=spec.separator), [])))
        if (i > 0 or spec.csv_columns) and fields > columns:
            return line
    return None


def _where(path: Path, row: int, spec: EventLogSpec) -> str:
    return f"{path}:{_line(path, row, spec)}" if _is_csv(path) else f"{path} row {row + 1}"


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tsv", ".txt")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if _is_csv(path):
        return "csv"
    return "ipc" if suffix in (".feather", ".arrow", ".ipc") else "parquet" if suffix == ".parquet" else ""


def resolve_files(path: str | Path, fmt: str = "auto") -> list[Path]:
    """The input files, sorted: a file, every Parquet/CSV file of a folder, or a glob's matches."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and _kind(f) and not f.name.startswith("."))
    else:
        files = sorted(Path(f) for f in globlib.glob(str(path)) if Path(f).is_file())
    if fmt != "auto":
        files = [f for f in files if _kind(f) == fmt or p.is_file()]
    if not files:
        raise DataError(str(path), "no Parquet, CSV or Feather files found (a file, a folder or a glob)")
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise DataError(str(path), f"mixes file formats ({sorted(kinds)}); set format to pick one")
    return files


def _raw_frame(path: Path, spec: EventLogSpec) -> tuple[pl.LazyFrame, list[str]]:
    """The file as a lazy frame (CSV: every column as text, so that bad values can be located)."""
    try:
        kind = spec.format if spec.format != "auto" else _kind(path)
        if kind == "csv":
            lf = pl.scan_csv(path, separator=spec.separator, infer_schema=False,
                             has_header=spec.csv_columns is None, new_columns=list(spec.csv_columns or []) or None)
        elif kind == "ipc":
            lf = pl.scan_ipc(path)
        else:
            lf = pl.scan_parquet(path)
        columns = lf.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(str(path), f"unreadable: {err}") from None
    return lf, columns


def _required(spec: EventLogSpec) -> dict[str, str]:
    """canonical name -> file column."""
    cols = {"user": spec.user, "item": spec.item, "ts": spec.timestamp}
    if spec.request:
        cols["request"] = spec.request
    for s in spec.signals:
        cols[f"sig_{s.name}"] = s.column
    for c in spec.item_features:
        cols[f"item_{c}"] = c
    return cols


def _canonical(spec: EventLogSpec, schema: pl.Schema) -> list[pl.Expr]:
    """Rename and cast to the canonical columns; failed casts become null (located by the checks)."""
    mapping = _required(spec)
    exprs = []
    for canon, col in mapping.items():
        e = pl.col(col)
        dtype = schema[col]
        if canon == "ts" and dtype.is_integer():  # exact (no float round trip); too large for int64: null
            e = e.cast(pl.Int64, strict=False)
        elif canon == "ts":
            if dtype == pl.String:
                e = e.str.strip_chars().cast(pl.Float64, strict=False)
            e = pl.when(e.cast(pl.Float64, strict=False) == e.cast(pl.Float64, strict=False).floor()).then(
                e.cast(pl.Float64, strict=False)).otherwise(None).cast(pl.Int64, strict=False)
        elif canon.startswith("sig_"):
            signal = next(x for x in spec.signals if f"sig_{x.name}" == canon)
            if signal.equals is not None:
                e = (e.cast(pl.String).str.strip_chars() == signal.equals).cast(pl.Float32)
            else:
                if dtype == pl.String:
                    e = e.str.strip_chars()
                e = e.cast(pl.Float32, strict=False)
        elif canon in ("user", "item", "request"):
            if dtype == pl.String:
                e = e.str.strip_chars()
                e = pl.when(e == "").then(None).otherwise(e)
        else:  # side features: categorical text
            e = e.cast(pl.String)
        exprs.append(e.alias(canon))
    return exprs


def _problems(spec: EventLogSpec, raw_schema: pl.Schema) -> list[tuple[str, pl.Expr]]:
    """(message, row-level condition on the canonical + raw frame) for every check, in report order."""
    mapping = _required(spec)
    checks: list[tuple[str, pl.Expr]] = []
    for canon, col in mapping.items():
        if not (canon in ("user", "item", "ts", "request") or canon.startswith("sig_")):
            continue
        raw = pl.col(f"raw_{canon}")
        checks.append((f"missing:{canon}", raw.is_null() | (raw.cast(pl.String).str.strip_chars() == "")
                       if raw_schema[col] == pl.String else raw.is_null()))
        if canon == "ts" or canon.startswith("sig_") and not _categorical(spec, canon):
            checks.append((f"number:{canon}", raw.is_not_null() & pl.col(canon).is_null()))
    checks.append(("negative:ts", pl.col("ts") < 0))
    for s in spec.signals:
        c = pl.col(f"sig_{s.name}")
        if s.equals is not None:
            allowed = [x.equals for x in spec.signals if x.column == s.column and x.equals is not None]
            checks.append((f"category:sig_{s.name}", pl.col(f"raw_sig_{s.name}").is_not_null() & ~pl.col(
                f"raw_sig_{s.name}").cast(pl.String).str.strip_chars().is_in(allowed)))
        elif s.kind == "binary":
            checks.append((f"binary:sig_{s.name}", c.is_not_null() & ~c.is_in([0.0, 1.0])))
        else:
            checks.append((f"finite:sig_{s.name}", c.is_not_null() & ~c.is_finite()))
    return checks


def _categorical(spec: EventLogSpec, canon: str) -> bool:
    return any(f"sig_{s.name}" == canon and s.equals is not None for s in spec.signals)


def _explain(kind: str, canon: str, spec: EventLogSpec, value: Any) -> str:
    column = _required(spec)[canon]
    if kind == "missing":
        return f"column {column!r} is missing a value"
    if kind == "number":
        return f"column {column!r} is {value!r}, expected {'an integer time' if canon == 'ts' else 'a number'}"
    if kind == "negative":
        return f"column {column!r} is {value}, a negative time (negative_time: error; 'drop' drops such rows)"
    if kind == "binary":
        return f"column {column!r} is {value}, a binary signal must be 0 or 1 (or declare it kind: graded)"
    if kind == "category":
        allowed = [s.equals for s in spec.signals if s.column == column and s.equals is not None]
        return f"column {column!r} is {value!r}, expected one of {allowed}"
    return f"column {column!r} is {value}, not a finite number"


def scan(spec: EventLogSpec, log=print) -> ScannedLog:
    """Validate every file of ``spec`` and return the lazy canonical frame (see the module docstring)."""
    files = resolve_files(spec.path, spec.format)
    mapping = _required(spec)
    frames, rows = [], []
    report = {"source_events": 0, "missing_rows_dropped": 0, "negative_time_rows_dropped": 0}
    offset = 0
    for path in files:
        lf, columns = _raw_frame(path, spec)
        absent = [c for c in dict.fromkeys(mapping.values()) if c not in columns]
        if absent:
            raise DataError(str(path), f"missing column(s) {absent}; the file has {columns}")
        schema = lf.collect_schema()
        for canon, col in mapping.items():
            dtype = schema[col]
            if canon == "ts" or canon.startswith("sig_"):
                ok, expected = dtype.is_numeric() or dtype == pl.String, "a number"
            elif canon in ("user", "item", "request"):
                ok, expected = dtype.is_integer() or dtype == pl.String, "integer or text ids"
            else:
                ok, expected = True, ""
            if not ok:
                raise DataError(str(path), f"column {col!r} has type {dtype}, expected {expected}")
        required = [c for c in mapping if c in ("user", "item", "ts", "request") or c.startswith("sig_")]
        both = lf.select(_canonical(spec, schema) + [pl.col(mapping[c]).alias(f"raw_{c}") for c in required]
                         ).with_row_index("file_row")
        checks = _problems(spec, schema)
        try:
            counts = both.select([cond.sum().alias(name) for name, cond in checks] + [pl.len().alias("rows")]
                                 ).collect(engine="streaming").row(0, named=True)
        except pl.exceptions.PolarsError as err:
            line = _long_record(path, spec, len(columns)) if _is_csv(path) else None
            if line is not None:
                raise DataError(str(path), f"more fields than the {len(columns)} columns {columns}", line) from None
            raise DataError(str(path), f"unreadable: {err}") from None
        n = int(counts.pop("rows"))
        drop = pl.lit(False)
        for name, cond in checks:
            if not counts[name]:
                continue
            kind, canon = name.split(":", 1)
            policy = {"missing": spec.missing, "negative": spec.negative_time}.get(kind, "error")
            if policy == "drop":
                drop = drop | cond
                key = "missing_rows_dropped" if kind == "missing" else "negative_time_rows_dropped"
                report[key] += int(counts[name])
                what = f"a missing {mapping[canon]}" if kind == "missing" else "a negative time"
                log(f"[data] {path}: {counts[name]} rows with {what} dropped ({kind} policy: drop)")
                continue
            shown = pl.col(f"raw_{canon}") if kind in ("missing", "number", "category") else pl.col(canon)
            first = both.filter(cond).select("file_row", shown).head(1).collect()
            row, value = first.row(0)
            message = _explain(kind, canon, spec, value)
            if counts[name] > 1:
                message += f" ({counts[name]} such rows in this file)"
            if _is_csv(path):
                raise DataError(str(path), message, _line(path, int(row), spec))
            raise DataError(str(path), f"row {int(row) + 1}: {message}")
        frame = both.with_columns((pl.col("file_row").cast(pl.Int64) + offset).alias("row")).filter(~drop)
        frames.append(frame.select([*mapping, "row"]))
        rows.append(n)
        offset += n
        report["source_events"] += n
    scanned = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
    return ScannedLog(scanned, spec, files, rows, report)
