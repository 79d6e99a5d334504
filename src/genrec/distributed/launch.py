"""Process groups from torchrun's environment, and ``genrec train --nproc K`` through torchrun's launcher.

torchrun (``torch.distributed.run``) starts K processes and sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each; :func:`init` joins them in one process
group: NCCL when the ranks train on CUDA devices, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init(device: str = "auto") -> ProcessGroup:
    """Join (or start) the default process group.

    ``device`` as in ``train.device``: ``auto`` trains on ``cuda:LOCAL_RANK`` when CUDA is there,
    else on the CPU. Outside torchrun this is a group of one process (an in-memory store, no port),
    so a distributed checkpoint can be resumed or evaluated in a single process.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(f"local rank {local_rank} has no CUDA device ({torch.cuda.device_count()} visible); "
                             f"start at most one process per GPU")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if under_torchrun():
            dist.init_process_group(backend, device_id=dev if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return ProcessGroup(dist.get_rank(), local_rank, dist.get_world_size(), dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``python -m genrec ARGV`` on ``nproc`` local processes through torchrun's own launcher
    (``--standalone``: a rendezvous on a free local port). Returns the launcher's exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "genrec", *argv])
    try:
        run(args)
    except ChildFailedError as err:  # names the failing rank, its exit code and its error file
        print(f"genrec: distributed run failed: {err}")
        return 1
    return 0
