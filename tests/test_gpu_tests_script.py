"""benchmarks/gpu_tests.sh, the GPU-only tests' runner: on a host without a CUDA device it refuses
with a message and exit status 2 (and writes no log) instead of running the groups, whose tests
would all skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_tests.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host the script runs the GPU tests")
def test_the_gpu_tests_runner_refuses_a_host_without_a_gpu(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr, (done.returncode, done.stderr)
    assert not any((tmp_path / "out").glob("*.log"))
    syntax = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
