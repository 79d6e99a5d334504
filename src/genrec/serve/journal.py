"""A write-ahead journal of accepted ``/events`` appends, so a crash (SIGKILL, OOM kill, power cut)
loses nothing the service answered 200 to.

The Parquet snapshot (:meth:`~genrec.serve.store.UserStore.save`) is written at start, after every
``--snapshot-every`` appends and at a graceful shutdown; every append in between is one JSON line in
``<state-file>.journal``, written, flushed and fsync'd before the store changes and the reply goes
out. Each snapshot starts an empty journal of the next generation, so the journal holds at most
``--snapshot-every`` appends. On start the service loads the snapshot, replays the journal on top of
it, writes a new snapshot and starts an empty journal.

Which journal belongs to which snapshot: the journal's first line is ``{"generation": G}`` and a
snapshot records the generation it was written at. Events of generation G came after snapshot G,
so they are replayed on a snapshot of generation G; a journal older than the snapshot (a crash
between writing the snapshot and starting the new journal) is already in it and is not replayed.

A crash in the middle of a write leaves a torn last line. Its request was never answered (the reply
waits for the fsync), so it is dropped with a warning; a bad line anywhere else is corruption and
stops the start with an error rather than silently losing what follows it.

Format (raw ids, like the snapshot, so a journal outlives a model)::

    {"generation": 3}
    {"user": "1", "events": [{"item": "318", "action": 5.0, "time": 1700000000}]}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from genrec.serve.store import replace_durably

log = logging.getLogger("genrec.serve")


def journal_path(state_file: Path) -> Path:
    """``runs/x/users.parquet`` -> ``runs/x/users.parquet.journal``."""
    return Path(state_file).with_name(Path(state_file).name + ".journal")


def read_journal(path: Path) -> tuple[int, list[tuple[str, list[dict]]]]:
    """The journal's generation and its appends ``(user, [{item, action, time}])`` in order; (−1, [])
    without a journal. A torn last line is dropped with a warning; any other bad line raises."""
    if not path.is_file():
        return -1, []
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError
            if number == len(lines):  # no newline after it: the write was cut short
                log.warning("%s: line %d is a torn write (%d bytes, no newline), left out: a crash cut it short "
                            "before its request was answered", path, number, len(line))
                continue
            raise ValueError(f"{path}: line {number} is not a JSON object; the journal is corrupt") from None
    if not records:
        return -1, []
    generation = records[0].get("generation") if isinstance(records[0], dict) else None
    if not isinstance(generation, int):
        raise ValueError(f"{path}: the first line is not the journal's header {{\"generation\": N}}")
    return generation, [(r["user"], r["events"]) for r in records[1:]]


class Journal:
    """The open journal of one generation; :meth:`append` returns once the line is on disk.

    Written through the file descriptor (no Python buffer), so a failed append can be cut back out:
    a line whose write or fsync failed was answered with an error, and left in the file it would be
    replayed on the next start (an append the client was told failed, or a torn line that makes every
    later line unreadable). If even the cut fails, the journal refuses every later append."""

    def __init__(self, path: Path, generation: int):
        """Start an empty journal of ``generation`` at ``path`` (atomically replacing the old one)."""
        self.path, self.generation = Path(path), generation
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"generation": generation}) + "\n", encoding="utf-8")
        replace_durably(tmp, self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)  # held open until the next snapshot
        self.broken: str | None = None  # why appends are refused, once a failed one could not be cut out
        self.appends = 0  # appends on disk in this journal

    def append(self, user: str, events: list[dict]) -> None:
        """One append, durable when this returns: one line, written and fsync'd; on failure the file is
        cut back to where it was and the error raised."""
        if self.broken:
            raise OSError(f"{self.path}: the journal takes no appends: {self.broken}")
        line = json.dumps({"user": user, "events": events}, separators=(",", ":"), allow_nan=False)
        data, start = memoryview(line.encode() + b"\n"), os.lseek(self.fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self.fd, data):]
            os.fsync(self.fd)
        except BaseException as err:
            self._cut(start, err)
            raise
        self.appends += 1

    def _cut(self, size: int, cause: BaseException) -> None:
        """Truncate the journal back to ``size`` bytes after a failed append."""
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as err:
            self.broken = f"a failed append ({cause!r}) could not be cut out ({err!r})"
            log.error("%s: %s; appends are refused until a restart", self.path, self.broken)

    def close(self) -> None:
        os.close(self.fd)


def replayable(path: Path, snapshot_generation: int) -> Iterator[tuple[str, list[dict]]]:
    """The appends of ``path`` made after the snapshot of ``snapshot_generation``: all of a journal
    of that generation, none of an older one (the snapshot already holds them)."""
    generation, appends = read_journal(path)
    if generation > snapshot_generation:
        raise ValueError(f"{path}: journal generation {generation} is newer than the snapshot's "
                         f"{snapshot_generation}: the snapshot is not the one this journal follows")
    if generation == snapshot_generation:
        yield from appends
