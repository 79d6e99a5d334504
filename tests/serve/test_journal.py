"""Durability of ``/events``: every accepted append is journaled (fsync'd) before its reply, so a crash
that skips the shutdown snapshot loses nothing; a start replays the journal once, drops a torn last
line with a warning and refuses a corrupt journal."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from genrec.serve.engine import Catalogue, Engine, EventsJob
from genrec.serve.journal import journal_path, read_journal
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


def test_a_snapshot_every_n_appends_empties_the_journal_and_a_crash_after_it_loses_nothing(tmp_path):
    """With ``snapshot_every = 3`` the batch whose appends bring the journal to 3 or more ends with a
    snapshot and an empty journal of the next generation (refused appends do not count); a crash
    after more appends replays only those, onto the periodic snapshot."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state, snapshot_every=3)
    generation = engine.journal.generation
    engine.append_events([EventsJob("new", _events(1_000)), EventsJob("1", _events(2_000))])
    refused = engine.append_events([EventsJob("1", _events(0))])  # before the user's last event: 422, not journaled
    assert not isinstance(refused[0], dict) and read_journal(journal_path(state)) == (generation, [
        ("new", engine._raw_events(_events(1_000))), ("1", engine._raw_events(_events(2_000)))])
    engine.append_events([EventsJob("2", _events(3_000)), EventsJob("new", _events(4_000))])
    assert read_journal(journal_path(state)) == (generation + 1, [])
    assert engine.metrics.snapshots.labels("periodic")._value.get() == 1
    engine.append_events([EventsJob("3", _events(5_000))])
    restarted = _engine()  # the crash: no shutdown snapshot
    assert restarted.restore(state) == 1
    for user in ("new", "1", "2", "3"):
        assert _held(restarted, user) == _held(engine, user)
    with pytest.raises(ValueError, match="snapshot_every"):
        _engine().restore(state, snapshot_every=-1)


def test_a_failed_periodic_snapshot_leaves_the_batch_answered_and_is_tried_again(tmp_path, monkeypatch):
    """The snapshot fails after the batch's appends are on disk: the appends are answered, the failure
    counted, and the snapshot tried again after another ``snapshot_every`` appends."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state, snapshot_every=2)
    save = engine.save

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine, "save", disk_full)
    results = engine.append_events([EventsJob("new", _events(1_000)), EventsJob("1", _events(2_000))])
    assert all(isinstance(r, dict) for r in results)
    engine.append_events([EventsJob("2", _events(3_000))])  # 3 appends: the retry waits for 4
    assert engine.metrics.snapshot_failures._value.get() == 1
    monkeypatch.setattr(engine, "save", save)
    engine.append_events([EventsJob("3", _events(4_000))])
    assert read_journal(journal_path(state))[1] == [] and engine.metrics.snapshots.labels("periodic")._value.get() == 1
    restarted = _engine()
    assert restarted.restore(state) == 0
    for user in ("new", "1", "2", "3"):
        assert _held(restarted, user) == _held(engine, user)


def test_a_snapshot_whose_journal_cannot_start_stops_appends_until_a_snapshot_succeeds(tmp_path, monkeypatch):
    """Snapshot G + 1 is written but its journal is not: appends to the old journal (generation G)
    would not be replayed onto it after a crash, so they are refused (not answered 200) until the
    next batch's snapshot starts a journal; nothing answered is lost across a crash."""
    import genrec.serve.engine as engine_module

    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state, snapshot_every=1)
    journal = engine_module.Journal

    def no_journal(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine_module, "Journal", no_journal)
    assert isinstance(engine.append_events([EventsJob("new", _events(1_000))])[0], dict)  # then the snapshot fails
    refused = engine.append_events([EventsJob("1", _events(2_000))])[0]
    assert not isinstance(refused, dict) and refused.status == 500 and "takes no appends" in refused.message
    monkeypatch.setattr(engine_module, "Journal", journal)
    engine.append_events([EventsJob("2", _events(3_000))])  # refused too, and its batch's snapshot succeeds
    assert isinstance(engine.append_events([EventsJob("3", _events(4_000))])[0], dict)
    restarted = _engine()  # a crash
    restarted.restore(state)
    assert _held(restarted, "new") == _held(engine, "new") and _held(restarted, "3") == _held(engine, "3")
    assert _held(restarted, "1") == _held(engine, "1") == [(2, 4, 10), (3, 4, 20), (4, 4, 30)]  # seed only


def test_a_save_that_fails_after_its_rename_stops_appends_until_a_snapshot_succeeds(tmp_path, monkeypatch):
    """The snapshot is in place but its save raised (the folder's fsync after the rename failed): the
    old journal is not replayed onto it after a crash, so it must take no appends."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state, snapshot_every=1)
    save = engine.save

    def renamed_then_failed(*args):
        save(*args)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(engine, "save", renamed_then_failed)
    assert isinstance(engine.append_events([EventsJob("new", _events(1_000))])[0], dict)
    refused = engine.append_events([EventsJob("1", _events(2_000))])[0]  # and the batch's retry fails again
    assert not isinstance(refused, dict) and "takes no appends" in refused.message
    monkeypatch.setattr(engine, "save", save)
    engine.append_events([EventsJob("2", _events(3_000))])  # refused; its batch's snapshot succeeds
    assert isinstance(engine.append_events([EventsJob("3", _events(4_000))])[0], dict)
    restarted = _engine()  # a crash
    restarted.restore(state)
    for user in ("new", "1", "2", "3"):
        assert _held(restarted, user) == _held(engine, user)


def test_a_journal_the_snapshot_already_holds_is_not_replayed(tmp_path):
    """A crash between writing the snapshot and starting its new journal: the old journal's appends
    are in the snapshot (its generation is newer), so they are not appended a second time."""
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state)
    engine.append_events([EventsJob("new", _events(1_000))])
    engine.save(state, engine.journal.generation + 1)  # the snapshot of a shutdown, then the crash
    restarted = _engine()
    assert restarted.restore(state) == 0
    assert _held(restarted, "new") == _held(engine, "new")


def test_a_torn_last_journal_line_is_dropped_with_a_warning(tmp_path, caplog):
    state = tmp_path / "users.parquet"
    engine = _engine()
    engine.restore(state)
    engine.append_events([EventsJob("new", _events(1_000)), EventsJob("3", _events(2_000))])
    with open(journal_path(state), "ab") as journal:  # a write cut short: half a line, no newline
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
    path = journal_path(state)
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
    before = journal_path(state).read_bytes()
    [result] = engine.append_events([EventsJob("new", _events(1_000))])
    assert not isinstance(result, dict) and engine.store.get("new") is None  # refused, nothing stored
    assert journal_path(state).read_bytes() == before
    monkeypatch.setattr(journal.os, "write", real_write)
    monkeypatch.setattr(journal.os, "fsync", real_fsync)
    assert isinstance(engine.append_events([EventsJob("new", _events(1_000))])[0], dict)  # the retry
    restarted = _engine()
    assert restarted.restore(state) == 1 and _held(restarted, "new") == _held(engine, "new")
