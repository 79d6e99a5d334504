"""Durability of ``/events``: every accepted append is journaled (fsync'd) before its reply, so a crash
that skips the shutdown snapshot, or comes while a snapshot is being written in the background, loses
nothing; a start replays each journal once, drops a torn last line with a warning and refuses a
corrupt journal or a missing generation."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from genrec.serve import engine as engine_module
from genrec.serve.engine import Catalogue, Engine, EventsJob
from genrec.serve.journal import journal_generations, journal_path, read_journal
from genrec.serve.store import History, UserStore
from tests.models.test_generative import INFO, make_model


def _engine() -> Engine:
    """A fresh service process's engine: dataset users "1" .. "9" (3 events each)."""
    catalogue = Catalogue([str(i) for i in range(1, INFO.num_items + 1)], INFO.rating_values, 3.0, 0,
                          [str(u) for u in range(10)])

    def seed(user: str) -> History | None:
        u = catalogue.user_index.get(user)
        return None if u is None else History.build([u + 1, u + 2, u + 3], [4, 4, 4], [1.0] * 3, [10, 20, 30], 0, u)

    return Engine(make_model("hstu", torch.float32), catalogue, UserStore(1 << 20, seed), torch.device("cpu"), 32)


def _events(first_time: int, n: int = 2) -> History:
    return History.build(np.arange(n) % 40 + 1, np.full(n, 4), np.ones(n), first_time + np.arange(n), 0)


def _held(engine: Engine, user: str) -> list[tuple]:
    h = engine.store.get(user).history
    return list(zip(h.items.tolist(), h.actions.tolist(), h.timestamps.tolist(), strict=True))


def test_accepted_appends_survive_a_crash_that_skips_the_shutdown_snapshot(tmp_path):
    state = tmp_path / "users.parquet"
    crashed = _engine()
    crashed.restore(state)
    appends = [EventsJob("new", _events(1_000)), EventsJob("1", _events(2_000)), EventsJob("new", _events(3_000))]
    appends += [EventsJob("2", _events(4_000 + 10 * k, 1)) for k in range(40)]  # past max_len: windowed
    assert all(isinstance(r, dict) for r in crashed.append_events(appends))
    # the crash: no snapshot, no close (SIGKILL runs no shutdown hook; a real kill is in test_service)
    restarted = _engine()
    assert restarted.restore(state) == len(appends)
    for user in ("new", "1", "2"):
        assert _held(restarted, user) == _held(crashed, user)
        np.testing.assert_array_equal(restarted.store.get(user).history.seen, crashed.store.get(user).history.seen)
    assert restarted.store.get("1").history.user == 1 and restarted.store.get("new").history.user is None

    again = _engine()  # the restart wrote a snapshot and started a new journal: nothing is replayed twice
    assert again.restore(state) == 0 and _held(again, "new") == _held(crashed, "new")


def test_a_snapshot_every_n_appends_starts_a_new_journal_and_a_crash_after_it_loses_nothing(tmp_path):
    """With ``snapshot_every = 3`` the batch whose appends bring the journal to 3 or more ends with a
    new, empty journal of the next generation and its snapshot (refused appends do not count); the
    older journal is deleted once the snapshot is on disk; a crash after more appends replays only
    those, onto the periodic snapshot."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state, snapshot_every=3)
    generation = engine.journal.generation
    engine.append_events([EventsJob("new", _events(1_000)), EventsJob("1", _events(2_000))])
    refused = engine.append_events([EventsJob("1", _events(0))])  # before the user's last event: 422, not journaled
    assert not isinstance(refused[0], dict) and read_journal(journal_path(state, generation)) == (generation, [
        ("new", engine._raw_events(_events(1_000))), ("1", engine._raw_events(_events(2_000)))])
    engine.append_events([EventsJob("2", _events(3_000)), EventsJob("new", _events(4_000))])
    engine.wait_for_snapshot()
    assert read_journal(journal_path(state, generation + 1)) == (generation + 1, [])
    assert list(journal_generations(state)) == [generation + 1]  # the snapshot holds the older one
    assert engine.metrics.snapshots.labels("periodic")._value.get() == 1
    engine.append_events([EventsJob("3", _events(5_000))])
    restarted = _engine()  # the crash: no shutdown snapshot
    assert restarted.restore(state) == 1
    for user in ("new", "1", "2", "3"):
        assert _held(restarted, user) == _held(engine, user)
    with pytest.raises(ValueError, match="snapshot_every"):
        _engine().restore(state, snapshot_every=-1)


def test_requests_go_on_while_a_periodic_snapshot_is_written_and_a_crash_during_it_loses_nothing(tmp_path,
                                                                                              monkeypatch):
    """The periodic snapshot is written on the writer thread: batches are answered while it is held
    up (their appends go to the new journal), a crash during it restarts from the older snapshot and
    replays both journals, and the next snapshot waits for it."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state, snapshot_every=2)
    first = engine.journal.generation
    release, writing = threading.Event(), threading.Event()
    save = engine_module.save_histories

    def held_up(*args):
        writing.set()
        assert release.wait(30)
        save(*args)

    monkeypatch.setattr(engine_module, "save_histories", held_up)
    engine.append_events([EventsJob("new", _events(1_000)), EventsJob("1", _events(2_000))])  # the snapshot starts
    assert writing.wait(30) and not engine.writing.done()
    during = engine.append_events([EventsJob("new", _events(3_000)), EventsJob("2", _events(4_000)),
                                   EventsJob("3", _events(5_000))])  # due again, but one is being written
    assert all(isinstance(r, dict) for r in during) and not engine.writing.done()
    assert sorted(journal_generations(state)) == [first, first + 1]  # both kept until the snapshot is on disk
    assert len(read_journal(journal_path(state, first + 1))[1]) == 3
    (tmp_path / "crash").mkdir()  # a crash now: the files on disk (the older snapshot, both journals) copied
    for path in [state, *journal_generations(state).values()]:
        (tmp_path / "crash" / path.name).write_bytes(path.read_bytes())
    release.set()
    engine.wait_for_snapshot()
    assert list(journal_generations(state)) == [first + 1]
    assert engine.metrics.snapshots.labels("periodic")._value.get() == 1
    monkeypatch.setattr(engine_module, "save_histories", save)
    restarted = _engine()
    assert restarted.restore(tmp_path / "crash" / state.name) == 5  # 2 from journal `first`, 3 from the next
    for user in ("new", "1", "2", "3"):
        assert _held(restarted, user) == _held(engine, user)
    engine.append_events([EventsJob("4", _events(6_000))])  # the snapshot that was due runs now
    engine.wait_for_snapshot()
    assert engine.metrics.snapshots.labels("periodic")._value.get() == 2


