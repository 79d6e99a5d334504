"""Resume under changed settings: the config's optimizer settings and stopping rules apply, and the
logs of a resumed run (CSV and TensorBoard) are an uninterrupted run's."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from genrec.config import load
from genrec.train import checkpoint
from genrec.train.strategy import Strategy
from genrec.train.trainer import Trainer
from tests.distributed.conftest import tiny_movielens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """23 users, 30 items: 5 steps an epoch of 8 windows."""
    return tiny_movielens(tmp_path_factory.mktemp("tiny"))


def _cfg(data: Path, out: Path, *extra: str):
    return load(None, [f"data.data_dir={data}", "data.allow_download=false", "data.max_len=10", "data.batch_size=8",
                       "data.split.protocol=temporal", "model=sasrec", "model_args.d_model=16",
                       "train.early_stop_metric=ndcg@10", "train.epochs=2", "train.progress=false",
                       "train.tensorboard=false", "train.device=cpu", f"train.out_dir={out}", *extra])


def _quiet(cfg, strategy: Strategy | None = None) -> Trainer:
    return Trainer(cfg, log=lambda *_: None, strategy=strategy)


class Killed(BaseException):
    """Stands for SIGKILL at the instant it is raised."""


def _rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(r["step"], r["epoch"]) for r in csv.DictReader(f)]


def test_resume_applies_the_configs_weight_decay_and_betas_and_keeps_the_moments(tmp_path, tiny):
    out = tmp_path / "run"
    _quiet(_cfg(tiny, out, "train.epochs=1", "train.weight_decay=0.0")).fit()
    saved = checkpoint.latest(out)
    trainer = _quiet(_cfg(tiny, out, "train.weight_decay=0.5", "train.betas=[0.5,0.6]"))
    trainer.start("resume")
    decay, other = trainer.optimizer.param_groups
    assert (decay["weight_decay"], other["weight_decay"]) == (0.5, 0.0)
    assert decay["betas"] == other["betas"] == (0.5, 0.6)
    fresh = _quiet(_cfg(tiny, tmp_path / "other"))
    checkpoint.load(saved, fresh.model, fresh.optimizer)  # the moments as saved
    for want, got in zip(fresh.optimizer.state.values(), trainer.optimizer.state.values(), strict=True):
        assert torch.equal(want["exp_avg_sq"], got["exp_avg_sq"]) and torch.equal(want["step"], got["step"])


@pytest.mark.parametrize("first, second, steps", [
    (["train.max_steps=3"], ["train.max_steps=8"], 8),
    (["train.epochs=1"], ["train.epochs=2"], 10),
], ids=["max_steps", "epochs"])
def test_resume_with_a_larger_limit_trains_on(tmp_path, tiny, first, second, steps):
    _quiet(_cfg(tiny, tmp_path / "run", *first)).fit()
    assert _quiet(_cfg(tiny, tmp_path / "run", *second)).fit("resume")["steps"] == steps


def test_resume_with_a_larger_patience_trains_on_after_an_early_stop(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(Trainer, "_better", lambda self, value, best: best is None)  # only the first gains
    assert _quiet(_cfg(tiny, tmp_path / "run", "train.epochs=3", "train.patience=1")).fit()["steps"] == 10
    monkeypatch.undo()
    assert _quiet(_cfg(tiny, tmp_path / "run", "train.epochs=3", "train.patience=5")).fit("resume")["steps"] == 15


def test_a_resumed_run_keeps_the_checkpoint_steps_tensorboard_values(tmp_path, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class DieAfterStep6(Strategy):
        def save_checkpoint(self, out_dir, model, optimizer, state, keep):
            saved = super().save_checkpoint(out_dir, model, optimizer, state, keep)
            if state["global_step"] == 6:
                raise Killed
            return saved

    settings = ("train.checkpoint_every_steps=3", "train.tensorboard=true")
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _quiet(_cfg(tiny, out, *settings), DieAfterStep6()).fit()
    _quiet(_cfg(tiny, out, *settings)).fit()
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))
    assert [e.step for e in events.Scalars("valid/ndcg@10")] == [5, 10]


def test_a_validation_logged_after_the_checkpoint_of_its_step_is_logged_once_after_resume(tmp_path, tiny):
    """A mid-epoch checkpoint on the epoch's last step (5) comes before that step's validation row;
    killed after the row, before the end-of-epoch checkpoint, the resumed run validates step 5 again."""

    class DieAtEpochEnd(Strategy):
        def save_checkpoint(self, out_dir, model, optimizer, state, keep):
            if state["epoch"] == 1 and state["batch_in_epoch"] == 0:
                raise Killed
            return super().save_checkpoint(out_dir, model, optimizer, state, keep)

    out = tmp_path / "run"
    with pytest.raises(Killed):
        _quiet(_cfg(tiny, out, "train.checkpoint_every_steps=5"), DieAtEpochEnd()).fit()
    assert _rows(out / "val_log.csv") == [("5", "0")]
    _quiet(_cfg(tiny, out, "train.checkpoint_every_steps=5")).fit()
    assert _rows(out / "val_log.csv") == [("5", "0"), ("10", "1")]


def test_init_from_loads_a_distributed_checkpoint_as_genrec_eval_does(tmp_path, tiny):
    import torch.distributed.checkpoint as dcp

    first = _quiet(_cfg(tiny, tmp_path / "first", "train.seed=1"))
    folder = tmp_path / "dcp" / "step-00000005"  # as torchrun ranks write it: model and optimizer
    dcp.save({"model": first.model.state_dict(), "optim": {}}, checkpoint_id=folder, no_dist=True)
    checkpoint.write_manifest(folder)
    second = _quiet(_cfg(tiny, tmp_path / "second", "train.seed=2", f"train.init_from={folder}"))
    for name, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name
