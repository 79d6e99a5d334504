"""The trainer: schedule, a learning step on real data, checkpoints, and kill-and-resume."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genrec.config import load
from genrec.errors import ConfigError
from genrec.train import checkpoint
from genrec.train.checkpoint import CheckpointError
from genrec.train.trainer import CsvLog, Trainer, lr_at
from tests.helpers import loss_before_and_after_fitting

REPO = Path(__file__).resolve().parents[2]


def test_lr_warms_up_then_decays_by_cosine():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def _events(batch) -> int:  # a picklable stand-in for a model's LayoutPlan
    return batch.num_events


def test_the_training_loader_builds_what_the_model_plans_on_each_batch_and_the_others_do_not(
        tmp_path, shared_data, monkeypatch):
    """With loader workers, the trainer asks the model for its LayoutPlan in the step's attention
    dtype (bf16 under a GPU's autocast, float32 on the CPU) and hands it to the training loader only; without
    workers it asks for none (built in the main process, the work would only move before the step)."""
    trainer = Trainer(_small(tmp_path, shared_data, "data.num_workers=1"))
    dtype = torch.bfloat16 if trainer.device.type == "cuda" else torch.float32  # bf16 autocast on a GPU
    asked = []
    monkeypatch.setattr(trainer.model, "layout_plan", lambda dtype: asked.append(dtype) or _events)
    batch = next(iter(trainer.loader("train")))
    assert asked == [dtype] and batch.known_layout == batch.num_events
    assert next(iter(trainer.loader("valid"))).known_layout is None
    trainer.cfg.data.num_workers = 0
    assert next(iter(trainer.loader("train"))).known_layout is None and asked == [dtype]


def test_a_compiled_training_step_takes_the_same_step_as_the_eager_one(tmp_path, shared_data):
    """train.compile: the step runs a torch.compile'd model (inductor, on the CPU or a GPU; float32,
    so that bf16 rounding cannot hide a wrong step), and its first steps' losses and weights match
    the eager trainer's."""
    runs = []
    for compiled in (False, True):
        trainer = Trainer(load(None, [f"data.data_dir={shared_data}", "data.max_len=30", "data.batch_size=64",
                                      "model=hstu", "model_args.d_model=16", "model_args.dropout=0",
                                      "train.bf16=false", "train.progress=false", "train.tensorboard=false",
                                      f"train.out_dir={tmp_path / str(compiled)}",
                                      f"train.compile={str(compiled).lower()}"]))
        assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule) == compiled
        state = trainer.start("overwrite")
        batches = iter(trainer.train_loader)
        losses = [trainer.train_step(next(batches), state)["loss"] for _ in range(2)]
        runs.append((losses, [p.detach().clone() for p in trainer.model.parameters()]))
    (eager, eager_weights), (compiled, compiled_weights) = runs
    assert compiled == pytest.approx(eager, rel=1e-4)
    for got, want in zip(compiled_weights, eager_weights, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("settings", [["train.cuda_graphs=true"], ["train.cuda_graphs=true", "train.compile=true",
                                                                  "train.device=cpu"]], ids=["eager", "cpu"])
def test_cuda_graphs_without_a_compiled_step_on_a_gpu_is_a_clear_error(tmp_path, settings):
    """Raised before any data is read: the data directory here holds no dataset."""
    with pytest.raises(ConfigError, match=r"train.cuda_graphs replays the compiled step on a CUDA device"):
        Trainer(load(None, [f"data.data_dir={tmp_path / 'no-data'}", "data.allow_download=false", "data.max_len=30",
                            "model=hstu", "model_args.d_model=16",
                            "train.progress=false", "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}",
                            *settings]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("model", [["model=hstu"], ["model=dfgr", "model_args.fake_flow=targets"]],
                         ids=["hstu", "dfgr_sparse"])
def test_a_step_replayed_as_cuda_graphs_takes_the_compiled_step(tmp_path, shared_data, model):
    """train.cuda_graphs: four steps queued back to back as the epoch loop queues them (each row read
    only after the next steps replayed the same graphs) log the compiled step's losses and grad norms
    and leave its weights (float32 on the fused backend, no dropout)."""
    runs = []
    for graphs in (False, True):
        trainer = Trainer(load(None, [f"data.data_dir={shared_data}", "data.max_len=30", "data.batch_size=64",
                                      *model, "model_args.d_model=32", "model_args.dropout=0",
                                      "model_args.attention_backend=triton", "train.bf16=false", "train.compile=true",
                                      f"train.cuda_graphs={str(graphs).lower()}", "train.progress=false",
                                      "train.tensorboard=false", f"train.out_dir={tmp_path / str(graphs)}"]))
        state = trainer.start("overwrite")
        batches = iter(trainer.train_loader)
        queued = [trainer.queue_step(next(batches), state) for _ in range(4)]
        rows = [q.read() for q in queued]
        weights = [p.detach().clone() for p in trainer.model.parameters()]
        runs.append(([r["loss"] for r in rows], [r["grad_norm"] for r in rows], weights))
    (losses, norms, weights), (graph_losses, graph_norms, graph_weights) = runs
    assert len(set(graph_losses)) == 4  # four steps' own values, none overwritten by a later replay
    assert graph_losses == pytest.approx(losses, rel=1e-4)
    assert graph_norms == pytest.approx(norms, rel=1e-4)
    for got, want in zip(graph_weights, weights, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


# what torch raised: inductor on an H100 for sparse DFGR at N = 2048 (torch 2.11, an assertion in its
# tiling analysis), and on the CPU for sparse DFGR's second batch shape (torch 2.13, its symbolic
# shapes' value ranges); the error names the compiler's exception, not dynamo's advice after it
FAILURES = {"tiling": (lambda: torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, AssertionError("tiling"), None),
                       r"AssertionError: tiling"),
            "ranges": (lambda: torch._inductor.exc.InductorError(ValueError("Invalid ranges [0:-1]"), None),
                       r"ValueError: Invalid ranges \[0:-1\]")}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_step_that_torch_fails_to_compile_is_a_clear_error_naming_the_setting(tmp_path, shared_data, failure):
    trainer = Trainer(load(None, [f"data.data_dir={shared_data}", "data.max_len=30", "model=hstu",
                                  "model_args.d_model=16", "train.progress=false", "train.tensorboard=false",
                                  f"train.out_dir={tmp_path / 'run'}", "train.compile=true"]))
    state = trainer.start("overwrite")
    make, cause = FAILURES[failure]

    def fails(batch):
        raise make()

    trainer.train_model = fails
    with pytest.raises(ConfigError, match=r"train.compile: torch .* failed to compile hstu's step on a batch of "
                                          rf"\d+ x \d+ events \({cause}\); set train.compile=false"):
        trainer.train_step(next(iter(trainer.train_loader)), state)


def _small(tmp_path, shared_data, *extra):
    return load(None, [f"data.data_dir={shared_data}", "data.max_len=30", "data.batch_size=64",
                       "model_args.d_model=16", "model_args.num_negatives=32", "train.progress=false",
                       "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}", *extra])


def test_the_epoch_loop_reads_each_steps_row_after_queuing_the_next_and_before_a_checkpoint(
        tmp_path, shared_data, monkeypatch):
    """A row read waits for its step on a GPU, so the loop queues step k + 1 before reading row k;
    a checkpoint's step and the last step are read before it goes on. The rows are the steps' own:
    the same losses and norms as steps read at once, every step logged once."""
    from genrec.train import trainer as trainer_lib

    events = []
    queue, read = Trainer.queue_step, trainer_lib.QueuedStep.read
    monkeypatch.setattr(Trainer, "queue_step", lambda self, b, s: events.append(f"q{s['global_step'] + 1}")
                        or queue(self, b, s))
    monkeypatch.setattr(trainer_lib.QueuedStep, "read", lambda self, since=0.0: events.append(
        f"r{self.head['step']}") or read(self, since))
    trainer = Trainer(_small(tmp_path, shared_data, "train.max_steps=5", "train.checkpoint_every_steps=3"))
    state = trainer.start("overwrite")
    trainer.train_epoch(state)
    assert events == ["q1", "q2", "r1", "q3", "r2", "r3", "q4", "q5", "r4", "r5"]
    assert [c.name for c in sorted((tmp_path / "run").glob("checkpoints/step-*"))] == ["step-00000003"]
    with open(tmp_path / "run" / "train_log.csv") as f:
        logged = list(csv.DictReader(f))

    other = Trainer(_small(tmp_path, shared_data, "train.max_steps=5", f"train.out_dir={tmp_path / 'at_once'}"))
    other_state = other.start("overwrite")
    batches = iter(other.train_loader)
    at_once = [other.train_step(next(batches), other_state) for _ in range(5)]
    assert [int(r["step"]) for r in logged] == [1, 2, 3, 4, 5]
    for row, want in zip(logged, at_once, strict=True):
        for column in ("loss", "grad_norm", "lr"):
            assert float(row[column]) == pytest.approx(want[column], rel=1e-6), column
        assert float(row["events_per_s"]) > 0


def test_training_lowers_the_loss_on_real_data(tmp_path, shared_data):
    trainer = Trainer(_small(tmp_path, shared_data, "train.lr=0.01"))
    first, last = loss_before_and_after_fitting(trainer)
    assert last < 0.8 * first


def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path, shared_data):
    trainer = Trainer(_small(tmp_path, shared_data))
    batch = next(iter(trainer.loader("train"))).to(trainer.device)
    trainer.model(batch)["loss"].backward()
    trainer.optimizer.step()
    saved = checkpoint.save(tmp_path, trainer.model, trainer.optimizer, {"global_step": 1, "epoch": 0})
    other = Trainer(_small(tmp_path, shared_data, "train.seed=5"))
    state = checkpoint.load(checkpoint.latest(tmp_path), other.model, other.optimizer)
    assert saved.name == "step-00000001" and state["global_step"] == 1
    for a, b in zip(trainer.model.state_dict().values(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = trainer.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name])


def _train_cmd(out: Path, shared_data: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "genrec.cli", "train", "--out-dir", str(out), "--set",
            f"data.data_dir={shared_data}", "data.max_len=40", "data.batch_size=16", "model_args.d_model=32",
            "train.epochs=2", "train.checkpoint_every_steps=10", "train.progress=false",
            "train.tensorboard=false", "train.patience=10", *extra]


# UniGRF carries state across steps and epochs (mined negatives, favourites, the weighter's losses)
# and selects each task on its own metric (per-task best values, epochs and patience in the checkpoint)
UNIGRF = ["model=unigrf", "model_args.backbone=llama", "model_args.favourite_threshold=0.5",
          "train.early_stop_metric=ndcg@10,auc"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], UNIGRF], ids=["sasrec", "unigrf"])
