"""Synthetic logs: labelled synthetic, Zipf items, request structure, heavy-tailed lengths, and signals
drawn from the planted latent model that ``latent.npz`` describes."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from genrec.data.synth import LatentModel, SynthConfig, generate, signal_names

CFG = SynthConfig(users=300, events=30_000, items=2_000, signals=("click", "like", "follow"), seed=3,
                  part_events=8_000)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = generate(CFG, out, log=lambda *_: None)
    return out, summary, pl.read_parquet(out / "*.parquet")


def test_every_file_is_labelled_synthetic(log):
    out, summary, _ = log
    assert summary["synthetic"] is True and "never a quality claim" in summary["note"]
    assert json.loads((out / "synthetic.json").read_text())["synthetic"] is True
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) > 1
    for part in parts:
        assert pq.read_schema(part).metadata[b"synthetic"] == b"true"


def test_sizes_and_heavy_tailed_history_lengths(log):
    _, _, frame = log
    assert frame.height == CFG.events and frame["user_id"].n_unique() == CFG.users
    lengths = frame.group_by("user_id").len()["len"].to_numpy()
    assert lengths.min() >= CFG.min_length
    assert lengths.max() > 5 * np.median(lengths)


def test_items_follow_a_zipf_popularity(log):
    _, _, frame = log
    counts = np.sort(frame.group_by("item_id").len()["len"].to_numpy())[::-1]
    top = counts[: CFG.num_items // 100].sum() / CFG.events  # the top 1 % of items
    assert top > 0.3


def test_requests_share_user_and_time_and_never_repeat_an_item(log):
    _, _, frame = log
    per_request = frame.group_by("request_id").agg(pl.col("user_id").n_unique(), pl.col("timestamp").n_unique(),
                                                   pl.len(), pl.col("item_id").n_unique().alias("items"))
    assert (per_request["user_id"] == 1).all() and (per_request["timestamp"] == 1).all()
    assert (per_request["items"] == per_request["len"]).all()
    assert abs(per_request["len"].mean() - CFG.request_size) < 0.5


def test_signals_are_drawn_from_the_saved_latent_model(log):
    out, summary, frame = log
    model = LatentModel.load(out / "latent.npz")
    probs = model.probabilities(frame["user_id"].to_numpy(), frame["item_id"].to_numpy())  # [N, S]
    for s, name in enumerate(CFG.signals):
        labels = frame[name].to_numpy()
        assert abs(labels.mean() - probs[:, s].mean()) < 0.01  # calibrated: the labels came from these P
        assert roc_auc_score(labels, probs[:, s]) > 0.65  # and they depend on the latent affinity
        assert summary["signal_rates"][name] == pytest.approx(labels.mean())


def test_same_seed_same_log(tmp_path, log):
    _, _, frame = log
    generate(CFG, tmp_path, log=lambda *_: None)
    assert pl.read_parquet(tmp_path / "*.parquet").equals(frame)


def test_signal_names_from_a_count_or_a_list():
    assert signal_names("2") == ("click", "like")
    assert signal_names("click, share") == ("click", "share")
    with pytest.raises(ValueError):
        signal_names("click,click")
    with pytest.raises(ValueError):
        signal_names("0")
