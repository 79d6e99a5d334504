"""The command line as a user runs it."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import genrec
from genrec.cli import main
from tests.conftest import write_ml1m


def test_data_stats_reports_published_counts(shared_data, capsys):
    assert main(["data", "stats", "ml-latest-small", "--data-dir", str(shared_data)]) == 0
    out = capsys.readouterr().out
    assert "users: 610" in out and "items: 9,724" in out and "events: 100,836" in out
    assert "requests:" in out and "label rate:" in out


def test_missing_dataset_offline_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "genrec.cli", "data", "stats", "ml-20m", "--data-dir",
                           str(tmp_path), "--no-download"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("genrec: error: ") and "ml-20m" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_train_then_eval_from_checkpoint(tmp_path, shared_data, capsys):
    out = tmp_path / "run"
    args = [f"data.data_dir={shared_data}", "data.max_len=20", "model_args.d_model=16", "train.epochs=1",
            "train.progress=false", "train.tensorboard=false"]
    assert main(["train", "--out-dir", str(out), "--set", *args]) == 0
    assert "auc" in capsys.readouterr().out
    assert (out / "best" / "model.safetensors").is_file() and (out / "train_log.csv").is_file()
    assert main(["eval", "--checkpoint", str(out), "--split", "valid"]) == 0
    assert "valid metrics" in capsys.readouterr().out
    assert main(["recommend", "--checkpoint", str(out), "--user", "7", "--k", "4", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # SASRec retrieves and ranks
    assert len(recs) == 4 and all(0.0 < r["p_like"] < 1.0 for r in recs)


def test_unigrf_trains_mines_and_recommends(tmp_path, shared_data, capsys):
    out = tmp_path / "unigrf"
    args = [f"data.data_dir={shared_data}", "data.max_len=20", "model=unigrf", "model_args.backbone=llama",
            "model_args.d_model=16", "model_args.favourite_threshold=0.5", "train.epochs=2", "train.patience=5",
            "train.early_stop_metric=auc+ndcg@10", "train.progress=false", "train.tensorboard=false"]
    assert main(["train", "--out-dir", str(out), "--set", *args]) == 0
    assert "hr@10" in capsys.readouterr().out
    with open(out / "val_log.csv") as f:
        epochs = list(csv.DictReader(f))
    assert [float(e["mined_users"]) for e in epochs] == [0.0, 610.0]  # mining starts after the first epoch
    with open(out / "train_log.csv") as f:
        steps = list(csv.DictReader(f))
    assert all(float(s["w_retrieval"]) + float(s["w_ranking"]) == pytest.approx(2.0) for s in steps)

    assert main(["recommend", "--checkpoint", str(out), "--user", "1", "--k", "5", "--json"]) == 0
    printed = capsys.readouterr().out
    recs = json.loads(printed.strip().splitlines()[-1])
    assert len(recs) == 5 and "Toy Story (1995)" not in printed  # user 1 rated Toy Story: left out
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    assert all(0.0 < r["p_like"] < 1.0 and r["title"] for r in recs)
    assert main(["recommend", "--checkpoint", str(out), "--user", "1", "--k", "3", "--include-seen"]) == 0
    assert main(["recommend", "--checkpoint", str(out), "--user", "nobody"]) == 2
    assert "user 'nobody' is not in the dataset" in capsys.readouterr().err


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_ml1m_from_small(root: Path, shared_data: Path, users: int = 15) -> Path:
    """MovieLens-1M's published format (``::`` files, whole-star ratings, latin-1) under ``root``,
    written from the first ``users`` users of the real ml-latest-small ratings."""
    with zipfile.ZipFile(shared_data / "ml-latest-small" / "ml-latest-small.zip") as z:
        ratings = list(csv.reader(io.TextIOWrapper(z.open("ml-latest-small/ratings.csv"), "utf-8")))[1:]
        movies = list(csv.reader(io.TextIOWrapper(z.open("ml-latest-small/movies.csv"), "utf-8")))[1:]
    kept = [r for r in ratings if int(r[0]) <= users]
    lines = "".join(f"{u}::{i}::{math.ceil(float(x))}::{t}\n" for u, i, x, t in kept)
    titles = "".join(f"{i}::{title}::{genres}\n" for i, title, genres in movies)
    latin1 = titles.encode("latin-1", "replace").decode("latin-1")  # ML-1M files are latin-1
    return write_ml1m(root / "ml-1m" / "ml-1m", ratings=lines, movies=latin1, users=None)


def test_unigrf_config_runs_unchanged_on_ml1m_files(tmp_path, shared_data, capsys):
    """configs/unigrf.yaml on MovieLens-1M's published format; only dataset, folder and length of
    training are set."""
    write_ml1m_from_small(tmp_path, shared_data)
    out = tmp_path / "run"
    config = CONFIGS / "unigrf.yaml"
    assert main(["train", "--config", str(config), "--out-dir", str(out), "--set", "data.dataset=ml-1m",
                 f"data.data_dir={tmp_path}", "train.epochs=2", "train.device=cpu"]) == 0
    assert "hr@10" in capsys.readouterr().out
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["mined_users"] for h in history] == [0.0, 15.0]



PAPER_CONFIGS = sorted((CONFIGS / "paper").glob("*.yaml"))


def test_paper_configs_exist_for_each_published_setting():
    assert {p.name for p in PAPER_CONFIGS} >= {"unigrf-hstu_ml-1m.yaml", "unigrf-hstu_ml-20m.yaml",
                                               "hstu-retrieval_ml-1m.yaml"}


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_trains_one_step_on_ml1m_files(config, tmp_path, shared_data):
    """Each configs/paper/*.yaml, as published, takes one optimizer step and is evaluated on ML-1M-format
    files of 4 users; only the dataset (ML-20M's recipe runs on the ML-1M files), the folder, a 32-event
    window (for speed), the step limit and the device are set, and the run records every other value as
    the YAML gives it."""
    from genrec.config import load

    write_ml1m_from_small(tmp_path, shared_data, users=4)
    out = tmp_path / "run"
    overrides = ["data.dataset=ml-1m", f"data.data_dir={tmp_path}", "data.max_len=32", "train.max_steps=1",
                 "train.device=cpu", "train.progress=false", "train.tensorboard=false"]
    assert main(["train", "--config", str(config), "--out-dir", str(out), "--set", *overrides]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 1 and history[0]["ndcg@10"] >= 0
    published = load(config).to_dict()
    ran = yaml.safe_load((out / "config.yaml").read_text())
    for section in ("model", "model_args"):
        assert ran[section] == published[section]
    for key in ("batch_size", "split", "prep"):
        assert ran["data"][key] == published["data"][key]
    for key in ("epochs", "lr", "weight_decay", "warmup_steps", "patience", "early_stop_metric"):
        assert ran["train"][key] == published["train"][key]


def test_synth_then_prepare_an_event_log(tmp_path, capsys):
    log = tmp_path / "log"
    assert main(["data", "synth", "--users", "50", "--events", "2000", "--signals", "click,like",
                 "--out", str(log)]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    spec = tmp_path / "log.yaml"
    spec.write_text(f"path: {log}\nuser: user_id\nitem: item_id\ntimestamp: timestamp\nrequest: request_id\n"
                    "signals: [click, like]\n")
    assert main(["data", "prepare", "--log", str(spec), "--out", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "users: 50" in out and "events: 2,000" in out and "signal rates: click" in out


def test_prepare_a_bad_event_log_exits_2_naming_the_file(tmp_path):
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp,click\n1,2,3,1\n1,3,x,0\n")
    spec = tmp_path / "log.yaml"
    spec.write_text(f"path: {tmp_path / 'log.csv'}\nsignals: [click]\n")
    proc = subprocess.run([sys.executable, "-m", "genrec.cli", "data", "prepare", "--log", str(spec), "--out",
                           str(tmp_path / "store")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "log.csv:3: column 'timestamp' is 'x'" in proc.stderr


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"genrec {genrec.__version__}\n"


def test_config_show_prints_every_field_with_default_and_meaning(capsys):
    from genrec.config import SHARED_MODEL_FIELDS
    from genrec.models import MODELS
    from genrec.settings import describe

    assert main(["config", "show", "dfgr"]) == 0
    out = capsys.readouterr().out
    assert "  d_model: 64  # an integer >= 1; width of the embeddings and blocks" in out
    assert '  split.protocol: "loo"  # one of \'loo\', \'temporal\'; ' in out
    assert "  epochs: 30  # an integer >= 1; " in out
    for name, (_, cfg) in MODELS.items():  # every model's every field has a meaning
        assert all(f.doc for f in describe(cfg, fallback=SHARED_MODEL_FIELDS)), name
    assert main(["config", "show", "dfgrr"]) == 2
    assert "model 'dfgrr' is unknown; expected one of" in capsys.readouterr().err


def test_the_readme_commands_parse_as_written():
    """Every ``genrec ...`` line in the README's code blocks is a valid command line (arguments and
    options exist), so the README cannot name a flag that is gone."""
    import shlex

    from genrec.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("genrec ")]
    assert len(lines) >= 5
    for line in lines:
        try:
            build_parser().parse_args(shlex.split(line)[1:])
        except SystemExit as done:  # --version prints and exits 0; a parse error exits 2
            assert done.code == 0, line


@pytest.mark.parametrize("value,message", [("-1", "-1 is negative"), ("x", "'x' is not an integer")])
def test_serve_snapshot_every_takes_a_non_negative_integer(value, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--checkpoint", "nowhere", "--snapshot-every", value])
    assert stop.value.code == 2 and f"--snapshot-every: {message}" in capsys.readouterr().err