def test_killed_run_resumes_to_the_same_final_metrics(tmp_path, shared_data, extra):
    # One thread: resume is what is tested here. With two threads a UniGRF run very occasionally
    # differed from a straight one in the last bits even under deterministic algorithms (~1 in 8).
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, shared_data, extra), check=True, env=env, capture_output=True, timeout=600)
    expected = json.loads((straight / "metrics.json").read_text())

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, shared_data, extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a mid-epoch checkpoint from the second epoch exists
        done = checkpoint.latest(killed)
        if done is not None and json.loads((done / "state.json").read_text())["epoch"] == 1 \
                and json.loads((done / "state.json").read_text())["batch_in_epoch"] > 0:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    state = json.loads((checkpoint.latest(killed) / "state.json").read_text())
    assert state["epoch"] == 1 and state["batch_in_epoch"] > 0

    resumed = subprocess.run(_train_cmd(killed, shared_data, extra), check=True, env=env, capture_output=True,
                             text=True, timeout=600)
    assert "resumed from" in resumed.stdout
    got = json.loads((killed / "metrics.json").read_text())
    assert got["steps"] == expected["steps"]
    for split in ("valid", "test"):  # bit-identical (undefined metrics are null in both)
        assert got[split] == expected[split], split
    assert got.get("tasks") == expected.get("tasks")  # each task's best epoch and metrics at its weights
    steps = [int(line.split(",")[0]) for line in (killed / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, expected["steps"] + 1))  # every step logged once, none lost
    def logged(run: Path, column: str) -> list[str]:
        with open(run / "train_log.csv") as f:
            return [row[column] for row in csv.DictReader(f)]

    for column in ("loss", *(["w_retrieval"] if extra else [])):  # the weighter resumes its loss history
        assert logged(killed, column) == logged(straight, column), column


