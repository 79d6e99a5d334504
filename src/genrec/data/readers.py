"""Readers for the publishers' own formats, returning one flat table of rating events.

Every reader returns :class:`RawData`: an events table ``(user, item, rating, timestamp)`` with
raw ids as strings, and an items table ``(item, title, genres)``. Input is read strictly; each of
these raises :class:`DataError` naming the file and line (nothing is dropped here; policies about
duplicates and short users live in :mod:`genrec.data.preprocess`):

* a line with the wrong number of fields, a blank line, a non-numeric field, an integer that does not
  fit in 64 bits, a NaN or infinite rating, a rating out of the format's range;
* a timestamp before 1995 (these logs start in 1995-1996: a line cut short inside its timestamp
  reads as 1970), in the future, or one that looks like milliseconds (the formats count seconds);
* text that is not valid in the file's encoding, and a latin-1 file (ML-1M) that is in fact UTF-8
  (every byte is valid latin-1, so it would read as garbled titles);
* an archive that is not a zip or is truncated.

Formats (GroupLens README files; Amazon "ratings only" csv from McAuley's Amazon review data):

* MovieLens-1M ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, latin-1, ratings 1..5;
  ``movies.dat``: ``MovieID::Title::Genres`` with genres ``|``-separated; ``users.dat`` optional.
* MovieLens-20M / ml-latest(-small) ``ratings.csv``: header ``userId,movieId,rating,timestamp``,
  utf-8, half-star ratings 0.5..5; ``movies.csv``: ``movieId,title,genres`` (csv quoting).
* Amazon ratings-only csv: no header, ``user,item,rating,timestamp``, ratings 1..5.
"""

from __future__ import annotations

import datetime
import io
import re
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from genrec.data.errors import DataError

