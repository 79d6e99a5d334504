"""Retrieval baselines (SASRec, GRU4Rec, NARM, BPR-MF): shapes, learning on real data, causality,
and no access to labels or actions."""

from __future__ import annotations

import pytest
import torch

from genrec.config import load
from genrec.data.batching import JaggedBatch
from genrec.models import build_model
from genrec.train.trainer import Trainer
from tests.helpers import loss_before_and_after_fitting, make_batch
from tests.models.test_generative import INFO

RETRIEVAL = ["sasrec", "gru4rec", "narm", "bprmf"]


def _model(name: str):
    torch.manual_seed(0)
    return build_model(name, {"d_model": 16}, INFO, 32).double().eval()


@pytest.mark.parametrize("name", RETRIEVAL)
def test_query_and_item_table_shapes(name):
    model = _model(name)
    batch = make_batch([5, 1, 9], seed=0)
    assert model.retrieval_queries(batch).shape == (int(batch.target_mask.sum()), 16)
    assert model.item_embeddings().shape == (INFO.num_items + 1, 16)


@pytest.mark.parametrize("name", RETRIEVAL)
def test_queries_never_read_labels_or_actions(name):
    model = _model(name)
    batch = make_batch([7, 12], seed=1)
    changed = JaggedBatch(**{k: v.clone() for k, v in batch.tensors().items()})
    changed.actions = (changed.actions + 1) % 5
    changed.labels = 1 - changed.labels
    with torch.no_grad():
        assert torch.equal(model.retrieval_queries(batch), model.retrieval_queries(changed))


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "narm"])
def test_query_for_an_event_reads_only_earlier_items(name):
    model = _model(name)
    batch = make_batch([12], seed=2)
    changed = JaggedBatch(**{k: v.clone() for k, v in batch.tensors().items()})
    changed.items[6:] = (changed.items[6:] % 40) + 1  # change the items of events 6..11
    with torch.no_grad():
        a, b = model.retrieval_queries(batch), model.retrieval_queries(changed)
    assert torch.equal(a[:7], b[:7])  # the query for event k reads events < k: 0..5 at most here
    assert not torch.equal(a[7:], b[7:])


@pytest.mark.parametrize("name", RETRIEVAL)
def test_training_lowers_the_loss_on_real_data(name, tmp_path, shared_data):
    cfg = load(None, [f"model={name}", f"data.data_dir={shared_data}", "data.max_len=30", "data.batch_size=64",
                      "model_args.d_model=16", "train.lr=0.01", "train.progress=false", "train.tensorboard=false",
                      "train.early_stop_metric=ndcg@10", f"train.out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    first, last = loss_before_and_after_fitting(trainer)
    assert last < 0.9 * first
    assert {"hr@10", "ndcg@10", "mrr"} <= set(trainer.evaluate("valid"))