def test_init_from_starts_from_saved_weights(tmp_path, shared_data):
    single = ["model=unigrf", "model_args.objective=retrieval", "model_args.hard_negatives=0",
              "model_args.favourite_threshold=1.0", "model_args.weighter=false"]
    first = Trainer(_small(tmp_path, shared_data, *single, "train.early_stop_metric=ndcg@10"))
    checkpoint.save_weights(first.model, tmp_path / "stage1")
    ranking = [a.replace("objective=retrieval", "objective=ranking") for a in single]
    second = Trainer(_small(tmp_path, shared_data, *ranking, "train.seed=9", f"train.init_from={tmp_path / 'stage1'}"))
    assert second.model.tasks == ("ranking",)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="nowhere: no such file or folder"):
        Trainer(_small(tmp_path, shared_data, f"train.init_from={tmp_path / 'nowhere'}"))


def test_early_stopping_on_a_sum_of_metrics_names_what_is_missing(tmp_path, shared_data):
    trainer = Trainer(_small(tmp_path, shared_data, "train.early_stop_metric=auc+ndcg@10"))
    assert trainer.stop_value({"auc": 0.75, "ndcg@10": 0.125}) == 0.875
    with pytest.raises(ValueError, match=r"\['ndcg@10'\] not reported"):
        trainer.stop_value({"auc": 0.75})


def test_a_log_row_with_other_columns_is_refused(tmp_path):
    log = CsvLog(tmp_path / "log.csv")
    log.write({"step": 1, "loss": 0.5})
    with pytest.raises(ValueError, match="differ from the header"):
        log.write({"step": 2, "loss": 0.4, "w": 1.0})


def test_a_training_step_checks_its_batchs_times_on_the_host(tmp_path, shared_data):
    """Times in 0 .. 2^31 - 1 s are checked on the host batch, so the forward runs with time spans
    checked (on CUDA the fused kernels' layout then skips a device read-back per forward); other
    times (milliseconds here) leave the check to the device, and the step still trains."""
    from genrec.ops import layout

    trainer = Trainer(_small(tmp_path, shared_data, "train.max_steps=1"))
    state = trainer.start("overwrite")
    seen = []
    model = trainer.train_model

    def spy(batch):
        seen.append(getattr(layout._host_checked, "on", False))
        return model(batch)

    trainer.train_model = spy
    batch = next(iter(trainer.train_loader))
    trainer.train_step(batch, state)
    batch.timestamps = batch.timestamps * 1000
    row = trainer.train_step(batch, state)
    assert seen == [True, False] and row["step"] == 2 and math.isfinite(row["loss"])
    assert not getattr(layout._host_checked, "on", False)  # left as it was
