"""Classic CTR rankers (DIN, DIEN, DCN-v2, DeepFM, GDCN): shapes, learning on real data, and no
access to the target's own label or its request's labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.config import load
from genrec.data.batching import JaggedBatch
from genrec.models import build_model
from genrec.train.trainer import Trainer
from tests.helpers import loss_before_and_after_fitting, make_batch
from tests.models.test_generative import INFO

CTR = ["din", "dien", "dcnv2", "deepfm", "gdcn"]


def _model(name: str):
    torch.manual_seed(0)
    return build_model(name, {"d_model": 8, "history": 6}, INFO, 32).double().eval()


@pytest.mark.parametrize("name", CTR)
def test_one_logit_per_target_including_targets_without_history(name):
    model = _model(name)
    batch = make_batch([1, 9, 4], seed=0)
    with torch.no_grad():
        logits = model.rank_logits(batch)
    assert logits.shape == (int(batch.target_mask.sum()),) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", CTR)
def test_request_labels_never_move_predictions_in_or_before_it(name):
    model = _model(name)
    batch = make_batch([15, 8], seed=1)
    with torch.no_grad():
        before = model.rank_logits(batch)
    r = int(batch.request_ids[5])
    in_request = torch.nonzero((batch.sequence_index() == 0) & (batch.request_ids == r)).flatten()
    changed = JaggedBatch(**{k: v.clone() for k, v in batch.tensors().items()})
    changed.actions[in_request] = (changed.actions[in_request] + 2) % 5
    changed.labels[in_request] = 1 - changed.labels[in_request]
    with torch.no_grad():
        after = model.rank_logits(changed)
    seq = batch.sequence_index()[batch.target_mask]
    req = batch.request_ids[batch.target_mask]
    untouched = (seq != 0) | (req <= r)
    assert torch.equal(before[untouched], after[untouched])
    near = (seq == 0) & (req > r) & (req <= r + 2)  # the next requests read the changed behaviours
    assert not torch.equal(before[near], after[near])


@pytest.mark.parametrize("name", CTR)
def test_training_lowers_the_loss_on_real_data(name, tmp_path, shared_data):
    cfg = load(None, [f"model={name}", f"data.data_dir={shared_data}", "data.max_len=30", "data.batch_size=64",
                      "data.split.protocol=temporal", "model_args.d_model=16", "model_args.history=10", "train.lr=0.01",
                      "train.progress=false", "train.tensorboard=false", f"train.out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    first, last = loss_before_and_after_fitting(trainer)
    assert last < 0.9 * first
    metrics = trainer.evaluate("valid")
    assert 0.0 <= metrics["auc"] <= 1.0 and np.isfinite(metrics["logloss"])
