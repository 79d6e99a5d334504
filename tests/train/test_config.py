"""Configs: YAML + command-line overrides, unknown keys rejected."""

from __future__ import annotations

import pytest

from genrec.config import load


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: sasrec\nmodel_args: {d_model: 32}\ndata: {max_len: 50}\ntrain: {lr: 0.01}\n")
    cfg = load(path, ["train.lr=3e-4", "model_args.num_layers=3", "data.protocol=temporal"])
    assert cfg.train.lr == 3e-4 and cfg.data.max_len == 50 and cfg.data.protocol == "temporal"
    assert cfg.model_args == {"d_model": 32, "num_layers": 3}


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown field"):
        load(None, ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="must look like"):
        load(None, ["train.lr"])


def test_values_are_coerced_to_field_types_and_bad_ones_rejected():
    cfg = load(None, ["train.lr=1e-3", "train.epochs=4", "train.betas=[0.8, 0.9]", "data.stride=null"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 4 and cfg.train.betas == (0.8, 0.9) and cfg.data.stride is None
    with pytest.raises(ValueError, match="train.epochs"):
        load(None, ["train.epochs=many"])
    with pytest.raises(ValueError, match="train.epochs"):
        load(None, ["train.epochs=2.5"])
