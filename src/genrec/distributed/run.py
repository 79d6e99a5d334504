"""``genrec train`` in one process or as one rank of a torchrun job, picked from the environment."""

from __future__ import annotations

from pathlib import Path

from genrec.config import RunConfig
from genrec.distributed import launch
from genrec.distributed.checkpoint import is_distributed_checkpoint
from genrec.distributed.strategy import DataParallel
from genrec.train import checkpoint
from genrec.train.trainer import Trainer


def train(cfg: RunConfig, resume: bool = True) -> dict | None:
    """Train ``cfg``; the result on rank 0 (or the only process), None on the other ranks.

    Under torchrun every rank trains with ``train.strategy``. Outside it, a run folder whose latest
    checkpoint is a distributed one (written by K ranks) resumes as a world of one process, so a
    torchrun job can be continued on a machine without several devices.
    """
    latest = checkpoint.latest(Path(cfg.train.out_dir)) if resume else None
    if not launch.under_torchrun() and not (latest is not None and is_distributed_checkpoint(latest)):
        return Trainer(cfg).fit(resume=resume)
    group = launch.init(cfg.train.device)
    try:
        result = Trainer(cfg, strategy=DataParallel(group, cfg.train.strategy)).fit(resume=resume)
        return result if group.rank == 0 else None
    finally:
        launch.shutdown()
