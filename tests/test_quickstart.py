"""The quickstart (benchmarks/quickstart.py) writes only into its own run folder, never a tracked file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tracked_changes() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True).stdout


def test_quickstart_writes_its_runs_and_results_into_one_new_folder(tmp_path, shared_data):
    before = _tracked_changes()
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quickstart.py"), "--out", str(out), "--set",
                           f"data.data_dir={shared_data}", "train.max_steps=2", "data.max_len=10", "data.stride=10"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| hstu |" in proc.stdout and "| dfgr |" in proc.stdout
    rows = json.loads((out / "quickstart.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["hstu", "dfgr"] and all(0 < r["auc"] < 1 for r in rows)
    assert (out / "hstu" / "metrics.json").is_file() and (out / "dfgr" / "console.log").is_file()
    assert _tracked_changes() == before  # nothing in the repository changed
