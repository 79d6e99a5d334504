"""Multi-action models: every ranker reads action vectors and predicts every signal, and changing *any*
signal of a request's events never moves a prediction (of any task) in or before that request."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.data.batching import JaggedBatch
from genrec.data.info import DatasetInfo
from genrec.eval.evaluate import evaluate
from genrec.eval.metrics import MultiTaskAccumulator, auc
from genrec.models import build_model
from genrec.nn.embeddings import ActionEmbedding
from genrec.nn.heads import ActionHeads
from tests.helpers import make_batch

SIGNALS = ["click", "like", "follow"]
INFO = DatasetInfo(num_items=40, num_actions=2 ** len(SIGNALS), num_users=10,
                   item_genres=np.zeros((41, 1), np.float32), rating_values=[float(c) for c in range(8)],
                   signal_names=SIGNALS)
GENERATIVE = ["hstu", "genrank", "dfgr", "sfgr"]
CTR = ["din", "dcnv2", "deepfm", "dien", "gdcn"]


def signal_batch(lengths: list[int], seed: int, all_targets: bool = True) -> JaggedBatch:
    """:func:`make_batch` with three binary signals per event; actions are their joint codes."""
    batch = make_batch(lengths, seed, all_targets)
    rng = np.random.default_rng(seed + 50)
    signals = torch.tensor(rng.integers(0, 2, (batch.num_events, len(SIGNALS))), dtype=torch.float32)
    return with_signals(batch, signals)


def with_signals(batch: JaggedBatch, signals: torch.Tensor) -> JaggedBatch:
    values = {k: v.clone() for k, v in batch.tensors().items()}
    values["signals"] = signals
    values["actions"] = (signals.long() << torch.arange(len(SIGNALS))).sum(1)
    values["labels"] = signals[:, 0].clone()
    return JaggedBatch(**values)


def make_model(name: str, **args):
    torch.manual_seed(0)
    base = {"d_model": 16, "history": 6} if name in CTR else {"d_model": 16, "num_heads": 2, "num_layers": 2,
                                                              "dropout": 0.0}
    if name == "unigrf":
        base |= {"feedback_encoding": "sum"}
    return build_model(name, base | args, INFO, 32).double().eval()


@pytest.mark.parametrize("name,args", [*[(n, {"action_encoding": "sum"}) for n in GENERATIVE],
                                       ("hstu", {"action_encoding": "linear", "task_head": "mmoe"}),
                                       ("dfgr", {"action_encoding": "joint", "task_head": "mmoe"}),
                                       *[(n, {}) for n in CTR], ("unigrf", {})])
def test_changing_any_signal_of_a_request_moves_no_task_in_or_before_it(name, args):
    model = make_model(name, **args)
    batch = signal_batch([13, 1, 7, 20], seed=2, all_targets=name != "sfgr")
    with torch.no_grad():
        before = model.task_logits(batch)  # [N_t, T]
    assert before.shape == (int(batch.target_mask.sum()), len(SIGNALS))
    seq = batch.sequence_index()[batch.target_mask]
    req = batch.request_ids[batch.target_mask]
    moved_later = False
    for b in (0, 3):
        in_seq = torch.nonzero(batch.sequence_index() == b).flatten()
        r = int(batch.request_ids[in_seq[len(in_seq) // 3]])
        for s in range(len(SIGNALS)):  # flip one signal at a time, for the whole request
            flipped = batch.signals.clone()
            same_request = in_seq[batch.request_ids[in_seq] == r]
            flipped[same_request, s] = 1 - flipped[same_request, s]
            with torch.no_grad():
                after = model.task_logits(with_signals(batch, flipped))
            untouched = (seq != b) | (req <= r)
            assert torch.equal(before[untouched], after[untouched]), f"signal {SIGNALS[s]} leaked"
            later = (seq == b) & (req > r)
            moved_later |= bool(later.any()) and not torch.equal(before[later], after[later])
    assert moved_later, "signals of an earlier request must influence later predictions"


@pytest.mark.parametrize("name", ["hstu", "dfgr", "din"])
def test_every_signal_gets_its_own_loss(name):
    model = make_model(name).float().train()
    batch = signal_batch([9, 12], seed=4)
    losses = model(batch)
    assert {f"loss/{s}" for s in SIGNALS} <= set(losses)
    assert torch.isclose(losses["ranking_loss"], sum(losses[f"loss/{s}"] for s in SIGNALS))
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.ndim > 1)


def test_task_weights_scale_each_signals_loss():
    heads = ActionHeads(8, [float(c) for c in range(8)], signal_names=SIGNALS, task_weights=(1.0, 0.0, 2.0))
    hidden = torch.randn(20, 8)
    targets = torch.randint(0, 2, (20, 3)).float()
    out = heads.loss(heads(hidden), targets, torch.zeros(20, dtype=torch.long))
    assert torch.isclose(out["ranking_loss"], out["loss/click"] + 2 * out["loss/follow"])
    with pytest.raises(ValueError, match="one weight per signal"):
        ActionHeads(8, [0.0, 1.0], signal_names=SIGNALS, task_weights=(1.0,))


def test_sum_encoding_is_a_sum_of_per_signal_embeddings():
    torch.manual_seed(0)
    emb = ActionEmbedding(8, 4, num_signals=3, encoding="sum")
    codes = torch.arange(8)
    out = emb(codes)  # [8, 4]
    # the effect of switching one signal on is the same whatever the other signals are
    for s in range(3):
        on, off = codes[(codes >> s) & 1 == 1], codes[(codes >> s) & 1 == 0]
        deltas = out[on] - out[off]
        assert torch.allclose(deltas, deltas[:1].expand_as(deltas), atol=1e-6)
    hidden = emb(codes, hidden=torch.ones(8, dtype=torch.bool))
    assert torch.equal(hidden, emb.placeholder_emb.expand(8, 4))
    with pytest.raises(ValueError, match="joint codes"):
        ActionEmbedding(5, 4, num_signals=3, encoding="sum")


def test_per_task_metrics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    users = torch.tensor(rng.integers(0, 5, 200))
    signals = torch.tensor(rng.integers(0, 2, (200, 3))).float()
    logits = signals + torch.tensor(rng.normal(0, 1.0, (200, 3)))
    acc = MultiTaskAccumulator(SIGNALS)
    acc.update(users[:120], signals[:120], logits[:120])
    acc.update(users[120:], signals[120:], logits[120:])
    m = acc.compute()
    for t, name in enumerate(SIGNALS):
        assert m[f"auc/{name}"] == pytest.approx(auc(signals[:, t].numpy(), logits[:, t].numpy()))
    assert m["auc/mean"] == pytest.approx(np.mean([m[f"auc/{n}"] for n in SIGNALS]))
    assert m["auc/mean_signals"] == 3 and "gauc/like" in m and "logloss/follow" in m


def test_evaluation_reports_every_task_and_the_label_as_before():
    model = make_model("genrank", action_encoding="sum").float()
    batch = signal_batch([9, 12, 5], seed=5)
    metrics = evaluate(model, [batch], torch.device("cpu"))
    assert {"auc", "gauc", "logloss", "auc/click", "auc/like", "auc/follow", "auc/mean"} <= set(metrics)
    assert metrics["auc"] == metrics["auc/click"]  # the label is the first signal
