"""Item and action tables sharded over the ranks with TorchRec (the optional ``genrec[torchrec]`` extra).

An item table of a production catalogue (10⁸ rows × d) does not fit, or does not fit twice, on one
GPU; data parallelism alone replicates it on every rank. TorchRec's ``DistributedModelParallel``
(DMP) shards an ``EmbeddingCollection`` row-wise or table-wise across ranks, routes each looked-up id
to the rank that owns its row (all-to-all of a ``KeyedJaggedTensor``) and wraps the rest of the
model, the dense part, in DDP.

:class:`TableLookup` is ``nn.Embedding``'s lookup over a one-table ``EmbeddingCollection``, so the
models keep calling ``self.item_emb(ids)``; :func:`shard_tables` swaps a generative ranker's item and
action tables for it and shards them. The tables learn through TorchRec's fused optimizer (applied in
the backward pass; exact SGD by default), the dense part through any optimizer. ``train.strategy: torchrec``
(:class:`genrec.distributed.strategy.ShardedTables`) trains a run this way.

Names: the sharded model's state dict holds each table under TorchRec's key
(``item_emb.collection.embeddings.item.weight``, a ``ShardedTensor``); :func:`plain_names` and
:func:`sharded_names` translate to and from the plain model's (``item_emb.weight``), so checkpoints
and exported weights read as the plain model's, in one process as on any number of ranks.

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


def tables_of(model: nn.Module) -> list[str]:
    """The tables of :data:`TABLES` that ``model`` holds as ``nn.Embedding`` lookups: the item table
    (required) and the action table where the actions are one joint code (``action_encoding:
    joint``, the default; the other encodings keep their small parameters in the dense part)."""
    found = []
    for name, path in TABLES.items():
        try:
            owner, attr = _owner(model, path)
        except AttributeError:
            continue
        if isinstance(getattr(owner, attr, None), nn.Embedding):
            found.append(name)
    if "item" not in found:
        raise ValueError(f"{type(model).__name__} has no item_emb nn.Embedding table to shard")
    return found


def shard_tables(model: nn.Module, device: torch.device, sharding: str = "row_wise", lr: float = 0.01,
                 optimizer: str = "sgd") -> nn.Module:
    """``model`` with its item and action tables sharded by DMP (``sharding``: ``row_wise`` or
    ``table_wise``; tables trained by the fused ``optimizer`` of :data:`TABLE_OPTIMIZERS` at ``lr``)
    and its dense part in DDP. The tables' current weights carry over; ``model`` itself holds the
    sharded tables afterwards. Collective: every rank calls it on the same model."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    if sharding not in ("row_wise", "table_wise"):
        raise ValueError(f"sharding must be row_wise or table_wise, got {sharding!r}")
    if optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"table optimizer must be one of {', '.join(TABLE_OPTIMIZERS)}, got {optimizer!r}")
    weights = {}
    for name in tables_of(model):
        owner, attr = _owner(model, TABLES[name])
        table = getattr(owner, attr)
        weights[name] = table.weight.detach().to("cpu", copy=True)
        setattr(owner, attr, TableLookup(name, table.num_embeddings, table.embedding_dim, torch.device("meta")))
    group = dist.group.WORLD
    sharder = EmbeddingCollectionSharder(fused_params={"optimizer": _fused_optimizer(optimizer), "learning_rate": lr})
    constraints = {name: ParameterConstraints(sharding_types=[sharding]) for name in weights}
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(model, [sharder], group)
    sharded = DistributedModelParallel(model, env=ShardingEnv.from_process_group(group), plan=plan,
                                       sharders=[sharder], device=device)
    _copy_into_shards(sharded, weights)
    return sharded


# train.table_optimizer -> fbgemm's fused optimizer: those TorchRec's CPU kernels run (its fused Adam
# kinds are CUDA only, and the CUDA fbgemm-gpu wheel cannot reach the GPU hosts here to test them)
TABLE_OPTIMIZERS = {"sgd": "EXACT_SGD", "adagrad": "EXACT_ADAGRAD", "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD"}


def _fused_optimizer(name: str):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return getattr(EmbOptimType, TABLE_OPTIMIZERS[name])


def _table_key(name: str, key: str) -> bool:
    return key.endswith(f"embeddings.{name}.weight")


TABLE_KEYS = {name: f"{'.'.join(path)}.weight" for name, path in TABLES.items()}  # table -> the plain model's key
# the plain model's key of each table <-> the sharded model's (TableLookup's collection inside)
SHARDED_KEYS = {key: key.removesuffix(".weight") + f".collection.embeddings.{name}.weight"
                for name, key in TABLE_KEYS.items()}
PLAIN_KEYS = {v: k for k, v in SHARDED_KEYS.items()}


def plain_names(state: dict) -> dict:
    """A sharded model's state dict (or its optimizer's ``state``) keyed by the plain model's names."""
    return {PLAIN_KEYS.get(k, k): v for k, v in state.items()}


def sharded_names(state: dict) -> dict:
    """The inverse of :func:`plain_names`."""
    return {SHARDED_KEYS.get(k, k): v for k, v in state.items()}


def dense_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters that the tables' fused optimizer does not train: the dense part's."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return list(in_backward_optimizer_filter(model.named_parameters()))


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


def gather_tables(sharded: nn.Module, dst: int | None = None) -> dict[str, torch.Tensor]:
    """Collective: the full item and action tables by table name (CPU), assembled from every rank's
    shards, on every rank or, with ``dst``, on that rank only (the others get ``{}``): a sharded table
    need not fit a rank, so only the rank that writes it holds it whole."""
    out = {}
    for key, value in sharded.state_dict().items():
        name = next((n for n in TABLES if _table_key(n, key)), None)
        if name is None:
            continue
        pieces = [(s.metadata.shard_offsets, s.tensor.detach().cpu()) for s in value.local_shards()]
        everyone: list | None = [None] * dist.get_world_size()
        if dst is None:
            dist.all_gather_object(everyone, pieces)
        else:
            everyone = everyone if dist.get_rank() == dst else None
            dist.gather_object(pieces, everyone, dst=dst)
            if everyone is None:
                continue
        full = torch.zeros(value.size())
        for (r, c), t in (p for rank in everyone for p in rank):
            full[r: r + t.shape[0], c: c + t.shape[1]] = t
        out[name] = full
    return out


def full_weights(sharded: nn.Module, dst: int | None = None) -> dict[str, torch.Tensor]:
    """Collective: the plain model's full state dict (CPU), the tables gathered (:func:`gather_tables`)
    on every rank or on ``dst`` only (the others get the dense part alone)."""
    tables = {TABLE_KEYS[name]: t for name, t in gather_tables(sharded, dst).items()}
    dense = {k: v.detach().cpu() for k, v in plain_names(sharded.state_dict()).items() if k not in SHARDED_KEYS}
    return dense | tables


def load_full_weights(sharded: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """The plain model's full state dict ``weights`` into the sharded model: each rank its rows."""
    tables = {name: weights[key] for name, key in TABLE_KEYS.items() if key in weights}
    own = sharded.state_dict()
    dense = {k: v for k, v in weights.items() if k not in SHARDED_KEYS}
    missing = sorted(plain_names(own).keys() - weights.keys())
    unexpected = sorted(dense.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, value in dense.items():
            own[key].copy_(value)
    _copy_into_shards(sharded, tables)
