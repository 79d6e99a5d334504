"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) that load with any number of ranks.

A save is one folder ``out_dir/checkpoints/step-XXXXXXXX``, beside the single-process ones and with
the same ``latest`` pointer, holding:

* DCP's files (``.metadata`` + one ``.distcp`` per rank): the model and the AdamW state under
  parameter names (``get_state_dict``: no ``module.`` prefix, DDP replicas and FSDP2 shards alike), so
  a checkpoint written by K ranks under DDP loads into K' ranks under FSDP2 or into one process;
* ``state.json``: the trainer's counters, which are also the sampler's state (epoch, batch in epoch:
  positions in *global* batches, the same for every world size) and the world size that wrote it;
* ``rng-<rank>.safetensors``: each rank's torch RNG states (the trainer re-seeds from (seed, step)
  before every step, so resume does not depend on them; they are kept for code that draws outside).

Every rank writes into ``step-….tmp``; after a barrier rank 0 renames it (to a fresh name: a re-save
of a step never replaces the folder ``latest`` names) and moves ``latest``
(:func:`genrec.train.checkpoint.publish`), so a run killed at any instant (any rank) leaves the
previous complete checkpoint as ``latest``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from genrec.train import checkpoint


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it with the same ``state``."""
    rank = dist.get_rank()
    root = Path(out_dir) / "checkpoints"
    name = f"step-{state['global_step']:08d}"
    tmp = root / (name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    save_file(_rng_state(), str(tmp / f"rng-{rank}.safetensors"))
    dist.barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps(state | {"world_size": dist.get_world_size()}, indent=1))
        checkpoint.write_manifest(tmp)  # sizes and hashes, verified before a resume (as single-process ones)
        checkpoint.publish(Path(out_dir), tmp, state["global_step"], keep)
    dist.barrier()
    return checkpoint.latest(Path(out_dir))


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: restore model and optimizer (resharded to this world) and this rank's RNG; returns
    the trainer state (without the writer's world size)."""
    folder = Path(folder)
    if not checkpoint.is_distributed_checkpoint(folder):
        raise ValueError(f"{folder}: not a distributed (DCP) checkpoint (no .metadata); a single-process "
                         f"checkpoint resumes with plain `genrec train`")
    model_state, optim_state = get_state_dict(model, optimizer)
    both = {"model": model_state, "optim": optim_state}
    dcp.load(both, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    rng = folder / f"rng-{dist.get_rank()}.safetensors"
    if rng.is_file():  # a rank the writer did not have keeps the trainer's seeding
        saved = load_file(str(rng))
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    state = json.loads((folder / "state.json").read_text())
    state.pop("world_size", None)
    return state


def save_full_weights(model: nn.Module, folder: Path) -> None:
    """Collective: gather the full weights (FSDP2 shards included) and write ``model.safetensors`` from
    rank 0, the same file a single-process run writes."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in full.items()}, str(folder / "model.safetensors"))
        checkpoint.write_manifest(folder)
    dist.barrier()


def load_full_weights(model: nn.Module, folder: Path) -> None:
    """``model.safetensors`` (full weights) into a possibly sharded model, on every rank."""
    full = load_file(str(Path(folder) / "model.safetensors"), device="cpu")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
