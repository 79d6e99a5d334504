"""Two gloo ranks (``genrec train --nproc 2``) against one process: the same parameters after training
with the same global batch (DDP; FSDP2 in test_dcp.py, where it continues a DDP run), and sharded
evaluation that reproduces the single-process metrics exactly."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genrec.config import load
from genrec.distributed.sampler import ShardedBatchSampler
from genrec.eval.evaluate import evaluate
from genrec.train import checkpoint
from genrec.train.trainer import Trainer
from tests.distributed.ranks import run_command

SETTINGS = ["data.max_len=10", "data.batch_size=8", "data.eval_batch_size=5", "data.split.protocol=temporal",
            "model_args.d_model=16", "model_args.dropout=0", "train.epochs=1", "train.warmup_steps=2",
            "train.progress=false", "train.tensorboard=false", "train.deterministic=false", "train.device=cpu"]


def tiny_config(data: Path, out: Path, model: str = "hstu"):
    """``model`` without dropout on the tiny dataset: 8 windows per global batch, 5 steps an epoch. Every
    process runs one thread (the ranks by OMP_NUM_THREADS, this one by the ``one_thread`` fixture), which
    makes the CPU kernels deterministic without ``torch.use_deterministic_algorithms``."""
    return load(None, [f"data.data_dir={data}", f"model={model}", *SETTINGS, f"train.out_dir={out}"])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_data) -> Path:
    """HSTU, SASRec and UniGRF trained on 2 gloo ranks by ``genrec train --nproc 2``, as a user launches it."""
    out = tmp_path_factory.mktemp("two-ranks")
    for model in ("hstu", "sasrec", "unigrf"):
        done = run_command([sys.executable, "-m", "genrec", "train", "--nproc", "2", "--out-dir", str(out / model),
                            "--set", f"data.data_dir={tiny_data}", f"model={model}", *SETTINGS])
        assert done.returncode == 0, done.stdout[-3000:]
    return out


def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, tiny_data, two_ranks, one_thread):
    single = Trainer(tiny_config(tiny_data, tmp_path / "single"))
    first = {k: v.clone() for k, v in single.model.state_dict().items()}
    # only meaningful when the ranks' shares hold different numbers of targets (the loss weighting)
    windows = single.data["train"].windows
    shares = [ShardedBatchSampler(single.loader("train").batch_sampler, r, 2).batches() for r in range(2)]
    targets = [[int((windows[share, 2] - windows[share, 3]).sum()) for share in rank] for rank in shares]
    assert any(a != b for a, b in zip(*targets, strict=True)), "every step splits its targets evenly"
    single.fit()

    one = load_file(str(tmp_path / "single" / "best" / "model.safetensors"))
    two = load_file(str(two_ranks / "hstu" / "best" / "model.safetensors"))  # the full-weights export
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max(float((one[n] - first[n]).abs().max()) for n in one) > 1e-3  # training did move the weights
    logs = [(run / "train_log.csv").read_text().splitlines() for run in (tmp_path / "single", two_ranks / "hstu")]
    assert len(logs[0]) == len(logs[1]) == len(shares[0]) + 1
    loss = [[float(row.split(",")[5]) for row in log[1:]] for log in logs]  # global-batch losses
    assert loss[1] == pytest.approx(loss[0], rel=1e-5)


def test_distributed_sharded_evaluation_equals_one_process_exactly(tmp_path, tiny_data, two_ranks, one_thread):
    """The ranks' validation of their last weights (val_log.csv, sharded over both ranks) against one
    process evaluating the same weights (the DCP checkpoint written right after that validation)."""
    for model, keys in (("hstu", ("auc", "gauc", "logloss", "ranking_targets")),
                        ("sasrec", ("hr@10", "ndcg@10", "mrr", "retrieval_targets"))):
        with open(two_ranks / model / "val_log.csv", newline="") as f:
            sharded = list(csv.DictReader(f))[-1]
        trainer = Trainer(tiny_config(tiny_data, tmp_path / model, model))
        checkpoint.load_distributed_weights(trainer.model, checkpoint.latest(two_ranks / model))
        loader = trainer.loader("valid")
        assert len(loader.batch_sampler.batches()) % 2 == 1  # one rank scores a padding batch
        single = evaluate(trainer.model, loader, trainer.device)
        assert single[keys[0]] == single[keys[0]]  # not NaN
        for key in keys:
            assert float(sharded[key]) == single[key], (model, key)  # exactly, not approximately


def test_ddp_unigrf_counts_and_weighs_tasks_over_the_global_batch(tmp_path, tiny_data, two_ranks, one_thread):
    """UniGRF's running item counts (logQ) and task-loss averages (the adaptive weighter) see the whole
    global batch on every rank, so the 2-rank run's buffers are one process's; without the sums over
    ranks, DDP's buffer broadcast would keep rank 0's share of the counts only."""
    single = Trainer(tiny_config(tiny_data, tmp_path / "single", "unigrf"))
    single.fit()
    one = load_file(str(tmp_path / "single" / "best" / "model.safetensors"))
    two = load_file(str(two_ranks / "unigrf" / "best" / "model.safetensors"))
    assert float(one["item_counts"].sum()) > 0
    assert torch.equal(two["item_counts"], one["item_counts"])  # counts of the same positives, exactly
    torch.testing.assert_close(two["weighter.smoothed"], one["weighter.smoothed"], rtol=1e-4, atol=0)


def _weights_difference(one: Path, two: Path) -> float:
    """The largest difference of two runs' final weights (values of order 1 here)."""
    a, b = (load_file(str(run / "best" / "model.safetensors")) for run in (one, two))
    return max(float((a[n] - b[n]).abs().max()) for n in a if a[n].numel())