_INT = re.compile(r"^\s*-?\d+\s*$")
_FLOAT = re.compile(r"^\s*-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


@dataclass
class RawData:
    """What a reader returns: events in file order and item metadata, raw ids kept as strings."""

    events: pa.Table  # user: string, item: string, rating: float32, timestamp: int64
    items: pa.Table  # item: string, title: string, genres: list<string>
    source: str  # where it was read from, for messages
    users_without_events: int = 0  # users listed in a users file who rated nothing (ML-1M users.dat)


class Source:
    """A dataset location: a folder or the publisher's zip. Files are found by base name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(str(self.path), "no such file or folder")
        self._zip = None
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as err:
                raise DataError(str(self.path), f"not a readable zip archive ({err}); a truncated or corrupt "
                                "download? Delete it to download it again") from None

    def _member(self, name: str) -> str | None:
        assert self._zip is not None
        for member in self._zip.namelist():
            if member.rsplit("/", 1)[-1] == name:
                return member
        return None

    def has(self, name: str) -> bool:
        if self._zip is not None:
            return self._member(name) is not None
        return self._find(name) is not None

    def _find(self, name: str) -> Path | None:
        for candidate in (self.path / name, *sorted(self.path.glob(f"*/{name}"))):
            if candidate.is_file():
                return candidate
        return None

    def label(self, name: str) -> str:
        if self._zip is not None:
            return f"{self.path}!{self._member(name)}"
        found = self._find(name)
        return str(found if found is not None else self.path / name)

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            member = self._member(name)
            if member is None:
                raise DataError(str(self.path), f"archive has no file named {name!r}")
            try:
                return self._zip.read(member)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
                raise DataError(f"{self.path}!{member}", f"cannot be read from the archive ({err}); a truncated "
                                "or corrupt download? Delete it to download it again") from None
        found = self._find(name)
        if found is None:
            raise DataError(str(self.path / name), f"missing; expected {name} in {self.path}")
        return found.read_bytes()


def _decode(data: bytes, label: str, encoding: str) -> str:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(label, f"byte 0x{data[err.start]:02x} is not valid {encoding}", line) from None
    if encoding == "latin-1":
        _reject_utf8(data, label)
    return text


def _reject_utf8(data: bytes, label: str) -> None:
    """Every byte string is valid latin-1, so a UTF-8 file would be read as garbled text. Non-ASCII
    text that is valid UTF-8 almost never occurs in real latin-1 (it needs pairs like ``Ã©``)."""
    first = re.search(rb"[\x80-\xff]", data)
    if first is None:
        return
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return  # genuine latin-1
    line = data.count(b"\n", 0, first.start()) + 1
    start = data.rfind(b"\n", 0, first.start()) + 1
    shown = data[start: data.find(b"\n", first.start()) if b"\n" in data[first.start():] else len(data)]
    raise DataError(label, f"is UTF-8 ({shown.decode('utf-8')!r}) but this format is latin-1; convert it with "
                    "iconv -f utf-8 -t latin1", line)


def parse_table(
    data: bytes,
    label: str,
    columns: list[str],
    *,
    separator: str,
    encoding: str,
    header: list[str] | None,
    quoting: bool,
) -> pa.Table:
    """Parse delimited text into a table of string columns, one row per line, strictly.

    Line numbers in errors are physical lines of the file (1-based, header included). A blank
    line or a line with another number of fields is an error, never a silently skipped row.
    """
    text = _decode(data, label, encoding)
    first_line = 1
    if header is not None:
        head, _, text = text.partition("\n")
        got = head.strip().lstrip("\ufeff").split(separator)
        if got != header:
            raise DataError(
                label, f"header is {head.strip()!r}, expected {separator.join(header)!r}", 1
            )
        first_line = 2
    if len(separator) > 1:  # pyarrow splits on one byte; the unit separator never occurs in these files
        if "\x1f" in text:
            line = text[: text.index("\x1f")].count("\n") + first_line
            raise DataError(label, "contains the control character 0x1f", line)
        text = text.replace(separator, "\x1f")
        separator = "\x1f"
    if text and not text.endswith("\n"):
        text += "\n"

    rejected: list[DataError] = []  # pyarrow swallows exceptions raised inside the handler

    def reject(row: pacsv.InvalidRow) -> str:
        line = None if row.number is None else row.number + first_line - 1
        sep = "'::'" if separator == "\x1f" else repr(separator)
        shown = row.text.replace("\x1f", "::")
        rejected.append(DataError(
            label,
            f"expected {row.expected_columns} {sep}-separated fields, got {row.actual_columns}: {shown!r}",
            line,
        ))
        return "error"

    try:
        table = pacsv.read_csv(
            io.BytesIO(text.encode("utf-8")),
            read_options=pacsv.ReadOptions(column_names=columns, use_threads=False),
            parse_options=pacsv.ParseOptions(
                delimiter=separator,
                quote_char='"' if quoting else False,
                ignore_empty_lines=False,
                invalid_row_handler=reject,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns}, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as err:
        if rejected:
            raise rejected[0] from None
        raise DataError(label, f"unreadable: {err}") from None
    table = table.replace_schema_metadata({"first_line": str(first_line)})
    return table


def _line_of(table: pa.Table, row: int) -> int:
    return int(table.schema.metadata[b"first_line"]) + row


def to_number(table: pa.Table, column: str, label: str, kind: str) -> pa.Array:
    """Cast a string column to int64 or a finite float32; on failure report the first bad line and value."""
    col = table.column(column).combine_chunks()
    target = pa.int64() if kind == "int" else pa.float32()
    try:
        values = pc.cast(pc.utf8_trim_whitespace(col), target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pattern = _INT if kind == "int" else _FLOAT
        for row, value in enumerate(col.to_pylist()):
            if not pattern.match(value):
                raise DataError(
                    label, f"field {column!r} is {value!r}, expected an {'integer' if kind == 'int' else 'number'}",
                    _line_of(table, row),
                ) from None
            if kind == "int" and not -(2**63) <= int(value) < 2**63:
                raise DataError(label, f"field {column!r} is {value.strip()}, which does not fit in a 64-bit "
                                "integer", _line_of(table, row)) from None
        raise
    if kind == "float":
        bad = pc.invert(pc.is_finite(values))
        if pc.any(bad).as_py():
            row = pc.index(bad, True).as_py()
            raise DataError(label, f"field {column!r} is {col[row].as_py().strip()!r}, expected a finite number",
                            _line_of(table, row))
    return values


EARLIEST = int(datetime.datetime(1995, 1, 1, tzinfo=datetime.UTC).timestamp())  # before the first rating logs


def _date(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")


def check_timestamps(table: pa.Table, values: pa.Array, column: str, label: str, earliest: int = EARLIEST,
                     latest: float | None = None) -> None:
    """Seconds since 1970 between ``earliest`` and now (+1 day): a value before is a line cut short or
    another unit; one in the millisecond range of that span says so."""
    latest = time.time() + 86_400 if latest is None else latest
    bad = pc.or_(pc.less(values, earliest), pc.greater(values, int(latest)))
    if not pc.any(bad).as_py():
        return
    row = pc.index(bad, True).as_py()
    value = values[row].as_py()
    if earliest * 1000 <= value <= latest * 1000:
        why = f"looks like milliseconds ({_date(value / 1000)} in ms); expected seconds since 1970"
    elif value < earliest:
        why = f"is before {_date(earliest)} ({_date(value)}): a line cut short, or not seconds since 1970?"
    else:
        why = f"is in the future ({_date(value) if value < 2**37 else 'year > 6000'}); expected seconds since 1970"
    raise DataError(label, f"{column} {value} {why}", _line_of(table, row))


def check_range(table: pa.Table, values: pa.Array, column: str, label: str, low: float, high: float) -> None:
    bad = pc.or_(pc.less(values, low), pc.greater(values, high))
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise DataError(
            label, f"{column} {values[row].as_py()} outside [{low}, {high}]", _line_of(table, row)
        )


def _events(table: pa.Table, label: str, user: str, item: str, rating: str, ts: str,
            rating_range: tuple[float, float]) -> pa.Table:
    ratings = to_number(table, rating, label, "float")
    check_range(table, ratings, rating, label, *rating_range)
    timestamps = to_number(table, ts, label, "int")
    check_timestamps(table, timestamps, ts, label)
    for column in (user, item):
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table.column(column))), 0)
        if pc.any(empty).as_py():
            raise DataError(label, f"field {column!r} is empty", _line_of(table, pc.index(empty, True).as_py()))
    return pa.table({
        "user": pc.utf8_trim_whitespace(table.column(user)),
        "item": pc.utf8_trim_whitespace(table.column(item)),
        "rating": ratings,
        "timestamp": timestamps,
    })


def _items(ids: pa.ChunkedArray, titles: pa.ChunkedArray, genres: pa.ChunkedArray) -> pa.Table:
    return pa.table({
        "item": pc.utf8_trim_whitespace(ids),
        "title": titles,
        "genres": pc.split_pattern(genres, "|"),
    })


def read_movielens_1m(path: str | Path) -> RawData:
    """MovieLens-1M (``ratings.dat``, ``movies.dat``, optional ``users.dat``), folder or ``ml-1m.zip``."""
    src = Source(path)
    label = src.label("ratings.dat")
    ratings = parse_table(src.read("ratings.dat"), label, ["user", "item", "rating", "timestamp"],
                          separator="::", encoding="latin-1", header=None, quoting=False)
    for column in ("user", "item"):  # MovieLens ids are integers: reject anything else with its line
        to_number(ratings, column, label, "int")
    events = _events(ratings, label, "user", "item", "rating", "timestamp", (1, 5))
    movies = parse_table(src.read("movies.dat"), src.label("movies.dat"), ["item", "title", "genres"],
                         separator="::", encoding="latin-1", header=None, quoting=False)
    without = 0
    if src.has("users.dat"):
        users = parse_table(src.read("users.dat"), src.label("users.dat"),
                            ["user", "gender", "age", "occupation", "zip"],
                            separator="::", encoding="latin-1", header=None, quoting=False)
        listed = pc.utf8_trim_whitespace(users.column("user"))
        without = len(listed) - pc.sum(pc.is_in(listed, value_set=pc.unique(events.column("user")))).as_py()
    return RawData(events, _items(movies.column("item"), movies.column("title"), movies.column("genres")),
                   str(src.path), users_without_events=without)


def read_movielens_csv(path: str | Path) -> RawData:
    """MovieLens-20M / ml-latest / ml-latest-small (``ratings.csv``, ``movies.csv``), folder or zip."""
    src = Source(path)
    label = src.label("ratings.csv")
    header = ["userId", "movieId", "rating", "timestamp"]
    ratings = parse_table(src.read("ratings.csv"), label, header,
                          separator=",", encoding="utf-8", header=header, quoting=False)
    for column in ("userId", "movieId"):  # MovieLens ids are integers: reject anything else with its line
        to_number(ratings, column, label, "int")
    events = _events(ratings, label, "userId", "movieId", "rating", "timestamp", (0.5, 5))
    movie_header = ["movieId", "title", "genres"]
    movies = parse_table(src.read("movies.csv"), src.label("movies.csv"), movie_header,
                         separator=",", encoding="utf-8", header=movie_header, quoting=True)
    return RawData(events, _items(movies.column("movieId"), movies.column("title"), movies.column("genres")),
                   str(src.path))


def read_amazon_ratings(path: str | Path) -> RawData:
    """Amazon ratings-only csv (``user,item,rating,timestamp``, no header): a ``.csv`` file or a folder
    holding exactly one. Amazon has no item metadata in this format, so items carry no genres."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.csv"))
        if len(found) != 1:
            raise DataError(str(p), f"expected one ratings .csv file, found {len(found)}")
        p = found[0]
    if not p.is_file():
        raise DataError(str(p), "no such file")
    table = parse_table(p.read_bytes(), str(p), ["user", "item", "rating", "timestamp"],
                        separator=",", encoding="utf-8", header=None, quoting=False)
    events = _events(table, str(p), "user", "item", "rating", "timestamp", (1, 5))
    items = pc.unique(events.column("item"))
    return RawData(events, pa.table({
        "item": items, "title": pa.array([""] * len(items)),
        "genres": pa.array([[] for _ in range(len(items))], type=pa.list_(pa.string())),
    }), str(p))


def read_movielens_tags(path: str | Path) -> pa.Table:
    """ml-latest(-small) / ml-20m ``tags.csv`` (header ``userId,movieId,tag,timestamp``, csv quoting):
    one row per tag application, ``(user, item, timestamp)`` with raw ids as strings; the tag text is
    not kept. Read strictly like the ratings."""
    src = Source(path)
    label = src.label("tags.csv")
    header = ["userId", "movieId", "tag", "timestamp"]
    table = parse_table(src.read("tags.csv"), label, header, separator=",", encoding="utf-8", header=header,
                        quoting=True)
    for column in ("userId", "movieId"):
        to_number(table, column, label, "int")
    timestamps = to_number(table, "timestamp", label, "int")
    check_range(table, timestamps, "timestamp", label, 0, 2**62)
    return pa.table({"user": pc.utf8_trim_whitespace(table.column("userId")),
                     "item": pc.utf8_trim_whitespace(table.column("movieId")), "timestamp": timestamps})