def test_a_failed_periodic_snapshot_leaves_the_batch_answered_and_is_tried_again(tmp_path, monkeypatch):
    """The snapshot fails (on the writer thread) after the batch's appends are on disk: the appends
    are answered, the failure counted, both journals kept, and the snapshot tried again after another
    ``snapshot_every`` appends; a crash at any point loses nothing."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state, snapshot_every=2)
    save = engine_module.save_histories

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine_module, "save_histories", disk_full)
    results = engine.append_events([EventsJob("new", _events(1_000)), EventsJob("1", _events(2_000))])
    assert all(isinstance(r, dict) for r in results)
    engine.append_events([EventsJob("2", _events(3_000))])  # 1 append in the new journal: the retry waits for 2
    engine.wait_for_snapshot()
    assert engine.metrics.snapshot_failures._value.get() == 1 and len(journal_generations(state)) == 2
    (tmp_path / "crash").mkdir()  # a crash now: the files on disk copied
    for path in [state, *journal_generations(state).values()]:
        (tmp_path / "crash" / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(engine_module, "save_histories", save)
    crashed = _engine()
    assert crashed.restore(tmp_path / "crash" / state.name) == 3
    engine.append_events([EventsJob("3", _events(4_000))])  # the retry: 2 appends in the new journal
    engine.wait_for_snapshot()
    assert read_journal(journal_path(state, engine.journal.generation))[1] == []
    assert engine.metrics.snapshots.labels("periodic")._value.get() == 1 and len(journal_generations(state)) == 1
    restarted = _engine()
    assert restarted.restore(state) == 0
    for user in ("new", "1", "2", "3"):
        assert _held(restarted, user) == _held(engine, user)
        assert user == "3" or _held(crashed, user) == _held(engine, user)


def test_a_journal_that_cannot_start_leaves_the_current_one_taking_appends(tmp_path, monkeypatch):
    """The next generation's journal cannot be created (disk full): no snapshot is written, appends go
    on into the current journal (answered 200), and nothing answered is lost across a crash."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state, snapshot_every=1)
    generation = engine.journal.generation
    journal = engine_module.Journal

    def no_journal(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine_module, "Journal", no_journal)
    assert isinstance(engine.append_events([EventsJob("new", _events(1_000))])[0], dict)  # then the switch fails
    assert isinstance(engine.append_events([EventsJob("1", _events(2_000))])[0], dict)
    assert engine.journal.generation == generation and engine.metrics.snapshot_failures._value.get() == 2
    monkeypatch.setattr(engine_module, "Journal", journal)
    assert isinstance(engine.append_events([EventsJob("2", _events(3_000))])[0], dict)  # its snapshot succeeds
    engine.wait_for_snapshot()
    assert engine.journal.generation == generation + 1
    restarted = _engine()  # a crash
    assert restarted.restore(state) == 0
    for user in ("new", "1", "2"):
        assert _held(restarted, user) == _held(engine, user)


