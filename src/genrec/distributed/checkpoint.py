"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) that load with any number of ranks.

A save is one folder ``out_dir/checkpoints/step-XXXXXXXX``, beside the single-process ones and with
the same ``latest`` pointer, holding:

* DCP's files (``.metadata`` + one ``.distcp`` per rank): the model and the AdamW state under
  parameter names (``get_state_dict``: no ``module.`` prefix, DDP replicas and FSDP2 shards alike), so
  a checkpoint written by K ranks under DDP loads into K' ranks under FSDP2 or into one process;
* ``state.json``: the trainer's counters, which are also the sampler's state (epoch, batch in epoch:
  positions in *global* batches, the same for every world size), the world size that wrote it and how
  its tables were held (``tables``: ``replicated`` under DDP/FSDP2, ``torchrec`` sharded; the
  optimizer states differ, so a run resumes only with its own kind, while the model weights, under
  the plain model's names either way, load anywhere);
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
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StateDicts:
    """How a strategy's model and optimizer become the state dicts DCP saves, and are set from them:
    ``get(model, optimizer) -> (model_state, optim_state)``, ``set(model, optimizer, model_state,
    optim_state)``. ``tables`` names how the tables are held, recorded in ``state.json``."""

    get: Callable[[nn.Module, torch.optim.Optimizer], tuple[dict, dict]]
    set: Callable[[nn.Module, torch.optim.Optimizer, dict, dict], None]
    tables: str


# DDP replicas and FSDP2 shards alike, under parameter names (no ``module.`` prefix)
REPLICATED = StateDicts(get_state_dict, lambda model, optimizer, model_state, optim_state: set_state_dict(
    model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state), "replicated")


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int = 2,
         states: StateDicts = REPLICATED) -> Path:
    """Collective: every rank calls it with the same ``state``."""
    rank = dist.get_rank()
    root = Path(out_dir) / "checkpoints"
    name = f"step-{state['global_step']:08d}"
    tmp = root / (name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = states.get(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    save_file(_rng_state(), str(tmp / f"rng-{rank}.safetensors"))
    dist.barrier()
    if rank == 0:
        written = state | {"world_size": dist.get_world_size(), "tables": states.tables}
        (tmp / "state.json").write_text(json.dumps(written, indent=1))
        checkpoint.write_manifest(tmp)  # sizes and hashes, verified before a resume (as single-process ones)
        checkpoint.publish(Path(out_dir), tmp, state["global_step"], keep)
    dist.barrier()
    return checkpoint.latest(Path(out_dir))


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, states: StateDicts = REPLICATED) -> dict:
    """Collective: restore model and optimizer (resharded to this world) and this rank's RNG; returns
    the trainer state (without the writer's world size and tables)."""
    folder = Path(folder)
    if not checkpoint.is_distributed_checkpoint(folder):
        raise ValueError(f"{folder}: not a distributed (DCP) checkpoint (no .metadata); a single-process "
                         f"checkpoint resumes with plain `genrec train`")
    state = json.loads((folder / "state.json").read_text())
    written = state.pop("tables", REPLICATED.tables)
    state.pop("world_size", None)
    if written != states.tables:
        strategy = "torchrec" if written == "torchrec" else "ddp or fsdp2"
        raise ValueError(f"{folder}: written with {written} tables, which this run's train.strategy does not "
                         f"hold (their optimizer states differ): resume it with train.strategy={strategy}, or "
                         f"start a new run from its weights (train.init_from)")
    model_state, optim_state = states.get(model, optimizer)
    both = {"model": model_state, "optim": optim_state}
    dcp.load(both, checkpoint_id=folder)
    states.set(model, optimizer, both["model"], both["optim"])
    rng = folder / f"rng-{dist.get_rank()}.safetensors"
    if rng.is_file():  # a rank the writer did not have keeps the trainer's seeding
        saved = load_file(str(rng))
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    return state


def save_full_weights(model: nn.Module, folder: Path) -> None:
    """Collective: gather the full weights (FSDP2 shards included) and write ``model.safetensors`` from
    rank 0, the same file a single-process run writes."""
    write_full_weights(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
                       folder)


def write_full_weights(full: dict[str, torch.Tensor], folder: Path) -> None:
    """Collective: ``model.safetensors`` of the full weights ``full`` (every rank's copy) from rank 0."""
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in full.items()}, str(folder / "model.safetensors"))
        checkpoint.write_manifest(folder)
    dist.barrier()


def read_full_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full weights of ``folder/model.safetensors`` (:func:`write_full_weights`'s file), on the CPU."""
    return load_file(str(Path(folder) / "model.safetensors"), device="cpu")


def load_full_weights(model: nn.Module, folder: Path) -> None:
    """``model.safetensors`` (full weights) into a possibly sharded model, on every rank."""
    set_model_state_dict(model, read_full_weights(folder), options=StateDictOptions(full_state_dict=True))
