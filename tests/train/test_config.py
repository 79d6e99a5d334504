"""Configs: YAML + command-line overrides, checked when loaded (keys, types, ranges, choices, model_args)."""

from __future__ import annotations

import pytest

from genrec.config import DataConfig, TrainConfig, load
from genrec.data.preprocess import PrepConfig
from genrec.data.splits import SplitConfig
from genrec.errors import ConfigError
from genrec.settings import describe


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: sasrec\nmodel_args: {d_model: 32}\ndata: {max_len: 50, split: {protocol: loo}}\n"
                    "train: {lr: 0.01}\n")
    cfg = load(path, ["train.lr=3e-4", "model_args.num_layers=3", "data.split.protocol=temporal"])
    assert cfg.train.lr == 3e-4 and cfg.data.max_len == 50 and cfg.data.split.protocol == "temporal"
    assert cfg.model_args == {"d_model": 32, "num_layers": 3}


def test_preparation_and_split_settings_are_nested_dataclasses():
    cfg = load(None, ["data.prep.label_threshold=4", "data.split.val_quantile=0.7"])
    assert cfg.data.prep == PrepConfig(label_threshold=4.0)
    assert cfg.data.split == SplitConfig(val_quantile=0.7)
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.train, TrainConfig)


def test_values_are_coerced_to_field_types():
    cfg = load(None, ["train.lr=1e-3", "train.epochs=4", "train.betas=[0.8, 0.9]", "data.stride=null"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 4 and cfg.train.betas == (0.8, 0.9) and cfg.data.stride is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.learning_rate=1"], "--set train.learning_rate: unknown field 'learning_rate' in train; known: "),
    (["train.epoch=3"], "--set train.epoch: unknown field 'epoch' in train; did you mean 'epochs'?"),
    (["data.protocol=temporal"], "--set data.protocol: unknown field 'protocol' in data; it belongs in 'split' "
                                 "(split.protocol)"),
    (["train.lr"], "--set 'train.lr': expected section.key=value, e.g. train.lr=3e-4"),
    (["train=3", "train.lr=1"], "--set train.lr=1: train is 3, not a section"),
    (["train.epochs=many"], "--set train.epochs = 'many': expected an integer >= 1"),
    (["train.epochs=2.5"], "--set train.epochs = 2.5: expected an integer >= 1"),
    (["train.epochs=0"], "--set train.epochs = 0: expected an integer >= 1"),
    (["train.max_steps=0"], "--set train.max_steps = 0: expected an integer >= 1 or null"),
    (["data.batch_size=0"], "--set data.batch_size = 0: expected an integer >= 1"),
    (["train.lr=nan"], "--set train.lr = 'nan': expected a number > 0"),
    (["train.early_stop_mode=maxx"], "--set train.early_stop_mode = 'maxx': expected one of 'max', 'min'"),
    (["train.betas=[0.9, 1.5]"], "--set train.betas[1] = 1.5: expected a number >= 0 and < 1"),
    (["train.betas=[0.9]"], "--set train.betas = [0.9]: expected a list of 2 numbers"),
    (["data.split.protocol=random"], "--set data.split.protocol = 'random': expected one of 'loo', 'temporal'"),
    (["data.split.val_quantile=0.95"], "--set data.split.val_quantile = 0.95: expected a value below "
                                       "test_quantile (0.9)"),
    (["data.prep.duplicates=keep"], "--set data.prep.duplicates = 'keep': expected one of 'drop', 'error'"),
    (["data.dataset=ml-2m"], "--set data.dataset = 'ml-2m': expected one of amazon-books, amazon-books-2014, "
                             "amazon-books-2018, kuairand-1k, kuairand-27k, kuairand-pure, kuaisar, ml-1m, ml-20m, "
                             "ml-latest-small, recflow, taobao"),
    (["data.stride=500"], "--set data.stride = 500: expected at most max_len (200)"),
    (["train.device=gpu"], "--set train.device = 'gpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["train.early_stop_metric=logloss"], "defaults: train.early_stop_mode = 'max': logloss is better when "
                                          "smaller: expected 'min'"),
    (["train.early_stop_metric=auc,auc"], "--set train.early_stop_metric = 'auc,auc': expected each task's "
                                          "metric once"),
    # one early_stop_mode for every selected metric: metrics of both directions cannot be selected on
    (["train.early_stop_metric=ndcg@10,logloss", "train.early_stop_mode=min"],
     "--set train.early_stop_metric = 'ndcg@10,logloss': logloss is better when smaller and ndcg@10 is better "
     "when larger: one early_stop_mode cannot select both"),
    (["train.early_stop_metric=auc+logloss"], "--set train.early_stop_metric = 'auc+logloss': logloss is better "
                                             "when smaller and auc is better when larger"),
    (["train.early_stop_metric=logloss/like"], "defaults: train.early_stop_mode = 'max': logloss/like is better "
                                               "when smaller: expected 'min'"),
    (["train.early_stop_metric=ndcg@10,mrr", "train.early_stop_mode=min"],
     "--set train.early_stop_mode = 'min': ndcg@10, mrr are better when larger: expected 'max'"),
    # values that used to pass the config and fail (or train nonsense) once the run folder was written
    (["train.seed=-1"], "--set train.seed = -1: expected an integer >= 0"),
    (["model_args.num_heads=3"], "--set model_args.num_heads = 3: expected a divisor of d_model (64)"),
    (["model=unigrf", "model_args.backbone=llama", "model_args.d_model=6", "model_args.num_heads=2"],
     "--set model_args.num_heads = 2: expected a divisor of d_model (6) that gives an even head size"),
    (["model_args.dropout=1"], "--set model_args.dropout = 1: expected a number >= 0 and < 1"),
    (["model=hstu", "model_args.dropout=-0.1"], "--set model_args.dropout = -0.1: expected a number >= 0 and < 1"),
    (["model_args.d_model=0"], "--set model_args.d_model = 0: expected an integer >= 1"),
    (["model=genrank", "model_args.num_layers=0"], "--set model_args.num_layers = 0: expected an integer >= 1"),
    (["model_args.num_negatives=0"], "--set model_args.num_negatives = 0: expected an integer >= 1"),
    (["model=unigrf", "model_args.num_negatives=5"], "defaults: model_args.hard_negatives = 10: expected fewer "
                                                     "than num_negatives (5)"),
    (["model=unigrf", "model_args.backbone=lama"], "--set model_args.backbone = 'lama': expected one of 'hstu', "
                                                   "'llama'"),
    (["model=hsttu"], "--set model = 'hsttu': expected one of bprmf, dcnv2, deepfm, dfgr, dien, din, gdcn, "
                      "genrank, gru4rec, hstu, narm, sasrec, sfgr, unigrf"),
    (["model=dfgr", "model_args.d_modl=8"], "--set model_args.d_modl: unknown field 'd_modl' in model_args; did "
                                            "you mean 'd_model'?"),
    (["model_args.d_model=x"], "--set model_args.d_model = 'x': expected an integer"),
    (["train.out_dir=[1"], "--set train.out_dir=[1: the value is not valid YAML"),
])
def test_a_bad_setting_is_one_message_naming_source_field_value_and_expectation(overrides, message):
    with pytest.raises(ConfigError) as err:
        load(None, overrides)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_errors_in_a_yaml_file_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {epochs: 0}\n")
    with pytest.raises(ConfigError, match=f"^{path}: train.epochs = 0: expected an integer >= 1$"):
        load(path)
    path.write_text("train: {epochs: [1\n")
    with pytest.raises(ConfigError, match=f"^{path}: not valid YAML \\(line 2: "):
        load(path)
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load(path)
    with pytest.raises(ConfigError, match="nowhere.yaml: no such config file"):
        load(tmp_path / "nowhere.yaml")


def test_every_run_setting_has_a_meaning_for_config_show():
    for cls in (DataConfig, TrainConfig):
        fields = describe(cls)
        assert all(f.doc for f in fields), [f.name for f in fields if not f.doc]
    names = [f.name for f in describe(DataConfig)]
    assert "prep.label_threshold" in names and "split.protocol" in names
