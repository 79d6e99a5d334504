"""Data parallel training on torchrun's ranks: DDP (default), FSDP2, or DDP with TorchRec-sharded tables.

Why the loss is re-weighted: every genrec loss is a mean over the targets of the batch it sees,
and DDP (and FSDP2's reduce-scatter) *average* the ranks' gradients. When rank r holds n_r of the
step's N targets, the plain average (1/K)·Σ_r g_r is not the global batch's gradient Σ_r (n_r/N)·g_r.
Scaling rank r's loss by K·n_r/N before ``backward`` makes the averaged gradient exactly the
global one, so K ranks follow the single-process run with the same global batch (tested to fp32
tolerance on 2 gloo ranks). Logged losses are the same target-weighted means over all ranks.

Random draws: every rank re-seeds from (seed, step) as one process does, so all ranks draw the same
numbers at a step. A draw whose size does not depend on the batch is then one process's draw: the
sampled softmax's ``num_negatives`` catalogue negatives, shared by the batch (SASRec, GRU4Rec, NARM,
UniGRF's uniform part), so without dropout these models follow one process (tested on SASRec and
HSTU). A draw per row is not: each rank draws for its own rows from the same stream, so its rows
get other numbers than they would in one process (and both ranks the same ones). That is BPR-MF's
negative per target, UniGRF's stand-ins for hard negatives not yet mined (``hard_negatives > 0``,
every row in the first epoch) and every dropout mask (``dropout > 0``, any model): such runs train
correctly but are not one process's run bit for bit (tested on BPR-MF). Making them match would
need each rank to draw the global batch's numbers and keep its rows' share.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from genrec.config import TrainConfig
from genrec.data.batching import JaggedBatch, WindowDataset
from genrec.distributed import checkpoint as dcp_checkpoint
from genrec.distributed.evaluate import sharded_evaluate
from genrec.distributed.launch import ProcessGroup
from genrec.distributed.sampler import sharded_loader
from genrec.errors import ConfigError
from genrec.models.base import RecModel
from genrec.models.generative import GenerativeRanker
from genrec.nn.prepared import LayoutPlan
from genrec.nn.ranks import mean_over_ranks
from genrec.train.strategy import Strategy

STRATEGIES = ("ddp", "fsdp2")  # DataParallel's kinds; train.strategy=torchrec is ShardedTables


def fsdp2(model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each of ``model.blocks`` (when it has them), then the model itself: a block's
    parameters are gathered just for its forward and backward. On GPU, parameters compute in bf16
    and gradients reduce in fp32 (``MixedPrecisionPolicy``); on CPU everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if type(model).before_epoch is not RecModel.before_epoch:
        raise ValueError(f"train.strategy=fsdp2: {type(model).__name__} runs a per-epoch pass outside forward "
                         f"(before_epoch), which FSDP2 does not gather parameters for; use train.strategy=ddp")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for block in getattr(model, "blocks", ()):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


class DataParallel(Strategy):
    """One rank of a torchrun job (see the module docstring)."""

    def __init__(self, group: ProcessGroup, kind: str = "ddp"):
        if kind not in STRATEGIES:
            raise ValueError(f"train.strategy must be one of {STRATEGIES}, got {kind!r}")
        self.group = group
        self.kind = kind
        self.rank, self.world_size = group.rank, group.world_size
        self._targets: torch.Tensor | None = None  # this step's n_r (float64), for the logged losses

    def device(self, name: str) -> torch.device:
        return self.group.device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.kind == "fsdp2":
            return fsdp2(model, device)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def train_loader(self, dataset: WindowDataset, batch_size: int, seed: int, num_workers: int,
                     prepare: LayoutPlan | None = None, pin_memory: bool = False):
        if batch_size < self.world_size:
            raise ValueError(f"data.batch_size ({batch_size}) is the global batch; it must be at least the "
                             f"number of ranks ({self.world_size})")
        return sharded_loader(dataset, batch_size, self.rank, self.world_size, seed=seed, num_workers=num_workers,
                              prepare=prepare, pin_memory=pin_memory)

    def loss_scale(self, batch: JaggedBatch) -> torch.Tensor:
        local = batch.target_mask.sum().to(torch.float64)
        total = local.clone()
        dist.all_reduce(total)
        self._targets = local
        return (self.world_size * local / total).float()

    def reduce_losses(self, losses: dict[str, torch.Tensor], batch: JaggedBatch) -> dict[str, torch.Tensor]:
        # a ghost rank (no targets) has NaN losses, a mean over nothing: it adds nothing
        means = torch.stack([v.detach().double() for v in losses.values()])
        return dict(zip(losses, mean_over_ranks(means, self._targets.expand(len(means))).unbind(), strict=True))

    def _reduce(self, value: float, op) -> float:
        t = torch.tensor(float(value), dtype=torch.float64, device=self.group.device)
        dist.all_reduce(t, op=op)
        return float(t)

    def sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def evaluate(self, model: nn.Module, loader, device: torch.device, autocast: bool) -> dict[str, float]:
        if self.kind == "fsdp2":
            model.unshard()  # the root's own parameters (embeddings, heads); the blocks gather in forward
        try:
            return sharded_evaluate(model, loader, device, autocast)
        finally:
            if self.kind == "fsdp2":
                model.reshard()

    def save_checkpoint(self, out_dir, model, optimizer, state, keep):
        return dcp_checkpoint.save(out_dir, model, optimizer, state, keep)

    def load_checkpoint(self, folder, model, optimizer) -> dict:
        return dcp_checkpoint.load(folder, model, optimizer)

    def save_weights(self, model, folder) -> None:
        dcp_checkpoint.save_full_weights(model, folder)

    def load_weights(self, model, folder) -> None:
        dcp_checkpoint.load_full_weights(model, folder)

    def barrier(self) -> None:
        dist.barrier()


class ShardedTables(DataParallel):
    """``train.strategy: torchrec``: one rank of a torchrun job whose item and action tables are
    sharded over the ranks by TorchRec (:mod:`genrec.distributed.sharded_tables`, the
    ``genrec[torchrec]`` extra), the dense rest in DDP; batches, loss weighting and evaluation as
    :class:`DataParallel`'s.

    The tables learn through TorchRec's fused optimizer (``train.table_optimizer``, applied during
    the backward pass) at ``train.table_lr`` on the trainer's warm-up + cosine schedule, the dense
    part through the trainer's AdamW; the two are one ``CombinedOptimizer``, so the trainer's
    ``zero_grad`` (before the forward: that is where the fused update takes its learning rate, and the
    forward fixes the one the backward's update uses) and ``step`` drive both. Gradient clipping
    covers the dense part only (the tables' gradients never exist as tensors). Checkpoints are
    DCP's, the tables and their optimizer state as sharded tensors under the plain model's names, so
    they reshard to any number of ranks and their weights load into a plain model (``genrec eval``,
    ``train.init_from``); ``best/`` is the plain model's ``model.safetensors``, the tables gathered on
    rank 0 alone. Generative rankers only (their tables are looked up, never read whole)."""

    def __init__(self, group: ProcessGroup, train: TrainConfig):
        if importlib.util.find_spec("torchrec") is None:
            raise ConfigError("train.strategy=torchrec needs the TorchRec extra, not installed here: pip install -e "
                              "'.[torchrec]' then pip install --no-deps torchrec==1.8.0 (README, Several GPUs)")
        if train.compile:
            raise ConfigError("train.strategy=torchrec: train.compile is not supported with TorchRec's sharded "
                              "tables (untested); set train.compile=false")
        super().__init__(group, "ddp")
        self.kind = "torchrec"
        self.settings = train
        self.table_lr = train.table_lr or train.lr  # the tables' peak learning rate
        self.sharded: nn.Module | None = None
        self.dense_optimizer = None  # the dense part's AdamW (a TorchRec KeyedOptimizerWrapper)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        from genrec.distributed.sharded_tables import shard_tables

        if not isinstance(model, GenerativeRanker):
            raise ConfigError(f"train.strategy=torchrec shards the tables of the generative rankers (hstu, dfgr, "
                              f"genrank, sfgr), not {type(model).__name__}'s; use train.strategy=ddp")
        t = self.settings
        self.sharded = shard_tables(model, device, t.table_sharding, lr=self.table_lr, optimizer=t.table_optimizer)
        return self.sharded

    def optimizer(self, model: nn.Module, make) -> torch.optim.Optimizer:
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

        from genrec.distributed.sharded_tables import dense_parameters

        dense = dense_parameters(self.sharded)
        tables = self.sharded.fused_optimizer
        for group in tables.param_groups:  # the trainer sets lr = schedule x lr_scale every step
            group["lr_scale"] = self.table_lr / self.settings.lr
        self.dense_optimizer = KeyedOptimizerWrapper(dict(dense), lambda _: make(dense))
        return CombinedOptimizer([tables, self.dense_optimizer])

    def _states(self) -> dcp_checkpoint.StateDicts:
        from genrec.distributed.sharded_tables import plain_names, sharded_names

        def get(model, optimizer):
            optim = optimizer.state_dict()
            return plain_names(self.sharded.state_dict()), optim | {"state": plain_names(optim["state"])}

        def set_(model, optimizer, model_state, optim_state):
            self.sharded.load_state_dict(sharded_names(model_state))
            optimizer.load_state_dict(optim_state | {"state": sharded_names(optim_state["state"])})

        return dcp_checkpoint.StateDicts(get, set_, "torchrec")

    def save_checkpoint(self, out_dir, model, optimizer, state, keep):
        return dcp_checkpoint.save(out_dir, model, optimizer, state, keep, self._states())

    def load_checkpoint(self, folder, model, optimizer) -> dict:
        # DCP loads in place, into the states it is handed: a fresh AdamW has none until its first step,
        # so take one with zero gradients at learning rate 0 (what torch's get_state_dict does for DDP)
        rates = [group["lr"] for group in self.dense_optimizer.param_groups]
        for group in self.dense_optimizer.param_groups:
            group["lr"] = 0.0
        self.dense_optimizer.init_state()
        for group, rate in zip(self.dense_optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        return dcp_checkpoint.load(folder, model, optimizer, self._states())

    def save_weights(self, model, folder) -> None:
        from genrec.distributed.sharded_tables import full_weights

        dcp_checkpoint.write_full_weights(full_weights(self.sharded, dst=0), folder)  # rank 0 writes it

    def load_weights(self, model, folder) -> None:
        from genrec.distributed.sharded_tables import load_full_weights

        load_full_weights(self.sharded, dcp_checkpoint.read_full_weights(folder))


def strategy_for(group: ProcessGroup, train: TrainConfig) -> DataParallel:
    """The rank's strategy for ``train.strategy``."""
    if train.strategy == "torchrec":
        return ShardedTables(group, train)
    return DataParallel(group, train.strategy)
