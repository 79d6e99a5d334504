"""Launching: `genrec train --nproc K` hands torchrun the same command without --nproc; outside
torchrun a process group is a world of one."""

from __future__ import annotations

import pytest
import torch

from genrec.cli import _without_nproc
from genrec.distributed import launch
from genrec.distributed.strategy import DataParallel


def test_distributed_ranks_run_the_command_without_nproc():
    argv = ["train", "--nproc", "2", "--config", "c.yaml", "--nproc=3", "--set", "train.lr=1e-3"]
    assert _without_nproc(argv) == ["train", "--config", "c.yaml", "--set", "train.lr=1e-3"]


def test_distributed_launch_refuses_no_processes():
    with pytest.raises(ValueError, match="--nproc must be at least 1"):
        launch.torchrun(0, ["train"])


def test_distributed_group_outside_torchrun_is_one_cpu_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    group = launch.init("cpu")
    try:
        assert (group.rank, group.world_size, group.device) == (0, 1, torch.device("cpu"))
        with pytest.raises(ValueError, match="train.strategy must be one of"):
            DataParallel(group, "zero3")
        with pytest.raises(ValueError, match="global batch"):
            DataParallel(group).train_loader(None, 0, 0, 0)
    finally:
        launch.shutdown()


def test_distributed_torchrec_strategy_without_the_extra_is_a_config_error_naming_the_install(monkeypatch):
    """Without TorchRec installed, train.strategy=torchrec fails before anything is built, saying how
    to install the extra (not a ModuleNotFoundError from inside the sharding)."""
    import importlib.util

    from genrec.config import TrainConfig
    from genrec.distributed import strategy
    from genrec.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchrec" else real(name, *a))
    with pytest.raises(ConfigError, match=r"TorchRec extra.*--no-deps torchrec"):
        strategy.strategy_for(launch.ProcessGroup(0, 0, 1, torch.device("cpu")), TrainConfig(strategy="torchrec"))
