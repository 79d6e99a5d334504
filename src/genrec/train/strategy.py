"""How the trainer runs: everything that changes with the number of processes, behind one object.

:class:`Strategy` is the single-process case, the default. :mod:`genrec.distributed` subclasses it
for torchrun (DDP or FSDP2): it wraps the model, gives each rank its share of every global batch,
weights the loss so the averaged gradient is the global batch's, reduces metrics exactly and saves
distributed checkpoints. The trainer calls only these methods, so it reads the same either way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from genrec.data.batching import JaggedBatch, WindowDataset, make_loader
from genrec.errors import ConfigError
from genrec.eval.evaluate import evaluate
from genrec.nn.prepared import LayoutPlan
from genrec.train import checkpoint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r}: no CUDA device is available here; expected 'cpu' or 'auto'")
    return torch.device(name)


class Strategy:
    """One process: the model as built, whole batches, safetensors checkpoints."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """The process that logs, shows progress and writes the run folder's shared files."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        return resolve_device(name)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the training step calls (``model`` itself, or a DDP/FSDP2 wrapper of it)."""
        return model

    def optimizer(self, model: nn.Module, make) -> torch.optim.Optimizer:
        """The step's optimizer for the wrapped ``model``: ``make(named_parameters)`` (the trainer's
        AdamW) over every parameter; a strategy whose tables learn inside the backward pass combines
        it with theirs."""
        return make(list(model.named_parameters()))

    def train_loader(self, dataset: WindowDataset, batch_size: int, seed: int, num_workers: int,
                     prepare: LayoutPlan | None = None, pin_memory: bool = False) -> DataLoader:
        """Batches of the training split, in an order that is a pure function of (seed, epoch); the
        loader's ``batch_sampler`` has ``set_epoch(epoch, start_batch)`` and ``batches()``; ``prepare``:
        each batch's layout built in the loader (:mod:`genrec.nn.prepared`); ``pin_memory``: batches
        in page-locked memory, for a GPU step."""
        return make_loader(dataset, batch_size, shuffle=True, seed=seed, num_workers=num_workers, prepare=prepare,
                           pin_memory=pin_memory)

    def loss_scale(self, batch: JaggedBatch) -> float | torch.Tensor:
        """Factor on this process's loss before ``backward`` (1: the batch is the whole global batch)."""
        return 1.0

    def reduce_losses(self, losses: dict[str, torch.Tensor], batch: JaggedBatch) -> dict[str, torch.Tensor]:
        """The logged losses: the global batch's target-weighted means, left on the device (reading
        them waits for the step; the trainer reads them a step later)."""
        return {k: v.detach() for k, v in losses.items()}

    def sum(self, value: float) -> float:
        """``value`` summed over processes (events, FLOPs)."""
        return value

    def max(self, value: float) -> float:
        """The largest ``value`` over processes (peak memory)."""
        return value

    def evaluate(self, model: nn.Module, loader, device: torch.device, autocast: bool) -> dict[str, float]:
        return evaluate(model, loader, device, autocast=autocast)

    def save_checkpoint(self, out_dir, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                        keep: int):
        return checkpoint.save(out_dir, model, optimizer, state, keep)

    def load_checkpoint(self, folder, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        if checkpoint.is_distributed_checkpoint(folder):
            raise ValueError(f"{folder} is a distributed (DCP) checkpoint: resume it with "
                             f"`genrec train --nproc K` or torchrun (any K, 1 included)")
        return checkpoint.load(folder, model, optimizer)

    def save_weights(self, model: nn.Module, folder) -> None:
        checkpoint.save_weights(model, folder)

    def load_weights(self, model: nn.Module, folder) -> None:
        checkpoint.load_weights(model, folder)

    def barrier(self) -> None:
        """Wait for every process (after rank 0 wrote files the others read)."""
