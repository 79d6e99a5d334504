"""TorchRec sharded tables (the genrec[torchrec] extra) on 2 gloo ranks equal the unsharded model:
the same loss, and after one SGD step on a global batch the same dense weights and table rows; and
``train.strategy: torchrec`` end to end: 2 ranks train 1 rank's weights, the tables' optimizer takes
the scheduled rate, checkpoints reshard to one process and read as the plain model's."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from genrec.cli import main
from genrec.config import load
from genrec.data.batching import collate
from genrec.data.info import dataset_info
from genrec.errors import ConfigError
from genrec.models import build_model
from genrec.train import checkpoint
from genrec.train.trainer import Trainer, lr_at
from tests.distributed.ranks import run_command, run_ranks
from tests.distributed.runs import assert_same_training, cut_at
from tests.distributed.runs import state as state_of

pytest.importorskip("torchrec", reason="the TorchRec extra is not installed; `make test-torchrec` installs "
                    "fbgemm-gpu-cpu + torchrec (--no-deps) into .venv and runs this test")

MODEL = {"d_model": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0}
LR = 0.5  # large, so a wrong gradient scale shows in the weights
SHARDINGS = ("row_wise", "table_wise")


def _sharded_steps(rank: int, samples: list, info, out: Path) -> None:
    """One launch, both shardings: one SGD step of the sharded model on each rank's share."""
    from genrec.distributed import launch
    from genrec.distributed.sharded_tables import gather_tables, shard_tables
    from genrec.distributed.strategy import DataParallel

    group = launch.init("cpu")
    for sharding in SHARDINGS:
        torch.manual_seed(0)
        model = build_model("hstu", MODEL, info, 10)
        sharded = shard_tables(model, group.device, sharding, lr=LR)
        item = next(v for k, v in sharded.state_dict().items() if k.endswith("embeddings.item.weight"))
        rows = sum(shard.tensor.shape[0] for shard in item.local_shards())
        if sharding == "row_wise":  # each rank holds part of the table (table-wise: all of it or none)
            assert 0 < rows < item.size(0), (rank, rows)
        batch = collate(samples[rank::2])
        dense = [p for n, p in model.named_parameters() if ".collection." not in n]
        optimizer = torch.optim.SGD(dense, lr=LR)
        losses = sharded(batch)
        scale = DataParallel(group).loss_scale(batch)  # K·n_r/N, as in the trainer
        (losses["loss"] * scale).backward()
        optimizer.step()
        global_loss = (losses["loss"].detach() * scale / 2).reshape(1)
        torch.distributed.all_reduce(global_loss)
        tables = gather_tables(sharded)
        on_zero = gather_tables(sharded, dst=0)  # what best/ is written from: rank 0 alone holds the tables
        assert on_zero.keys() == (tables.keys() if rank == 0 else set())
        assert all(torch.equal(on_zero[name], tables[name]) for name in on_zero)
        if rank == 0:
            weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if ".collection." not in n}
            save_file(weights | {f"table.{k}": v for k, v in tables.items()} | {"loss": global_loss},
                      str(out / f"{sharding}.safetensors"))
    launch.shutdown()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tiny_sequences) -> tuple[Path, list, object]:
    samples = [tiny_sequences[i] for i in range(7)]  # 4 + 3 windows: the ranks' target counts differ
    info = dataset_info(tiny_sequences.seq)
    out = tmp_path_factory.mktemp("torchrec")
    run_ranks(2, _sharded_steps, samples, info, out)
    return out, samples, info


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_distributed_torchrec_sharded_tables_equal_the_unsharded_model(sharded_runs, sharding):
    out, samples, info = sharded_runs
    got = load_file(str(out / f"{sharding}.safetensors"))

    torch.manual_seed(0)
    model = build_model("hstu", MODEL, info, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss = model(collate(samples))["loss"]
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(got["loss"][0], loss.detach(), rtol=1e-5, atol=1e-6)
    expected = dict(model.named_parameters())
    for name, value in got.items():
        if name == "loss":
            continue
        ref = {"table.item": "item_emb.weight", "table.action": "action_emb.table.weight"}.get(name, name)
        torch.testing.assert_close(value, expected[ref].detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert {"table.item", "table.action"} <= got.keys()


# ------------------------------------------------------------------ train.strategy=torchrec, end to end
RUN = ["data.max_len=10", "data.batch_size=4", "data.eval_batch_size=5", "data.split.protocol=temporal",
       "model=hstu", "model_args.d_model=16", "model_args.dropout=0", "train.epochs=2", "train.warmup_steps=2",
       "train.patience=5", "train.checkpoint_every_steps=3", "train.keep_checkpoints=20", "train.progress=false",
       "train.tensorboard=false", "train.deterministic=false", "train.strategy=torchrec", "train.lr=0.01",
       "train.table_lr=0.05"]  # the tables' own rate, so a table trained at train.lr shows
# Adagrad's and AdamW's first steps move a weight by about lr whatever its gradient's size, so the last
# bits in which 2 ranks' sums differ from 1 rank's grow to ~6e-6 in 9 steps here; a row lost or routed
# to the wrong rank moves by ~lr (0.05)
ATOL = 5e-5


def _overrides(data: Path, *extra: str) -> list[str]:
    return [f"data.data_dir={data}", *RUN, *extra]


def _train(out: Path, data: Path, nproc: int, *extra: str):
    return run_command([sys.executable, "-m", "genrec", "train", "--nproc", str(nproc), "--out-dir", str(out),
                        "--set", *_overrides(data, *extra)])


@pytest.fixture(scope="module")
def torchrec_runs(tmp_path_factory, tiny_data) -> dict[str, Path]:
    """The same run with sharded tables on 2 ranks, row-wise and table-wise, and on one rank
    (`genrec train --nproc K`)."""
    root = tmp_path_factory.mktemp("torchrec-runs")
    runs = {"row_wise": (2, "row_wise"), "table_wise": (2, "table_wise"), "one_rank": (1, "row_wise")}
    for name, (nproc, sharding) in runs.items():
        done = _train(root / name, tiny_data, nproc, f"train.table_sharding={sharding}")
        assert done.returncode == 0, done.stdout[-3000:]
    return {name: root / name for name in runs}


@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_distributed_torchrec_strategy_on_two_ranks_trains_one_ranks_weights(torchrec_runs, tiny_data, sharding):
    """Sharded tables on 2 ranks, row- or table-wise, end where 1 rank does (the same global batches),
    the best weights (the plain model's names, gathered from the shards) moved away from the initial
    tables."""
    two = torchrec_runs[sharding]
    assert state_of(checkpoint.latest(two))["tables"] == "torchrec"
    assert_same_training(two, torchrec_runs["one_rank"], ATOL)
    initial = Trainer(load(None, _overrides(tiny_data))).model.state_dict()  # built, not trained
    final = load_file(str(two / "best" / "model.safetensors"))
    assert final.keys() == initial.keys()
    for table in ("item_emb.weight", "action_emb.table.weight"):
        assert (final[table] - initial[table]).abs().max() > 1e-3, table


def test_distributed_torchrec_tables_step_at_the_scheduled_table_lr(tmp_path, tiny_data, one_thread):
    """The first step's fused row-wise Adagrad moves each looked-up row by exactly its learning rate
    (RMS over the row: -lr·g/√mean(g²)): train.table_lr at the warm-up's first step, not train.lr."""
    from genrec.distributed import launch
    from genrec.distributed.sharded_tables import full_weights
    from genrec.distributed.strategy import ShardedTables

    cfg = load(None, _overrides(tiny_data, f"train.out_dir={tmp_path / 'run'}"))
    trainer = Trainer(cfg, strategy=ShardedTables(launch.init("cpu"), cfg.train))
    try:
        state = trainer.start("overwrite")
        before = full_weights(trainer.strategy.sharded)["item_emb.weight"]
        trainer.train_step(next(iter(trainer.train_loader)), state)
        moved = full_weights(trainer.strategy.sharded)["item_emb.weight"] - before
    finally:
        launch.shutdown()
    rows = moved.abs().amax(dim=1) > 0
    expected = lr_at(0, 0.05, 2, trainer.total_steps, cfg.train.min_lr_ratio)  # 0.025
    assert 3 <= int(rows.sum()) < moved.shape[0]  # the batch's items only
    torch.testing.assert_close(moved[rows].pow(2).mean(dim=1).sqrt(), torch.full((int(rows.sum()),), expected),
                               rtol=1e-4, atol=0)


def test_distributed_torchrec_checkpoint_resumes_in_one_process_and_not_as_ddp(tmp_path, tiny_data, torchrec_runs,
                                                                               one_thread):
    """A 2-rank checkpoint of sharded tables (tables and their Adagrad state resharded to one rank)
    resumes to the straight run's end; resumed under train.strategy=ddp it is refused by name."""
    from genrec.distributed.run import train

    two = torchrec_runs["row_wise"]
    refused = cut_at(two, tmp_path / "ddp", 3)
    with pytest.raises(ValueError, match="written with torchrec tables.*train.strategy=torchrec"):
        train(load(None, _overrides(tiny_data, f"train.out_dir={refused}", "train.strategy=ddp")))
    run = cut_at(two, tmp_path / "one", 3)
    train(load(None, _overrides(tiny_data, f"train.out_dir={run}")))
    assert state_of(checkpoint.latest(run))["world_size"] == 1
    assert_same_training(run, two, ATOL)


def test_distributed_torchrec_strategy_without_torchrun_is_a_world_of_one(tmp_path, tiny_data, one_thread):
    """Plain `genrec train` (no --nproc) with train.strategy=torchrec still shards its tables (over
    one rank), so the tables learn through the same optimizer however the run is launched."""
    from genrec.distributed.run import train

    train(load(None, _overrides(tiny_data, f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2")))
    written = state_of(checkpoint.latest(tmp_path / "run"))
    assert (written["tables"], written["world_size"]) == ("torchrec", 1)


def test_distributed_torchrec_checkpoint_evaluates_in_one_plain_process(torchrec_runs, capsys):
    """`genrec eval` (no TorchRec in the model) reads the sharded run's DCP checkpoint and its best/
    weights, and gets the metrics the ranks logged."""
    two = torchrec_runs["row_wise"]
    logged = list(csv.DictReader(open(two / "val_log.csv")))[-1]
    assert main(["eval", "--checkpoint", str(checkpoint.latest(two)), "--split", "valid", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
    for key in ("auc", "gauc", "logloss"):
        assert metrics[key] == pytest.approx(float(logged[key]), rel=1e-6), key
    assert main(["eval", "--checkpoint", str(two), "--split", "valid", "--json"]) == 0
    best = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert best == pytest.approx(json.loads((two / "metrics.json").read_text())["valid"], rel=1e-6)


def test_distributed_torchrec_strategy_refuses_what_it_cannot_shard(tiny_data):
    """Compiled steps and models that read their item table whole (SASRec scores against it) are
    configuration errors naming the setting, before any rank shards anything."""
    from genrec.distributed.launch import ProcessGroup
    from genrec.distributed.strategy import ShardedTables

    group = ProcessGroup(0, 0, 1, torch.device("cpu"))
    cfg = load(None, _overrides(tiny_data))
    with pytest.raises(ConfigError, match="train.compile"):
        ShardedTables(group, dataclasses.replace(cfg.train, compile=True))
    sasrec = build_model("sasrec", {"d_model": 16}, dataset_info(Trainer(cfg).seq), 10)
    with pytest.raises(ConfigError, match="SASRec"):
        ShardedTables(group, cfg.train).wrap(sasrec, torch.device("cpu"))
