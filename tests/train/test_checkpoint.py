"""Checkpoints are verified on load, fall back to the previous one when damaged, and resolve from any path."""

from __future__ import annotations

import pytest
import torch

from genrec.train import checkpoint
from genrec.train.checkpoint import CheckpointError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def _saved(tmp_path, steps=(1, 2)) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    (tmp_path / "config.yaml").write_text("model: sasrec\n")
    for step in steps:
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        checkpoint.save(tmp_path, model, opt, {"global_step": step, "epoch": 0}, keep=2)
    return model, opt


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_checkpoint_lists_its_files_sizes_and_hashes_and_verifies(tmp_path):
    _saved(tmp_path)
    newest = checkpoint.latest(tmp_path)
    checkpoint.verify(newest)
    weights = newest / checkpoint.WEIGHTS
    _truncate(weights)
    with pytest.raises(CheckpointError, match=f"^{weights}: \\d+ bytes, expected \\d+ \\(truncated or overwritten\\)$"):
        checkpoint.verify(newest)


def test_an_altered_file_of_the_same_size_fails_its_hash(tmp_path):
    _saved(tmp_path)
    state = checkpoint.latest(tmp_path) / "state.json"
    text = state.read_text()
    state.write_text(text.replace('"epoch": 0', '"epoch": 7'))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        checkpoint.verify(checkpoint.latest(tmp_path))


def test_resume_falls_back_to_the_previous_checkpoint_with_a_warning(tmp_path):
    _saved(tmp_path)
    _truncate(checkpoint.latest(tmp_path) / checkpoint.WEIGHTS)
    warnings = []
    folder = checkpoint.resumable(tmp_path, warnings.append)
    assert folder.name == "step-00000001"
    assert len(warnings) == 1 and "step-00000002" in warnings[0] and "trying the previous checkpoint" in warnings[0]
    state = checkpoint.load(folder, _model(), None)
    assert state["global_step"] == 1


def test_when_every_checkpoint_is_damaged_resume_is_an_error(tmp_path):
    _saved(tmp_path)
    for folder in checkpoint.kept(tmp_path):
        _truncate(folder / checkpoint.WEIGHTS)
    with pytest.raises(CheckpointError, match="no undamaged checkpoint left .*--overwrite"):
        checkpoint.resumable(tmp_path, lambda _: None)


def test_latest_never_points_outside_the_run(tmp_path):
    _saved(tmp_path)
    outside = tmp_path.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    (outside / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text("../../elsewhere")
    assert checkpoint.latest(tmp_path) is None
    assert checkpoint.resumable(tmp_path, lambda _: None).name == "step-00000002"


def test_weights_resolve_from_a_run_folder_a_checkpoint_folder_or_the_file(tmp_path):
    model, _ = _saved(tmp_path)
    checkpoint.save_weights(model, tmp_path / "best")
    best = tmp_path / "best"
    assert checkpoint.resolve(tmp_path) == (tmp_path, best)
    assert checkpoint.resolve(best) == (tmp_path, best)
    assert checkpoint.resolve(best / checkpoint.WEIGHTS) == (tmp_path, best / checkpoint.WEIGHTS)
    newest = checkpoint.latest(tmp_path)
    assert checkpoint.resolve(newest / checkpoint.WEIGHTS) == (tmp_path, newest / checkpoint.WEIGHTS)
    assert checkpoint.resolve(tmp_path / "checkpoints") == (tmp_path, newest)
    other = _model()
    torch.nn.init.zeros_(other.weight)
    assert checkpoint.load_weights(other, best / checkpoint.WEIGHTS) == best / checkpoint.WEIGHTS
    assert torch.equal(other.weight, model.weight)


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_a_damaged_weights_file_is_named(tmp_path, damage):
    model, _ = _saved(tmp_path, steps=(1,))
    file = tmp_path / "w.safetensors"
    checkpoint.save_weights(model, tmp_path / "best")
    file.write_bytes((tmp_path / "best" / checkpoint.WEIGHTS).read_bytes())
    if damage == "truncate":
        _truncate(file)
    else:
        file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"^{file}: not a readable safetensors file"):
        checkpoint.load_weights(_model(), file)


def test_weights_of_another_model_are_named(tmp_path):
    model, _ = _saved(tmp_path, steps=(1,))
    checkpoint.save_weights(model, tmp_path / "best")
    with pytest.raises(CheckpointError, match="weights do not fit this Linear model"):
        checkpoint.load_weights(torch.nn.Linear(5, 3), tmp_path / "best")


def test_a_path_without_weights_says_what_is_expected(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder; expected a run folder"):
        checkpoint.resolve(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors here"):
        checkpoint.resolve(tmp_path / "empty")


def test_a_resave_of_a_step_leaves_latest_naming_a_complete_checkpoint_at_every_instant(tmp_path, monkeypatch):
    """A mid-epoch checkpoint on the epoch's last step, then the end-of-epoch one at the same step, with
    keep=1: after every rename and delete of the second save, ``latest`` names a verified checkpoint
    (a kill at any of those instants resumes), and in the end only the second one is left."""
    import os
    import shutil

    model, opt = _saved(tmp_path, steps=(5,))
    instants = []

    def checked(real):
        def op(*args, **kwargs):
            real(*args, **kwargs)
            folder = checkpoint.latest(tmp_path)
            assert folder is not None, f"after {real.__name__}{args}: latest names no checkpoint"
            checkpoint.verify(folder)
            instants.append(real.__name__)
        return op

    monkeypatch.setattr(os, "replace", checked(os.replace))
    monkeypatch.setattr(shutil, "rmtree", checked(shutil.rmtree))
    checkpoint.save(tmp_path, model, opt, {"global_step": 5, "epoch": 1}, keep=1)
    monkeypatch.undo()
    assert len(instants) >= 3
    assert [p.name for p in checkpoint.kept(tmp_path)] == [checkpoint.latest(tmp_path).name]
    assert checkpoint.load(checkpoint.latest(tmp_path), _model(), None)["epoch"] == 1