def test_ddp_matches_one_process_for_shared_draws_and_not_for_draws_per_row(tmp_path, tiny_data, two_ranks,
                                                                          one_thread):
    """As genrec.distributed.strategy documents: SASRec's sampled negatives are one draw shared by the
    batch, so 2 ranks train the single process's weights (to float noise that Adam amplifies on
    near-zero gradients); BPR-MF draws a negative per row, which each rank does for its own rows from
    the same seed, so its weights differ by far more."""
    bprmf = [f"data.data_dir={tiny_data}", "model=bprmf", "train.early_stop_metric=ndcg@10",
             *[s for s in SETTINGS if "dropout" not in s]]
    done = run_command([sys.executable, "-m", "genrec", "train", "--nproc", "2", "--out-dir",
                        str(tmp_path / "two" / "bprmf"), "--set", *bprmf])
    assert done.returncode == 0, done.stdout[-3000:]
    for model, two_dir, same in (("sasrec", two_ranks, True), ("bprmf", tmp_path / "two", False)):
        overrides = bprmf if model == "bprmf" else [f"data.data_dir={tiny_data}", "model=sasrec", *SETTINGS]
        Trainer(load(None, [*overrides, f"train.out_dir={tmp_path / model}"])).fit()
        difference = _weights_difference(tmp_path / model, two_dir / model)
        assert (difference < 1e-4) == same, (model, difference)


@pytest.mark.parametrize("favourites", [False, True])
def test_ddp_unigrf_in_batch_negatives_and_favourite_rows_follow_the_global_batch(tmp_path, tiny_data, one_thread,
                                                                                 favourites):
    """UniGRF's in-batch negatives (with logQ) under DDP are every rank's positives, as in one process
    over the same global batch (``nn.ranks.gather_over_ranks``), and its retrieval mean over targets
    plus favourite rows is weighted by the rank's share of those rows (``nn.ranks.rows_weight``), not
    of the targets; a rank's ghost window (no targets) adds no favourite rows. With no per-row draws
    (no mined hard negatives) 2 ranks train the single process's weights, as SASRec's shared draws do;
    with favourites, over a second epoch that mines them (every rank mines every user from the same
    weights and seed). Each rank's own positives as negatives: 0.059 apart; the rows weighted as
    targets: 1.3e-4; a ghost's favourite rows: 3 more item counts."""
    unigrf = [f"data.data_dir={tiny_data}", "model=unigrf", *SETTINGS, "model_args.in_batch_negatives=true",
              "model_args.logq_correction=true", "model_args.hard_negatives=0"]
    unigrf += (["train.epochs=2", "model_args.favourite_threshold=0", "model_args.max_favourites=3",
                "model_args.enhancer_pool=12"] if favourites else ["model_args.favourite_threshold=1"])
    done = run_command([sys.executable, "-m", "genrec", "train", "--nproc", "2", "--out-dir",
                        str(tmp_path / "two" / "unigrf"), "--set", *unigrf])
    assert done.returncode == 0, done.stdout[-3000:]
    single = Trainer(load(None, [*unigrf, f"train.out_dir={tmp_path / 'unigrf'}"]))
    single.fit()
    last = []  # the last checkpoints' weights (best/ may hold an epoch before the favourites)
    for run in (tmp_path / "unigrf", tmp_path / "two" / "unigrf"):
        checkpoint.load_weights(single.model, checkpoint.latest(run))
        last.append({k: v.clone() for k, v in single.model.state_dict().items()})
    assert int((last[0]["favourites"] > 0).sum()) == (54 if favourites else 0)  # rows to weigh: 18 users x 3
    gaps = {k: float((last[0][k].double() - last[1][k].double()).abs().max()) for k in last[0] if last[0][k].numel()}
    assert max(gaps.values()) < 1e-5, {k: g for k, g in gaps.items() if g >= 1e-5}  # fp32 noise: ~1e-7 here
