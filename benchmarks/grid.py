"""Benchmark grids: one training run per subprocess, resumable across an interrupted grid.

Each run is ``genrec train`` in its own process (no state shared between runs), writes its folder
under ``out`` and, once finished, a ``benchmark_row.json`` there, so ``reuse`` skips finished runs
and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def train_run(config: str | Path, overrides: list[str], out: Path, label: str, reuse: bool,
              row_of) -> dict:
    """Train ``config`` with ``overrides`` into ``out``; ``row_of(metrics, extras)`` builds the result
    row from ``metrics.json`` and ``{"wall_s", "train_events_per_s"}``. A failed run raises with its
    stderr tail."""
    done = out / "benchmark_row.json"
    if reuse and done.is_file():
        return json.loads(done.read_text())
    # with reuse, an interrupted run continues from its last checkpoint (under changed train.* settings
    # if given, e.g. fewer epochs); otherwise every run starts afresh
    unfinished = reuse and (out / "run.json").is_file() and not (out / "metrics.json").is_file()
    cmd = [sys.executable, "-m", "genrec.cli", "train", "--config", str(config),
           "--resume" if unfinished else "--overwrite", "--out-dir", str(out), "--set", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "train_log.csv") as f:
        speeds = [float(r["events_per_s"]) for r in csv.DictReader(f)]
    row = row_of(metrics, {"wall_s": wall, "train_events_per_s": statistics.median(speeds)})
    done.write_text(json.dumps(row))
    return row


def _family(metric: str) -> str:
    """Which task a metric measures: retrieval (hr@k, ndcg@k, mrr) or a ranking signal ("" the label)."""
    if metric.startswith(("hr@", "ndcg@", "mrr")):
        return "retrieval"
    return metric.partition("/")[2]


def tested(metrics: dict) -> dict:
    """A run's test metrics and best epoch. Under per-task selection (``early_stop_metric: ndcg@10,auc``)
    each task's metrics come from that task's own best weights, and each task's best epoch is given as
    ``best_epoch/<metric>``; ``best_epoch`` is the first task's."""
    out = dict(metrics["test"]) | {"best_epoch": metrics["best_epoch"]}
    for name, task in metrics.get("tasks", {}).items():
        out |= {k: v for k, v in task["test"].items() if _family(k) == _family(name)}
        out[f"best_epoch/{name}"] = task["best_epoch"]
    return out


def add_grid_arguments(parser: argparse.ArgumentParser, runs: str, out: str) -> None:
    """The options every grid script takes: data, seeds, parallelism, device, folders, overrides."""
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", default=runs)
    parser.add_argument("--out", default=out)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every run")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs under --runs")
