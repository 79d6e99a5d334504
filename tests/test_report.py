"""benchmarks/report.py's summary over seeds: means and sample stds, missing values left out."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
report = pytest.importorskip("report")


def test_summary_leaves_out_values_a_run_does_not_have():
    """GAUC is None under leave-one-out (one target per user) and a metric can be NaN or absent; the
    summary averages the values there are and drops a metric no run has."""
    rows = [{"model": "a", "auc": 0.6, "gauc": None, "hr@10": 0.1},
            {"model": "a", "auc": 0.8, "gauc": None, "hr@10": math.nan},
            {"model": "a", "auc": 0.7, "gauc": None},
            {"model": "b", "auc": 0.5, "gauc": 0.4, "hr@10": 0.3}]
    a, b = report.summary(rows, ["model"], ["auc", "gauc", "hr@10"])
    assert a["runs"] == 3 and a["auc"] == pytest.approx(0.7) and a["auc_std"] == pytest.approx(0.1)
    assert "gauc" not in a and a["hr@10"] == 0.1 and a["hr@10_std"] == 0.0
    assert (b["gauc"], b["hr@10"]) == (0.4, 0.3)
