"""A write-ahead journal of accepted ``/events`` appends, so a crash (SIGKILL, OOM kill, power cut)
loses nothing the service answered 200 to.

The Parquet snapshot (:func:`~genrec.serve.store.save_histories`) is written at start, after every
``--snapshot-every`` appends and at a graceful shutdown; every append in between is one JSON line in
a journal, written, flushed and fsync'd before the store changes and the reply goes out.

Generations: a snapshot of generation G holds every append journaled before G. Taking it starts
journal G (``<state-file>.journal.G``) first, on the scoring thread, at one point between two
batches; the snapshot is then written on a background thread while new appends go to journal G,
and once it is on disk the journals before G are deleted. So at any moment the snapshot on disk
(generation S) and the journals S, S + 1, … hold every append: a crash while snapshot G is being
written leaves snapshot G − 1 (or older) with journals G − 1 and G, which a start replays in
order; a journal older than the snapshot is already in it and is not replayed. Generation 0 is a
start without a snapshot (or one written outside the service): its journals start at 1. A missing
generation among the ones to replay stops the start with an error instead of losing its appends.

On start the service loads the snapshot, replays the journals on top of it, and writes a new
snapshot of the next generation (before it takes requests).

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
from pathlib import Path

from genrec.serve.store import replace_durably

log = logging.getLogger("genrec.serve")


def journal_path(state_file: Path, generation: int) -> Path:
    """``runs/x/users.parquet``, 3 -> ``runs/x/users.parquet.journal.3``."""
    state_file = Path(state_file)
    return state_file.with_name(f"{state_file.name}.journal.{generation}")


def journal_generations(state_file: Path) -> dict[int, Path]:
    """The journals beside ``state_file`` by the generation their first line names (a file cut before
    its first line was complete has none and holds no append: it is left out)."""
    state_file = Path(state_file)
    found: dict[int, Path] = {}
    for path in sorted(state_file.parent.glob(f"{state_file.name}.journal*")):
        if path.suffix == ".tmp":
            continue
        with open(path, "rb") as f:
            first = f.readline()
        if not first.endswith(b"\n"):
            continue
        try:
            generation = json.loads(first)["generation"]
        except (ValueError, TypeError, KeyError):
            generation = None
        if not isinstance(generation, int):
            raise ValueError(f"{path}: the first line is not the journal's header {{\"generation\": N}}")
        if generation in found:
            raise ValueError(f"{path} and {found[generation]} are both journals of generation {generation}")
        found[generation] = path
    return found


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
        """Start an empty journal of ``generation`` at ``path`` (atomically: a crash leaves no journal or
        one with its header)."""
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


def replayable(state_file: Path, snapshot_generation: int) -> tuple[int, list[tuple[str, list[dict]]]]:
    """The appends journaled after the snapshot of ``snapshot_generation``, in order (the journals of
    that generation and later ones), and the latest journal generation there is (or the snapshot's)."""
    journals = journal_generations(state_file)
    live = sorted(g for g in journals if g >= snapshot_generation)
    first = max(snapshot_generation, 1)  # generation 0 never has a journal
    if live != list(range(first, first + len(live))):
        missing = sorted(set(range(first, live[-1] + 1)) - set(live))
        raise ValueError(f"{state_file}: the snapshot is of generation {snapshot_generation} and journals "
                         f"{live} follow it, but generation(s) {missing} are missing: their appends would be lost")
    appends = []
    for generation in live:
        appends += read_journal(journals[generation])[1]
    return max([snapshot_generation, *live]), appends


def prune(state_file: Path, below: int) -> None:
    """Delete the journals older than generation ``below`` (its snapshot holds them). A failure is
    logged: an old journal left behind is never replayed onto the newer snapshot."""
    for generation, path in journal_generations(state_file).items():
        if generation < below:
            try:
                path.unlink()
            except OSError as err:
                log.warning("%s: could not delete the journal of generation %d (%r); it is not replayed onto "
                            "the snapshot of generation %d that holds it", path, generation, err, below)
