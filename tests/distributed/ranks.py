"""Run a function on K local gloo ranks, as torchrun would start them (its environment variables)."""

from __future__ import annotations

import os
import socket
import sys

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips interpreter teardown (seconds with torch loaded); failures raised above


def run_ranks(world_size: int, fn, *args) -> None:
    """``fn(rank, *args)`` in ``world_size`` fresh processes; raises if any rank fails."""
    mp.spawn(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
