"""What a periodic snapshot of the service's user store costs, on synthetic users (labelled as such):
the scoring thread's pause (the switch to the next journal and the copy-on-write view of the store), the
background write of the Parquet file, a start's load of it, and ``/events`` batches' latency
(journaled, fsync'd, no KV caches) while the file is written against the same batches with no
snapshot running. CPU-only work: the store lives on the host.

    python benchmarks/serve_snapshot.py     # -> results/serve_snapshot_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import report
from genrec.data.info import DatasetInfo
from genrec.models import build_model
from genrec.serve.engine import Catalogue, Engine, EventsJob
from genrec.serve.store import History, UserStore

ROOT = Path(__file__).resolve().parent.parent
NUM_ITEMS = 20_000
ACTIONS = [1.0, 2.0, 3.0, 4.0, 5.0]


def synthetic_store(users: int, events: int, seed: int = 0) -> UserStore:
    """``users`` synthetic users of ``events`` events each (a few seen items beyond them)."""
    rng = np.random.default_rng(seed)
    store = UserStore(0)
    for u in range(users):
        times = 1_600_000_000 + np.cumsum(rng.integers(0, 3, events) * rng.integers(1, 5000, events))
        items = rng.integers(1, NUM_ITEMS + 1, events)
        seen = np.union1d(items, rng.integers(1, NUM_ITEMS + 1, 8))
        store.set_history(f"u{u}", History.build(items, rng.integers(0, 5, events), rng.integers(0, 2, events),
                                                 times, 0, None, seen))
    return store


def engine_over(store: UserStore) -> Engine:
    """An engine with a small HSTU (appends without a cache are lazy: no model work is timed)."""
    torch.manual_seed(0)
    info = DatasetInfo(NUM_ITEMS, len(ACTIONS), 1, np.zeros((NUM_ITEMS + 1, 1), np.float32), ACTIONS)
    model = build_model("hstu", {"d_model": 16, "num_layers": 1, "num_heads": 1, "dropout": 0.0}, info, 256)
    catalogue = Catalogue([str(i) for i in range(1, NUM_ITEMS + 1)], ACTIONS, 3.0, 0)
    return Engine(model, catalogue, store, torch.device("cpu"), max_history=1 << 20, model_name="hstu")


def append_batches(engine: Engine, first: int, until, batch: int = 8) -> list[float]:
    """Batches of ``batch`` one-event appends to existing users, timed (ms), until ``until()``."""
    times, k = [], first
    while not until():
        jobs = [EventsJob(f"u{(k + j) % len(engine.store)}", History.build([1 + (k + j) % NUM_ITEMS], [3], [1.0],
                                                                             [2_000_000_000 + k], 0))
                for j in range(batch)]
        start = time.perf_counter()
        out = engine.append_events(jobs)
        times.append((time.perf_counter() - start) * 1e3)
        assert all(isinstance(r, dict) for r in out), out
        k += batch
    return times


def row(users: int, events: int, folder: Path) -> dict:
    store = synthetic_store(users, events)
    engine = engine_over(store)
    state = folder / f"users_{users}.parquet"
    engine.restore(state)  # the start's snapshot (synchronous)
    idle_until = time.perf_counter() + 2.0
    idle = append_batches(engine, 0, lambda: time.perf_counter() > idle_until)
    view_ms = []
    for _ in range(5):  # the view's part of the pause alone (the rest: the journals' switch, the writer's start)
        start = time.perf_counter()
        engine.store.close_view(engine.store.open_view())
        view_ms.append((time.perf_counter() - start) * 1e3)
    start = time.perf_counter()
    engine.snapshot("periodic", background=True)
    switch_ms = (time.perf_counter() - start) * 1e3
    during = append_batches(engine, 10**6, lambda: engine.writing.done())
    write_s = time.perf_counter() - start
    engine.wait_for_snapshot()
    rows = pq.read_metadata(state).num_rows
    fresh = UserStore(0)
    start = time.perf_counter()
    fresh.load(state, engine.catalogue.item_index, engine.catalogue.action_index, 0)
    load_s = time.perf_counter() - start
    engine.close()

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {"dataset": "synthetic", "users": users, "events_per_user": events, "snapshot_rows": rows,
            "switch_ms": switch_ms, "view_ms": statistics.median(view_ms), "write_s": write_s, "load_s": load_s,
            "append_batches_idle": len(idle), "append_p50_ms_idle": pct(idle, 50), "append_p99_ms_idle": pct(idle, 99),
            "append_batches_during_write": len(during), "append_p50_ms_during_write": pct(during, 50),
            "append_p99_ms_during_write": pct(during, 99),
            "append_max_ms_during_write": max(during) if during else float("nan"),
            "append_mean_ms_idle": statistics.fmean(idle)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="10000,100000", help="comma-separated store sizes")
    parser.add_argument("--events", type=int, default=200, help="events per user")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_snapshot_cpu"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for users in (int(u) for u in args.users.split(",")):
            rows.append(row(users, args.events, Path(folder)))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    columns = ["users", "events_per_user", "snapshot_rows", "switch_ms", "view_ms", "write_s", "load_s",
               "append_p50_ms_idle", "append_p99_ms_idle", "append_p50_ms_during_write", "append_p99_ms_during_write",
               "append_max_ms_during_write", "append_batches_during_write"]
    note = ("Synthetic users (no quality claim). switch_ms: the scoring thread's pause to start a periodic snapshot "
            "(one sample); view_ms: the copy-on-write view of the store within it (median of 5); write_s: its "
            "background write (the pause a snapshot on the scoring thread would cost); append_*: "
            "batches of 8 journaled one-event appends, idle vs while the snapshot is written.\n\n")
    report.write(args.out, rows, note + report.markdown_table(rows, columns), report.meta(device="cpu"), targets=[])
    return 0


if __name__ == "__main__":
    sys.exit(main())
