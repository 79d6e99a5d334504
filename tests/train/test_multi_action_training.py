"""Training on several action signals: an event log from the run config, MovieLens with rating-derived
signals and tags, per-task validation metrics and early stopping on one task or their mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from genrec.config import load
from genrec.data.synth import SynthConfig, generate
from genrec.errors import ConfigError
from genrec.train.trainer import Trainer

SMALL = ["model_args.d_model=16", "model_args.num_layers=1", "data.max_len=30", "data.batch_size=32",
         "train.epochs=2", "train.max_steps=4", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def synthetic_log(tmp_path_factory):
    out = tmp_path_factory.mktemp("log")
    generate(SynthConfig(users=60, events=6000, items=300, signals=("click", "like"), seed=1), out,
             log=lambda *_: None)
    return out


def event_log_config(path, tmp_path, *extra):
    values = {"model": "hstu", "data": {"split": {"protocol": "temporal"}, "event_log": {
        "path": str(path), "request": "request_id", "signals": ["click", "like"]}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    return load(tmp_path / "run.yaml", [*SMALL, f"train.out_dir={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize("model,stop", [("hstu", "auc/like"), ("din", "auc/mean")])
def test_train_on_an_event_log_from_the_run_config(synthetic_log, tmp_path, model, stop):
    args = ["model_args.action_encoding=sum"] if model == "hstu" else ["model_args={d_model: 16, history: 10}"]
    cfg = event_log_config(synthetic_log, tmp_path, f"model={model}", f"train.early_stop_metric={stop}", *args)
    result = Trainer(cfg, log=lambda *_: None).fit()
    assert {"auc/click", "auc/like", "gauc/like", "logloss/click", "auc/mean"} <= set(result["test"])
    assert result["test"]["auc"] == result["test"]["auc/click"]
    assert all(stop in epoch for epoch in result["history"])


def test_each_signal_selected_on_its_own_auc(synthetic_log, tmp_path):
    cfg = event_log_config(synthetic_log, tmp_path, "train.early_stop_metric=auc/click,auc/like",
                           "model_args.action_encoding=sum")
    result = Trainer(cfg, log=lambda *_: None).fit()
    assert set(result["best_epochs"]) == {"auc/click", "auc/like"} and result["best_epoch"] in (0, 1)
    like = result["tasks"]["auc/like"]
    assert like["weights"] == "best/auc_like"
    assert (tmp_path / "run" / "best" / "auc_like" / "model.safetensors").is_file()
    assert like["best_value"] == max(h["auc/like"] for h in result["history"])
    assert like["valid"]["auc/like"] == like["best_value"]  # re-validated at its own best weights


def test_unknown_early_stop_task_names_the_reported_ones(synthetic_log, tmp_path):
    cfg = event_log_config(synthetic_log, tmp_path, "train.early_stop_metric=auc/share")
    with pytest.raises(ConfigError, match=r"auc/share.*expected one of.*auc/like"):
        Trainer(cfg, log=lambda *_: None)


def test_movielens_with_rating_signals_and_tags(shared_data, tmp_path):
    cfg = load(None, ["model=dfgr", f"data.data_dir={shared_data}", "data.split.protocol=temporal",
                      "data.signals=[like, five_star, tagged]", "model_args.action_encoding=sum",
                      f"train.out_dir={tmp_path}", *SMALL])
    trainer = Trainer(cfg, log=lambda *_: None)
    assert trainer.info.signal_names == ["like", "five_star", "tagged"]
    assert trainer.seq.num_users == 610 and len(trainer.seq.items) == 100_836 + 1_775  # ratings + tag events
    result = trainer.fit()
    assert {"auc/like", "auc/five_star", "auc/tagged", "gauc/five_star"} <= set(result["test"])


def test_the_readme_event_log_config_is_a_valid_run_config():
    import re
    from pathlib import Path

    from genrec.config import from_dict
    from genrec.data.eventlog import EventLogSpec

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```yaml\n(model: dfgr\nmodel_args: \{action_encoding: sum\}.*?)```", readme, re.S).group(1)
    cfg = from_dict(yaml.safe_load(block))  # checked as a run config
    spec = EventLogSpec.from_dict(cfg.data.event_log)
    assert spec.signal_names == ["click", "like", "follow", "watch"] and spec.signals[3].kind == "graded"
    assert spec.time_unit == "ms" and cfg.train.early_stop_metric == "auc/mean"


def test_the_multi_action_config_runs_unchanged_on_kuairand_files(synthetic_log, tmp_path):
    import polars as pl

    from tests.data.test_public_logs import KUAIRAND_HEADER

    log = pl.read_parquet(synthetic_log / "*.parquet")
    columns = KUAIRAND_HEADER.split(",")
    kuairand = pl.DataFrame({c: pl.Series([0] * log.height) for c in columns}).with_columns(
        user_id=log["user_id"], video_id=log["item_id"], time_ms=log["timestamp"] * 1000,
        is_click=log["click"].cast(pl.Int64), is_like=log["like"].cast(pl.Int64))
    data = tmp_path / "root" / "kuairand-pure" / "KuaiRand-Pure" / "data"
    data.mkdir(parents=True)
    kuairand.select(columns).write_csv(data / "log_standard_4_08_to_4_21_pure.csv")
    cfg = load(Path(__file__).resolve().parents[2] / "configs" / "multi_action.yaml",
               ["data.dataset=kuairand-pure", f"data.data_dir={tmp_path / 'root'}", "data.allow_download=false",
                "data.signals=[click, like]", f"train.out_dir={tmp_path / 'run'}", *SMALL])
    result = Trainer(cfg, log=lambda *_: None).fit()
    assert {"auc/click", "auc/like", "auc/mean"} <= set(result["test"])
