"""Checkpoints as safetensors (weights, optimizer tensors) plus JSON (trainer state), verified on load.

Layout under ``out_dir/checkpoints``: one folder per save (``step-00001234``) and a ``latest`` file
naming the newest complete one. A save is written to a temporary folder and renamed, and ``latest``
is replaced atomically afterwards, so a process killed at any instant leaves a loadable checkpoint.
A folder is never replaced in place: a second save of one step (a mid-epoch checkpoint on the
epoch's last step, then the end-of-epoch one) is renamed in beside the first as ``step-00001234-r1``,
and the first is deleted only once ``latest`` names the new one.
Every checkpoint folder (and ``best/``) holds a ``manifest.json`` with each file's size and SHA-256;
loading checks it, so a truncated or altered file is named instead of crashing deep in safetensors.
Resuming falls back to the previous kept checkpoint, with a warning, when the newest is damaged.

Wherever weights are asked for, :func:`resolve` accepts a run folder (its ``best/`` weights, else its
newest checkpoint), a checkpoint folder (single-process, or distributed: DCP, written by torchrun
ranks), or a ``.safetensors`` file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from genrec import strict_json
from genrec.data.registry import file_digest
from genrec.errors import UserError

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
_NAME = re.compile(r"step-(\d{8})(?:-r(\d+))?")  # step-00001234, or its re-save step-00001234-r1


class CheckpointError(UserError):
    """A checkpoint or weights file that is missing, damaged or does not fit the model; names the file."""


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


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    (folder / MANIFEST).write_text(json.dumps(
        {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p, "sha256")} for p in files}, indent=1))


def verify(folder: Path) -> None:
    """Raise CheckpointError unless every file in ``folder``'s manifest is there with its size and hash."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (not a complete genrec checkpoint)")
    try:
        expected = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{manifest}: damaged (not JSON)") from None
    for name, entry in expected.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, expected {entry['bytes']} (truncated or overwritten)")
        if file_digest(path, "sha256") != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 differs from {MANIFEST} (the file was altered)")


def save_weights(model: torch.nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    write_manifest(folder)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def is_distributed_checkpoint(folder: Path) -> bool:
    """A DCP checkpoint folder (``.metadata`` + one ``.distcp`` per rank), written by torchrun ranks."""
    return (Path(folder) / ".metadata").is_file()


def load_distributed_weights(model: torch.nn.Module, folder: Path) -> None:
    """The model weights of a verified DCP checkpoint into a plain module, with no process group. It
    lives here, below both the trainer (``train.init_from``) and ``genrec eval``, so that every
    path :func:`resolve` accepts loads the same way wherever weights are asked for."""
    verify(folder)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=Path(folder), no_dist=True)
    model.load_state_dict(state["model"])


def load_weights(model: torch.nn.Module, path: Path) -> Path:
    """Load weights from a ``.safetensors`` file, a folder holding ``model.safetensors`` (verified
    against its manifest when it has one) or a distributed (DCP) checkpoint folder; returns the file
    (for DCP: the folder) read."""
    path = Path(path)
    if path.is_dir() and is_distributed_checkpoint(path):
        load_distributed_weights(model, path)
        return path
    file = path / WEIGHTS if path.is_dir() else path
    if path.is_dir() and (path / MANIFEST).is_file():
        verify(path)
    if not file.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS} here" if path.is_dir() else f"{path}: no such file")
    tensors = _read_safetensors(file)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        missing, unexpected = model.state_dict().keys() - tensors.keys(), tensors.keys() - model.state_dict().keys()
        detail = (f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}" if missing or unexpected
                  else str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err))
        raise CheckpointError(f"{file}: weights do not fit this {type(model).__name__} model ({detail})") from None
    return file


def save(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         keep: int = 2) -> Path:
    root = out_dir / "checkpoints"
    name = f"step-{state['global_step']:08d}"
    tmp = root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(strict_json.dumps(meta))
    (tmp / "state.json").write_text(strict_json.dumps(state, indent=1))
    write_manifest(tmp)
    return publish(out_dir, tmp, state["global_step"], keep)


