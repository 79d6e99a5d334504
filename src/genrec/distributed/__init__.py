"""Training on several processes with PyTorch's own stack: torchrun, DDP, FSDP2 or TorchRec-sharded
tables, DCP checkpoints.

Floors: this room sits above ``train/`` (it implements :class:`genrec.train.strategy.Strategy`) and
below ``cli.py``. Single-process code never imports it.

* :mod:`.launch` — process-group set-up from torchrun's environment, ``genrec train --nproc K``.
* :mod:`.sampler` — each rank's share of every global batch.
* :mod:`.strategy` — DDP / FSDP2 wrapping or sharded tables (``train.strategy``), loss weighting, exact
  metric reduction.
* :mod:`.evaluate` — evaluation sharded by batch and reduced to the single-process numbers.
* :mod:`.checkpoint` — ``torch.distributed.checkpoint`` saves that load with any number of ranks.
* :mod:`.run` — ``genrec train`` as one process or as one rank, picked from the environment.
* :mod:`.sharded_tables` — item/action tables sharded with TorchRec (the optional ``genrec[torchrec]``).
"""
