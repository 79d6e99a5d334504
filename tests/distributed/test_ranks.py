"""The multi-process test helpers never hang the suite: a stuck rank or launcher fails its test."""

from __future__ import annotations

import sys
import time

import pytest

from tests.distributed.ranks import run_command, run_ranks


def _stuck(rank: int) -> None:
    if rank == 1:
        time.sleep(3600)


def test_distributed_helper_stops_a_stuck_rank_at_its_deadline():
    t0 = time.monotonic()
    with pytest.raises(Exception, match="not done after|terminated with"):  # ours, or the rank's own exit
        run_ranks(2, _stuck, deadline_s=15)
    assert time.monotonic() - t0 < 40


def test_distributed_helper_kills_a_stuck_command_with_its_children():
    child = "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])"
    script = f"import subprocess, sys, time; {child}; print('started', flush=True); time.sleep(3600)"
    with pytest.raises(TimeoutError, match="started"):
        run_command([sys.executable, "-c", script], timeout_s=3)