def _order(folder: Path) -> tuple[int, int]:
    """(step, revision) of a checkpoint folder's name: ``step-00000005-r1`` is newer than ``step-00000005``."""
    match = _NAME.fullmatch(folder.name)
    return int(match[1]), int(match[2] or 0)


def fresh_name(root: Path, step: int) -> str:
    """A name for a new save of ``step`` that no folder has: ``step-S``, or ``step-S-rN`` past the
    highest revision already there, so a re-save never replaces the folder ``latest`` names."""
    same = [_order(p)[1] for p in kept(root.parent) if _order(p)[0] == step]
    return f"step-{step:08d}" + (f"-r{max(same) + 1}" if same else "")


def publish(out_dir: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename the complete checkpoint ``tmp`` to a fresh name, point ``latest`` at it atomically, then
    delete what it supersedes (older saves of the same step) and all but the newest ``keep``. Every
    step leaves ``latest`` naming a complete checkpoint (single-process and DCP saves alike)."""
    root = out_dir / "checkpoints"
    final = root / fresh_name(root, step)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in kept(out_dir):
        if _order(old)[0] == step and old != final:
            shutil.rmtree(old, ignore_errors=True)
    for old in kept(out_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def kept(out_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), key=_order, reverse=True)


def latest(out_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, if it is a checkpoint folder of this run (never a path outside)."""
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = out_dir / "checkpoints" / name
    return folder if _NAME.fullmatch(name) and (folder / "state.json").is_file() else None


def resumable(out_dir: Path, log=print) -> Path | None:
    """The newest verified checkpoint: ``latest``, else the kept ones newest first, each failure warned
    about. None when the run has no checkpoint; CheckpointError when every one is damaged."""
    candidates = kept(out_dir)
    first = latest(out_dir)
    if first is not None:
        candidates = [first] + [c for c in candidates if c != first]
    problems = []
    for folder in candidates:
        try:
            verify(folder)
            json.loads((folder / "state.json").read_text())
        except (CheckpointError, json.JSONDecodeError, UnicodeDecodeError) as err:
            problems.append(str(err))
            log(f"[checkpoint] warning: {err}; trying the previous checkpoint")
            continue
        return folder
    if problems:
        raise CheckpointError(f"{out_dir / 'checkpoints'}: no undamaged checkpoint left ({problems[-1]}); "
                              "pass --overwrite to start the run again")
    return None


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    verify(folder)
    load_weights(model, folder)
    if optimizer is not None:
        tensors = _read_safetensors(folder / "optimizer.safetensors")
        meta = json.loads((folder / "optimizer.json").read_text())
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
    return json.loads((folder / "state.json").read_text())


def run_folder_of(path: Path) -> Path | None:
    """The run folder (the one holding ``config.yaml``) that ``path`` is or lies in, if any."""
    for candidate in (path, *path.parents[:4]):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def resolve(path: str | Path) -> tuple[Path | None, Path]:
    """(run folder or None, weights to load) for a run folder, a checkpoint folder or a weights file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected a run folder, a checkpoint folder "
                              f"or a {WEIGHTS} file")
    run = run_folder_of(path.parent if path.is_file() else path)
    if path.is_file():
        return run, path
    if (path / WEIGHTS).is_file() or is_distributed_checkpoint(path):
        return run, path
    if path == run:
        if (path / "best" / WEIGHTS).is_file():
            return run, path / "best"
        newest = kept(path)
        if newest:
            return run, newest[0]
        raise CheckpointError(f"{path}: run folder without weights (no best/{WEIGHTS}, no checkpoints/)")
    if path.name == "checkpoints" and kept(path.parent):
        return run, kept(path.parent)[0]
    raise CheckpointError(f"{path}: no {WEIGHTS} here; expected a run folder, a checkpoint folder or a weights file")
