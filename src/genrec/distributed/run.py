"""``genrec train`` in one process or as one rank of a torchrun job, picked from the environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist

from genrec.config import RunConfig
from genrec.distributed import launch
from genrec.distributed.strategy import strategy_for
from genrec.train import checkpoint
from genrec.train.run_folder import Mode, default_path
from genrec.train.trainer import Trainer


def train(cfg: RunConfig, mode: Mode = "auto") -> dict | None:
    """Train ``cfg``; the result on rank 0 (or the only process), None on the other ranks.

    Under torchrun every rank trains with ``train.strategy``. Outside it, a run folder whose latest
    checkpoint is a distributed one (written by K ranks) resumes as a world of one process, so a
    torchrun job can be continued on a machine without several devices; and ``train.strategy:
    torchrec`` runs as a world of one too, so its tables learn through TorchRec's optimizer however
    the run is launched. ``mode`` as in :meth:`Trainer.fit` (what to do with a folder that holds a run).
    """
    out = cfg.train.out_dir
    latest = checkpoint.latest(Path(out)) if out and mode != "overwrite" else None
    resumes_dcp = latest is not None and checkpoint.is_distributed_checkpoint(latest)
    if not launch.under_torchrun() and not resumes_dcp and cfg.train.strategy != "torchrec":
        return Trainer(cfg).fit(mode)
    group = launch.init(cfg.train.device)
    try:
        if out is None:  # one new default folder for all ranks: rank 0's
            name = [str(default_path(cfg.model))]
            dist.broadcast_object_list(name, src=0)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=name[0]))
        result = Trainer(cfg, strategy=strategy_for(group, cfg.train)).fit(mode)
        return result if group.rank == 0 else None
    finally:
        launch.shutdown()
