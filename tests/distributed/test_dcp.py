"""Distributed checkpoints (DCP): a rank killed mid-epoch resumes with nothing lost; a checkpoint of
2 DDP ranks resumes in one process and on 2 FSDP2 ranks (resharding), and `genrec eval` reads it in
one process."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genrec.cli import main
from genrec.config import load
from genrec.train import checkpoint
from tests.distributed.ranks import run_command, run_ranks
from tests.distributed.runs import assert_same_training, column, cut_at
from tests.distributed.runs import state as state_of

SETTINGS = ["data.max_len=10", "data.batch_size=4", "data.eval_batch_size=5", "data.split.protocol=temporal",
            "model=hstu", "model_args.d_model=16", "model_args.dropout=0", "train.epochs=2", "train.warmup_steps=2",
            "train.patience=5", "train.checkpoint_every_steps=3", "train.keep_checkpoints=20",
            "train.progress=false", "train.tensorboard=false", "train.deterministic=false"]


def _overrides(data: Path) -> list[str]:
    return [f"data.data_dir={data}", *SETTINGS]


def _train_cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "genrec", "train", "--nproc", "2", "--out-dir", str(out), "--set",
            *_overrides(data), *extra]


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_data) -> Path:
    """An uninterrupted 2-rank DDP run, launched as a user would (`genrec train --nproc 2`)."""
    out = tmp_path_factory.mktemp("dcp") / "straight"
    done = run_command(_train_cmd(out, tiny_data))
    assert done.returncode == 0, done.stdout[-3000:]
    return out


def _ranks_of(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started under ``launcher``."""
    found, todo = {}, [launcher]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        todo += [int(c) for c in children]
        rank = [e for e in env if e.startswith(b"RANK=")]
        if pid != launcher and rank:
            found[int(rank[0][5:])] = pid
    return found


def test_dcp_killed_rank_resumes_with_nothing_lost(tmp_path, tiny_data, straight):
    expected = json.loads((straight / "metrics.json").read_text())
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, tiny_data), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill rank 1 once a mid-epoch checkpoint of the second epoch exists
        last = checkpoint.latest(killed)
        if last is not None and state_of(last)["epoch"] == 1 and state_of(last)["batch_in_epoch"] > 0:
            break
        time.sleep(0.01)
    ranks = _ranks_of(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # torchrun stops the job when a rank dies
    assert not (killed / "metrics.json").exists(), "the run finished before a rank could be killed"
    at = state_of(checkpoint.latest(killed))
    assert at["epoch"] == 1 and at["batch_in_epoch"] > 0 and at["world_size"] == 2

    resumed = run_command(_train_cmd(killed, tiny_data))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    got = json.loads((killed / "metrics.json").read_text())
    assert got["steps"] == expected["steps"]
    for split in ("valid", "test"):
        assert got[split] == expected[split], split  # the same numbers to the last bit
    assert column(killed, "step") == [str(s) for s in range(1, expected["steps"] + 1)]  # each step logged once
    assert column(killed, "loss") == column(straight, "loss")


def test_dcp_checkpoint_of_two_ranks_resumes_in_one_process(tmp_path, tiny_data, straight):
    from genrec.distributed.run import train

    run = cut_at(straight, tmp_path / "one", 3)
    assert state_of(run / "checkpoints" / "step-00000003")["world_size"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # plain `genrec train` (no torchrun) on a DCP checkpoint: a world of one process
        train(load(None, [*_overrides(tiny_data), f"train.out_dir={run}"]))
    finally:
        torch.set_num_threads(threads)
    assert state_of(checkpoint.latest(run))["world_size"] == 1
    assert_same_training(run, straight)


def _resume_fsdp2(rank: int, data: Path, run: Path) -> None:
    from genrec.distributed.run import train

    train(load(None, [*_overrides(data), f"train.out_dir={run}", "train.strategy=fsdp2"]))


def test_dcp_checkpoint_of_ddp_ranks_resumes_on_fsdp2_ranks(tmp_path, tiny_data, straight):
    run = cut_at(straight, tmp_path / "fsdp2", 6)
    run_ranks(2, _resume_fsdp2, tiny_data, run)
    assert_same_training(run, straight)


def test_dcp_checkpoint_evaluates_in_one_process_genrec_eval(tmp_path, straight, capsys):
    last = checkpoint.latest(straight)  # DCP, written at the end of the last epoch by 2 ranks
    assert (last / ".metadata").is_file()
    logged = list(csv.DictReader(open(straight / "val_log.csv")))[-1]  # sharded eval of those weights
    assert main(["eval", "--checkpoint", str(last), "--split", "valid", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
    for key in ("auc", "gauc", "logloss"):
        assert metrics[key] == pytest.approx(float(logged[key]), rel=1e-6), key
    assert main(["eval", "--checkpoint", str(straight), "--split", "valid", "--json"]) == 0  # best/ safetensors
    best = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert best == pytest.approx(json.loads((straight / "metrics.json").read_text())["valid"], rel=1e-6)
