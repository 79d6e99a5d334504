"""Multi-process helpers for the distributed tests, with hard deadlines and nothing left behind.

A hung collective must fail its test in minutes with every rank's stack, never hang the suite:
pytest waits for its non-daemon children at exit, so one stuck rank would otherwise hold CI until
its time limit. Ranks are daemons that also arm :mod:`faulthandler` to print their stacks and exit
just before the deadline; ``genrec train --nproc K`` runs in its own process session, which is
killed whole (launcher and ranks) when it overruns.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import time

import torch.multiprocessing as mp

DEADLINE_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, deadline_s: float, fn, args) -> None:
    faulthandler.dump_traceback_later(deadline_s, exit=True)  # a stuck rank prints where, then dies
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips interpreter teardown (seconds with torch loaded); failures raised above


def run_ranks(world_size: int, fn, *args, deadline_s: float = DEADLINE_S) -> None:
    """``fn(rank, *args)`` in ``world_size`` fresh processes; raises if any rank fails or the ranks
    are not all done within ``deadline_s`` (the stuck ranks' stacks are on stderr)."""
    context = mp.start_processes(_entry, args=(world_size, _free_port(), deadline_s - 5, fn, args),
                                 nprocs=world_size, join=False, daemon=True, start_method="spawn")
    end = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > end:
                raise TimeoutError(f"{world_size} ranks of {fn.__name__} not done after {deadline_s:.0f} s "
                                   f"(their stacks are in the captured stderr)")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
            p.join(5)


def run_command(cmd: list[str], timeout_s: float = DEADLINE_S, **kwargs) -> subprocess.CompletedProcess:
    """``cmd`` (e.g. ``genrec train --nproc 2``) in its own process session, its output captured as
    text; on overrunning ``timeout_s`` the whole session (launcher and every rank) is killed and
    the error shows the end of its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1") | kwargs.pop("env", {})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise TimeoutError(f"{' '.join(cmd[:6])} ... not done after {timeout_s:.0f} s; its output ends:\n"
                           f"{out[-3000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # ranks the launcher left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)