def test_a_missing_journal_generation_stops_the_start(tmp_path):
    """The journals to replay must be every generation from the snapshot's on: one missing would lose
    its appends silently, so the start is refused, naming it."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state, snapshot_every=1)
    engine.append_events([EventsJob("new", _events(1_000))])
    engine.wait_for_snapshot()
    snapshot = state.read_bytes()
    engine.append_events([EventsJob("1", _events(2_000))])
    engine.wait_for_snapshot()
    generations = sorted(journal_generations(state))
    state.write_bytes(snapshot)  # back to the older snapshot, whose journal is gone
    with pytest.raises(ValueError, match=rf"generation\(s\) \[{generations[0] - 1}\] are missing"):
        _engine().restore(state)


def test_a_journal_the_snapshot_already_holds_is_not_replayed(tmp_path, monkeypatch):
    """A crash after the snapshot is on disk but before the older journal is deleted: that journal's
    appends are in the snapshot (its generation is newer), so they are not appended a second time."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state)
    engine.append_events([EventsJob("new", _events(1_000))])
    monkeypatch.setattr(engine_module, "prune", lambda *args, **kwargs: None)  # the crash comes before it
    engine.snapshot("periodic")
    assert len(journal_generations(state)) == 2
    restarted = _engine()
    assert restarted.restore(state) == 0
    assert _held(restarted, "new") == _held(engine, "new")


@pytest.mark.parametrize("background", [False, True])
def test_a_corrupt_journal_header_beside_the_state_fails_neither_snapshot_nor_shutdown(tmp_path, caplog,
                                                                                       background):
    """A file named as a journal whose first line is no header stops the pruning of the older journals
    after a snapshot: the snapshot is on disk and counted as written, the cause is logged, and the
    next start names that file (it cannot know what the file holds) until it is removed."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state)
    engine.append_events([EventsJob("new", _events(1_000))])
    bad = state.with_name(state.name + ".journal.copy")
    bad.write_text("not a header\n")
    with caplog.at_level(logging.WARNING, logger="genrec.serve"):
        engine.snapshot("periodic", background=background)
        engine.wait_for_snapshot()
    assert engine.metrics.snapshots.labels("periodic")._value.get() == 1
    assert engine.metrics.snapshot_failures._value.get() == 0
    assert any(str(bad) in r.getMessage() and "not deleted" in r.getMessage() for r in caplog.records)
    engine.close()
    with pytest.raises(ValueError, match="journal.copy: the first line is not the journal's header"):
        _engine().restore(state)
    bad.unlink()
    restarted = _engine()
    assert restarted.restore(state) == 0  # the older journal left behind is held by the snapshot
    assert _held(restarted, "new") == _held(engine, "new")


def test_a_torn_last_journal_line_is_dropped_with_a_warning(tmp_path, caplog):
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state)
    engine.append_events([EventsJob("new", _events(1_000)), EventsJob("3", _events(2_000))])
    with open(journal_path(state, engine.journal.generation), "ab") as journal:  # a write cut short: no newline
        journal.write(b'{"user":"new","events":[{"item":"5","act')
    with caplog.at_level(logging.WARNING, logger="genrec.serve"):
        restarted = _engine()
        assert restarted.restore(state) == 2
    assert "line 4 is a torn write" in caplog.text
    assert _held(restarted, "new") == _held(engine, "new") and _held(restarted, "3") == _held(engine, "3")


def test_a_bad_line_before_the_last_is_corruption_and_stops_the_start(tmp_path):
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state)
    engine.append_events([EventsJob("new", _events(1_000))])
    path = journal_path(state, engine.journal.generation)
    path.write_bytes(path.read_bytes().replace(b'"user"', b'"us\xffer"', 1) + b'{"user":"1","events":[]}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object; the journal is corrupt"):
        _engine().restore(state)


@pytest.mark.parametrize("failure", ["fsync", "short write"])
def test_a_failed_append_is_cut_out_of_the_journal_so_a_restart_does_not_replay_it(tmp_path, monkeypatch, failure):
    """The client got an error for it: replayed, it would appear after a restart (and a retry of it
    would then fail the time order and stop the start); left torn, it would hide every later line. A
    cut that fails too leaves the journal refusing appends (not tested: it needs a failing disk)."""
    from genrec.serve import journal

    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state)
    real_write, real_fsync = journal.os.write, journal.os.fsync

    def half_then_full_disk(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    failed = []

    def failing_fsync(fd):  # once: the cut's own fsync goes through
        if not failed:
            failed.append(fd)
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(journal.os, "write" if failure == "short write" else "fsync",
                        half_then_full_disk if failure == "short write" else failing_fsync)
    before = journal_path(state, engine.journal.generation).read_bytes()
    [result] = engine.append_events([EventsJob("new", _events(1_000))])
    assert not isinstance(result, dict) and engine.store.get("new") is None  # refused, nothing stored
    assert journal_path(state, engine.journal.generation).read_bytes() == before
    monkeypatch.setattr(journal.os, "write", real_write)
    monkeypatch.setattr(journal.os, "fsync", real_fsync)
    assert isinstance(engine.append_events([EventsJob("new", _events(1_000))])[0], dict)  # the retry
    restarted = _engine()
    assert restarted.restore(state) == 1 and _held(restarted, "new") == _held(engine, "new")
