"""Per-task model selection: with ``early_stop_metric: ndcg@10,auc`` every task keeps its own best epoch,
patience and best weights, and the run stops only when all have stopped improving.

The validation metrics are scripted (task A, AUC, peaks early; task B, NDCG@10, late) while the
training is real: each scripted row is tied to the weights it was "measured" on, by a digest of
the weights, so evaluating saved weights later tells which epoch they come from."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from genrec.config import load
from genrec.data.synth import SynthConfig, generate
from genrec.train import checkpoint
from genrec.train.trainer import Trainer

# epoch:        0     1     2     3     4     5     6     7     8     9
AUC = [0.60, 0.70, 0.69, 0.68, 0.67, 0.66, 0.65, 0.64, 0.63, 0.62]  # task A: best at epoch 1
NDCG = [0.01, 0.02, 0.03, 0.04, 0.05, 0.04, 0.03, 0.02, 0.01, 0.01]  # task B: best at epoch 4
PATIENCE = 2


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory):
    out = tmp_path_factory.mktemp("log")
    generate(SynthConfig(users=24, events=720, items=40, signals=("click",), seed=3), out, log=lambda *_: None)
    return out


def _trainer(tiny_log, out, stop: str) -> Trainer:
    values = {"model": "sasrec", "data": {"split": {"protocol": "temporal"}, "event_log": {
        "path": str(tiny_log), "request": "request_id", "signals": ["click"]}}}
    (out.parent / "run.yaml").write_text(yaml.safe_dump(values))
    cfg = load(out.parent / "run.yaml", [
        "model_args.d_model=8", "model_args.num_layers=1", "model_args.num_negatives=8", "data.max_len=20",
        "data.batch_size=64", "train.epochs=10", f"train.patience={PATIENCE}", "train.warmup_steps=1",
        f"train.early_stop_metric={stop}", "train.progress=false", "train.tensorboard=false",
        f"train.out_dir={out}"])
    return Trainer(cfg, log=lambda *_: None)


def _digest(model) -> str:
    h = hashlib.sha256()
    for value in model.state_dict().values():
        h.update(value.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class ScriptedValidation:
    """Replaces ``Trainer.evaluate``: weights never seen before are the next epoch's and get the next
    scripted row; weights seen before get their epoch's row again, with ``weights_epoch``. With
    ``fail_at``, the validation of that epoch raises (the process dies before its checkpoint)."""

    def __init__(self, fail_at: int | None = None):
        self.epoch_of: dict[str, int] = {}
        self.fail_at = fail_at

    def attach(self, trainer: Trainer) -> Trainer:
        trainer.evaluate = lambda split: self(trainer.model)
        return trainer

    def __call__(self, model) -> dict:
        digest = _digest(model)
        if digest not in self.epoch_of:
            if len(self.epoch_of) == self.fail_at:
                self.fail_at = None
                raise KeyboardInterrupt("killed during validation")
            self.epoch_of[digest] = len(self.epoch_of)
        epoch = self.epoch_of[digest]
        return {"auc": AUC[epoch], "ndcg@10": NDCG[epoch], "weights_epoch": epoch}


def test_training_continues_until_every_task_stopped_and_keeps_each_tasks_best_weights(tiny_log, tmp_path):
    script = ScriptedValidation()
    trainer = script.attach(_trainer(tiny_log, tmp_path / "run", "ndcg@10,auc"))
    result = trainer.fit()
    # AUC alone would have stopped after epoch 1 + PATIENCE = 3; NDCG@10 gains until epoch 4
    assert [h["epoch"] for h in result["history"]] == list(range(4 + PATIENCE + 1))
    assert result["best_epochs"] == {"ndcg@10": 4, "auc": 1}
    assert result["best_epoch"] == 4  # the first listed task's
    tasks = result["tasks"]
    assert tasks["auc"]["best_value"] == AUC[1] and tasks["ndcg@10"]["best_value"] == NDCG[4]
    # each task is tested at its own best weights, and best/ holds the first task's
    assert tasks["auc"]["test"]["weights_epoch"] == 1 and tasks["auc"]["valid"]["auc"] == AUC[1]
    assert tasks["ndcg@10"]["test"]["weights_epoch"] == 4 and result["test"]["weights_epoch"] == 4
    run = tmp_path / "run"
    assert tasks["auc"]["weights"] == "best/auc" and (run / "best" / "auc" / checkpoint.WEIGHTS).is_file()
    for folder, epoch in ((run / "best" / "auc", 1), (run / "best" / "ndcg@10", 4), (run / "best", 4)):
        checkpoint.load_weights(trainer.model, folder)  # manifest-verified
        assert script.epoch_of[_digest(trainer.model)] == epoch, folder
    assert checkpoint.resolve(run)[1] == run / "best"


def test_a_single_metric_stops_on_its_own_patience_as_before(tiny_log, tmp_path):
    trainer = ScriptedValidation().attach(_trainer(tiny_log, tmp_path / "run", "auc"))
    result = trainer.fit()
    assert [h["epoch"] for h in result["history"]] == list(range(1 + PATIENCE + 1))
    assert result["best_epoch"] == 1 and result["test"]["weights_epoch"] == 1
    assert "tasks" not in result and "best_epochs" not in result
    assert sorted(p.name for p in (tmp_path / "run" / "best").iterdir()) == ["manifest.json", "model.safetensors"]


def test_a_run_killed_mid_way_resumes_with_every_tasks_best_and_patience(tiny_log, tmp_path):
    straight_script = ScriptedValidation()
    straight = straight_script.attach(_trainer(tiny_log, tmp_path / "straight", "ndcg@10,auc")).fit()

    script = ScriptedValidation(fail_at=3)  # dies in epoch 3's validation: the checkpoint of epoch 2 is last
    with pytest.raises(KeyboardInterrupt):
        script.attach(_trainer(tiny_log, tmp_path / "killed", "ndcg@10,auc")).fit()
    saved = json.loads((checkpoint.latest(tmp_path / "killed") / "state.json").read_text())
    assert saved["epoch"] == 3 and saved["tasks"]["auc"] == {"best": AUC[1], "best_epoch": 1, "bad_epochs": 1}
    resumed = script.attach(_trainer(tiny_log, tmp_path / "killed", "ndcg@10,auc")).fit()
    assert script.epoch_of == straight_script.epoch_of  # the resumed epochs trained the very same weights
    assert resumed["best_epochs"] == straight["best_epochs"] == {"ndcg@10": 4, "auc": 1}
    assert len(resumed["history"]) == len(straight["history"])
    for name in ("auc", "ndcg@10"):
        assert resumed["tasks"][name]["test"] == straight["tasks"][name]["test"]
        a = (tmp_path / "straight" / "best" / name / checkpoint.WEIGHTS).read_bytes()
        assert a == (tmp_path / "killed" / "best" / name / checkpoint.WEIGHTS).read_bytes(), name
