"""TorchRec sharded tables (the genrec[torchrec] extra) on 2 gloo ranks equal the unsharded model:
the same loss, and after one SGD step on a global batch the same dense weights and table rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from genrec.data.batching import collate
from genrec.data.info import dataset_info
from genrec.models import build_model
from tests.distributed.ranks import run_ranks

pytest.importorskip("torchrec", reason="the TorchRec extra is not installed; `make test-torchrec` installs "
                    "fbgemm-gpu-cpu + torchrec (--no-deps) into .venv and runs this test")

MODEL = {"d_model": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0}
LR = 0.5  # large, so a wrong gradient scale shows in the weights
SHARDINGS = ("row_wise", "table_wise")


def _sharded_steps(rank: int, samples: list, info, out: Path) -> None:
    """One launch, both shardings: one SGD step of the sharded model on each rank's share."""
    from genrec.distributed import launch
    from genrec.distributed.sharded_tables import gather_tables, shard_tables
    from genrec.distributed.strategy import DataParallel

    group = launch.init("cpu")
    for sharding in SHARDINGS:
        torch.manual_seed(0)
        model = build_model("hstu", MODEL, info, 10)
        sharded = shard_tables(model, group.device, sharding, lr=LR)
        item = next(v for k, v in sharded.state_dict().items() if k.endswith("embeddings.item.weight"))
        rows = sum(shard.tensor.shape[0] for shard in item.local_shards())
        if sharding == "row_wise":  # each rank holds part of the table (table-wise: all of it or none)
            assert 0 < rows < item.size(0), (rank, rows)
        batch = collate(samples[rank::2])
        dense = [p for n, p in model.named_parameters() if ".collection." not in n]
        optimizer = torch.optim.SGD(dense, lr=LR)
        losses = sharded(batch)
        scale = DataParallel(group).loss_scale(batch)  # K·n_r/N, as in the trainer
        (losses["loss"] * scale).backward()
        optimizer.step()
        global_loss = (losses["loss"].detach() * scale / 2).reshape(1)
        torch.distributed.all_reduce(global_loss)
        tables = gather_tables(sharded)
        if rank == 0:
            weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if ".collection." not in n}
            save_file(weights | {f"table.{k}": v for k, v in tables.items()} | {"loss": global_loss},
                      str(out / f"{sharding}.safetensors"))
    launch.shutdown()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tiny_sequences) -> tuple[Path, list, object]:
    samples = [tiny_sequences[i] for i in range(7)]  # 4 + 3 windows: the ranks' target counts differ
    info = dataset_info(tiny_sequences.seq)
    out = tmp_path_factory.mktemp("torchrec")
    run_ranks(2, _sharded_steps, samples, info, out)
    return out, samples, info


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_distributed_torchrec_sharded_tables_equal_the_unsharded_model(sharded_runs, sharding):
    out, samples, info = sharded_runs
    got = load_file(str(out / f"{sharding}.safetensors"))

    torch.manual_seed(0)
    model = build_model("hstu", MODEL, info, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss = model(collate(samples))["loss"]
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(got["loss"][0], loss.detach(), rtol=1e-5, atol=1e-6)
    expected = dict(model.named_parameters())
    for name, value in got.items():
        if name == "loss":
            continue
        ref = {"table.item": "item_emb.weight", "table.action": "action_emb.table.weight"}.get(name, name)
        torch.testing.assert_close(value, expected[ref].detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert {"table.item", "table.action"} <= got.keys()
