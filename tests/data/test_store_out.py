"""The store's output folder: ``build`` only ever replaces an earlier store (never a folder of the
user's files), and replaces it with renames, so that a kill never leaves part of a store behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from genrec.data import store
from genrec.data.errors import DataError
from genrec.data.eventlog import EventLogSpec, SignalSpec
from genrec.data.store import StoreConfig, build, load

QUIET = dict(cfg=StoreConfig(min_user_events=1), log=lambda *_: None)


def write_log(path: Path, users: int = 2) -> EventLogSpec:
    n = 3 * users
    pl.DataFrame({"user_id": np.repeat(np.arange(users), 3), "item_id": np.arange(n) % 4, "timestamp": np.arange(n),
                  "click": np.arange(n) % 2}).write_parquet(path)
    return EventLogSpec(str(path), (SignalSpec("click", "click"),))


def test_build_refuses_an_out_folder_of_other_files_and_leaves_it_alone(tmp_path):
    spec = write_log(tmp_path / "events.parquet")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=f"{tmp_path}: exists and is not an empty folder or a genrec event store"):
        build(spec, tmp_path, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet", "notes.txt"]
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"author": "me"}))  # a meta.json that is not a store's
    with pytest.raises(DataError, match="refusing to replace it"):
        build(spec, foreign, **QUIET)
    assert (foreign / "meta.json").is_file()
    with pytest.raises(DataError, match="refusing"):
        build(spec, tmp_path / "notes.txt", **QUIET)


def test_build_writes_into_an_empty_folder_and_replaces_an_earlier_store(tmp_path):
    spec = write_log(tmp_path / "events.parquet")
    (tmp_path / "out").mkdir()
    assert len(load(build(spec, tmp_path / "out", **QUIET)).user_raw) == 2
    spec = write_log(tmp_path / "events.parquet", users=3)
    assert len(load(build(spec, tmp_path / "out", **QUIET)).user_raw) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet", "out"]  # no temporary left


def test_a_kill_while_replacing_a_store_never_leaves_part_of_one(tmp_path, monkeypatch):
    spec = write_log(tmp_path / "events.parquet")
    build(spec, tmp_path / "out", **QUIET)
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):  # deletes one column of a store, then the process dies
        columns = sorted(Path(path).rglob("*.bin")) if any(Path(path).rglob("meta.json")) else []
        if columns and not killed_rmtree.fired:
            killed_rmtree.fired = True
            columns[0].unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    killed_rmtree.fired = False
    monkeypatch.setattr(store.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        build(write_log(tmp_path / "events.parquet", users=3), tmp_path / "out", **QUIET)
    assert killed_rmtree.fired
    assert len(load(tmp_path / "out").items) == 9  # the new store, whole (every column file there)
