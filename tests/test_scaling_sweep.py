"""benchmarks/scaling.py end to end on a tiny planted log: JSON in the results shape, PNGs, fits, targets
computed from its rows, a rerun with ``--reuse`` that trains only the point that had not finished, and
``--finished-only`` results of a sweep cut short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--synthetic", "40,1600,80", "--seeds", "0", "--models", "dfgr", "--ladder",
        "1x4x1x8,1x8x1x8,1x8x1x16,2x8x1x16", "--epochs", "1", "--alloc-models", "dfgr,hstu",
        "--shapes", "small=1x4x1x8", "--budgets", "2e6", "--jobs", "2", "--reuse"]


def sweep(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaling.py"), *ARGS, *extra, "--runs",
                           str(tmp_path / "runs"), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.mark.slow
def test_tiny_sweep_writes_results_plots_and_resumes_without_retraining(tmp_path):
    proc = sweep(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = "synthetic-planted-40u-1600e-80i-k8"
    stem = tmp_path / "out" / f"scaling_{name}"
    blob = json.loads(stem.with_suffix(".json").read_text())
    assert {"meta", "rows", "targets", "fits", "allocation", "dfgr_vs_hstu", "planted_oracle"} <= set(blob)
    assert blob["meta"]["synthetic"] is True and "SYNTHETIC" in stem.with_suffix(".md").read_text()
    for png in ("law", "frontier", "allocation"):
        assert (tmp_path / "out" / f"scaling_{name}_{png}.png").stat().st_size > 1000

    trained = [r for r in blob["rows"] if r["study"] in ("law", "allocation")]
    assert len(trained) == 6
    law = [r for r in trained if r["study"] == "law"]
    assert len({r["train_flops"] for r in law}) == 4 and all(0 < r["auc"] < 1 for r in trained)
    # the planted model's own scores are known: every point reports its share of their AUC lift
    assert 0.5 < blob["planted_oracle"]["auc"] < 1
    for r in trained:
        assert r["auc_lift_fraction"] == pytest.approx((r["auc"] - 0.5) / (r["oracle_auc"] - 0.5))
    # isoFLOP points trained for their budget: analytic FLOPs within one step of it
    for r in (r for r in trained if r["study"] == "allocation"):
        per_step = r["train_flops_total"] / r["steps"]
        assert abs(r["train_flops_total"] - r["budget_flops"]) <= per_step / 2 + 1e-6
    checks = [r for r in blob["rows"] if r["study"] == "flop_check"]
    assert {r["model"] for r in checks} == {"dfgr", "hstu"} and all(r["counted_flops"] > 0 for r in checks)

    fits = {(f["model"], f["metric"], f["form"]): f for f in blob["fits"]}
    assert set(fits) == {("dfgr", m, f) for m in ("logloss", "auc", "gauc") for f in ("loglinear", "saturating")}
    targets = {t["name"]: t for t in blob["targets"]}
    assert targets["points"] == {**targets["points"], "value": 6, "target": 24, "met": False}
    r2 = [f["r2"] for k, f in fits.items() if k[1] == "logloss" and f["r2"] is not None]
    assert targets["fit_r2_min"]["value"] == pytest.approx(min(r2))

    # resume: one point "killed" before it finished is trained again, the others are reused untouched
    runs = tmp_path / "runs" / name
    done = sorted(runs.glob("*/*/benchmark_row.json"))
    assert len(done) == 6
    killed, kept = done[0], done[1:]
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    killed.unlink()
    again = sweep(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert killed.is_file()
    assert {p: p.stat().st_mtime_ns for p in kept} == stamps
    assert len(json.loads(stem.with_suffix(".json").read_text())["rows"]) == len(blob["rows"])

    # a sweep cut short: --finished-only trains nothing and writes what finished, saying what did not
    killed.unlink()
    partial = sweep(tmp_path, "--finished-only")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert not killed.is_file()
    blob = json.loads(stem.with_suffix(".json").read_text())
    assert len([r for r in blob["rows"] if r["study"] != "flop_check"]) == 5
    assert len(blob["meta"]["points_not_trained"]) == 1 and blob["meta"]["points_planned"] == 6
    assert "5 of 6 planned points trained" in stem.with_suffix(".md").read_text()
