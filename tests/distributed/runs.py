"""Run folders of the multi-process tests: their checkpoints' states, logs and final weights."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def state(folder: Path) -> dict:
    """A checkpoint folder's trainer state (state.json)."""
    return json.loads((folder / "state.json").read_text())


def column(run: Path, name: str) -> list[str]:
    """A column of the run's training log."""
    with open(run / "train_log.csv") as f:
        return [row[name] for row in csv.DictReader(f)]


def cut_at(run: Path, copy: Path, step: int) -> Path:
    """A copy of ``run`` as if it had been killed right after its checkpoint at ``step``."""
    shutil.copytree(run, copy)
    root = copy / "checkpoints"
    for folder in root.glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (root / "latest").write_text(f"step-{step:08d}")
    for name in ("metrics.json", "best"):
        shutil.rmtree(copy / name, ignore_errors=True) if name == "best" else (copy / name).unlink()
    return copy


def assert_same_training(run: Path, reference: Path, atol: float = 1e-6) -> None:
    """``run`` ended as ``reference`` did: best weights (fp32 tolerance, ``atol`` absolute), steps,
    best epoch, logged steps."""
    a = load_file(str(run / "best" / "model.safetensors"))
    b = load_file(str(reference / "best" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=atol, msg=name)
    ref = json.loads((reference / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert got["steps"] == ref["steps"] and got["best_epoch"] == ref["best_epoch"]
    assert got["valid"]["auc"] == pytest.approx(ref["valid"]["auc"], abs=1e-6)
    assert column(run, "step") == column(reference, "step")
