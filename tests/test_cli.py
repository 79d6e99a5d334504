"""The command line as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from genrec.cli import main


def test_data_stats_reports_published_counts(shared_data, capsys):
    assert main(["data", "stats", "ml-latest-small", "--data-dir", str(shared_data)]) == 0
    out = capsys.readouterr().out
    assert "users: 610" in out and "items: 9,724" in out and "events: 100,836" in out
    assert "requests:" in out and "label rate:" in out


def test_missing_dataset_offline_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "genrec.cli", "data", "stats", "ml-20m", "--data-dir",
                           str(tmp_path), "--no-download"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "data error" in proc.stderr and "ml-20m" in proc.stderr and "Traceback" not in proc.stderr


def test_train_then_eval_from_checkpoint(tmp_path, shared_data, capsys):
    out = tmp_path / "run"
    args = [f"data.data_dir={shared_data}", "data.max_len=20", "model_args.d_model=16", "train.epochs=1",
            "train.progress=false", "train.tensorboard=false"]
    assert main(["train", "--out-dir", str(out), "--set", *args]) == 0
    assert "auc" in capsys.readouterr().out
    assert (out / "best" / "model.safetensors").is_file() and (out / "train_log.csv").is_file()
    assert main(["eval", "--checkpoint", str(out), "--split", "valid"]) == 0
    assert "valid metrics" in capsys.readouterr().out
