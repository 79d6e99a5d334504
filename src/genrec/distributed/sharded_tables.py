"""Item and action tables sharded over the ranks with TorchRec (the optional ``genrec[torchrec]`` extra).

An item table of a production catalogue (10⁸ rows × d) does not fit, or does not fit twice, on one
GPU; data parallelism alone replicates it on every rank. TorchRec's ``DistributedModelParallel``
(DMP) shards an ``EmbeddingCollection`` row-wise or table-wise across ranks, routes each looked-up id
to the rank that owns its row (all-to-all of a ``KeyedJaggedTensor``) and wraps the rest of the
model, the dense part, in DDP.

:class:`TableLookup` is ``nn.Embedding``'s lookup over a one-table ``EmbeddingCollection``, so the
models keep calling ``self.item_emb(ids)``; :func:`shard_tables` swaps a generative ranker's item and
action tables for it and shards them. The tables learn through TorchRec's fused optimizer (applied in
the backward pass; here exact SGD at a fixed learning rate), the dense part through any optimizer.

Gradients: TorchRec divides the table gradients it routes back by the world size (its default
gradient division), so tables and the DDP part both see the *average* over ranks, and the trainer's
weighting (rank r's loss × K·n_r/N, :meth:`genrec.distributed.strategy.DataParallel.loss_scale`)
makes both exactly the global batch's gradient (tested on 2 gloo ranks against the unsharded model).

Install (the trap: ``pip install torchrec`` pulls the multi-GB CUDA ``fbgemm-gpu``): the extra
``pip install 'genrec[torchrec]'`` brings the CPU ``fbgemm-gpu-cpu==1.8.0`` (paired with torch 2.13)
and torchrec's other dependencies, then ``pip install --no-deps torchrec==1.8.0``; ``make
test-torchrec`` does both and runs the test. On a CUDA host use the ``fbgemm-gpu`` build of the
same version instead of ``fbgemm-gpu-cpu``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

TABLES = {"item": ("item_emb",), "action": ("action_emb", "table")}  # table name -> attribute path


class TableLookup(nn.Module):
    """``nn.Embedding(ids)`` (any shape of ids -> ``[*ids.shape, D]``) through a TorchRec
    ``EmbeddingCollection`` holding one table, one id per bag::

        ids       [[3, 7], [7, 0]]            -> KJT values [3, 7, 7, 0], lengths [1, 1, 1, 1]
        output    [2, 2, D]
    """

    def __init__(self, name: str, num_embeddings: int, dim: int, device: torch.device):
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.feature = name
        self.collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=num_embeddings,
                                    feature_names=[name])], device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        flat = ids.reshape(-1)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[self.feature], values=flat,
                                                  lengths=torch.ones_like(flat, dtype=torch.int32))
        return self.collection(kjt)[self.feature].values().view(*ids.shape, -1)


def _owner(model: nn.Module, path: tuple[str, ...]) -> tuple[nn.Module, str]:
    for attr in path[:-1]:
        model = getattr(model, attr)
    return model, path[-1]


def shard_tables(model: nn.Module, device: torch.device, sharding: str = "row_wise", lr: float = 0.01) -> nn.Module:
    """``model`` with its item and action tables sharded by DMP (``sharding``: ``row_wise`` or
    ``table_wise``; tables trained by fused exact SGD at ``lr``) and its dense part in DDP.
    The tables' current weights carry over. Collective: every rank calls it on the same model."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    if sharding not in ("row_wise", "table_wise"):
        raise ValueError(f"sharding must be row_wise or table_wise, got {sharding!r}")
    weights = {}
    for name, path in TABLES.items():
        owner, attr = _owner(model, path)
        table = getattr(owner, attr)
        if not isinstance(table, nn.Embedding):
            raise ValueError(f"{type(model).__name__}.{'.'.join(path)} is not an nn.Embedding table")
        weights[name] = table.weight.detach().to("cpu", copy=True)
        setattr(owner, attr, TableLookup(name, table.num_embeddings, table.embedding_dim, torch.device("meta")))
    group = dist.group.WORLD
    sharder = EmbeddingCollectionSharder(fused_params={"optimizer": _exact_sgd(), "learning_rate": lr})
    constraints = {name: ParameterConstraints(sharding_types=[sharding]) for name in TABLES}
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(model, [sharder], group)
    sharded = DistributedModelParallel(model, env=ShardingEnv.from_process_group(group), plan=plan,
                                       sharders=[sharder], device=device)
    _copy_into_shards(sharded, weights)
    return sharded


def _exact_sgd():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return EmbOptimType.EXACT_SGD


def _table_key(name: str, key: str) -> bool:
    return key.endswith(f"embeddings.{name}.weight")


def _copy_into_shards(sharded: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Each rank writes its rows (its shards) of the full tables ``weights``."""
    for key, value in sharded.state_dict().items():
        name = next((n for n in weights if _table_key(n, key)), None)
        if name is None:
            continue
        for shard in value.local_shards():
            (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            with torch.no_grad():
                shard.tensor.copy_(weights[name][r: r + h, c: c + w])


def gather_tables(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full item and action tables, assembled from every rank's shards (on every rank)."""
    out = {}
    for key, value in sharded.state_dict().items():
        name = next((n for n in TABLES if _table_key(n, key)), None)
        if name is None:
            continue
        pieces = [(s.metadata.shard_offsets, s.tensor.detach().cpu()) for s in value.local_shards()]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, pieces)
        full = torch.zeros(value.size())
        for (r, c), t in (p for rank in everyone for p in rank):
            full[r: r + t.shape[0], c: c + t.shape[1]] = t
        out[name] = full
    return out
