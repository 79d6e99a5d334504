"""Checkpoints as safetensors (weights, optimizer tensors) plus JSON (trainer state).

Layout under ``out_dir/checkpoints``: one folder per save (``step-00001234``) and a ``latest`` file
naming the newest complete one. A save is written to a temporary folder and renamed, and ``latest``
is replaced atomically afterwards, so a process killed at any instant leaves a loadable checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            name = f"{index}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_weights(model: torch.nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device="cpu"))


def save(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         keep: int = 2) -> Path:
    root = out_dir / "checkpoints"
    name = f"step-{state['global_step']:08d}"
    tmp = root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp)
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    saved = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and
                   not p.name.endswith(".tmp"))
    for old in saved[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out_dir: Path) -> Path | None:
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = out_dir / "checkpoints" / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    load_weights(model, folder)
    if optimizer is not None:
        tensors = load_file(str(folder / "optimizer.safetensors"), device="cpu")
        meta = json.loads((folder / "optimizer.json").read_text())
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
    return json.loads((folder / "state.json").read_text())
