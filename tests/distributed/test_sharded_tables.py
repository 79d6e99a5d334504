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


def _sharded_step(rank: int, samples: list, info, sharding: str, out: Path) -> None:
    from genrec.distributed import launch
    from genrec.distributed.sharded_tables import gather_tables, shard_tables
    from genrec.distributed.strategy import DataParallel

    group = launch.init("cpu")
    torch.manual_seed(0)
    model = build_model("hstu", MODEL, info, 10)
    sharded = shard_tables(model, group.device, sharding, lr=LR)
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
        save_file(weights | {f"table.{k}": v for k, v in tables.items()} | {"loss": global_loss}, str(out))
    launch.shutdown()


@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_distributed_torchrec_sharded_tables_equal_the_unsharded_model(tmp_path, tiny_sequences, sharding):
    samples = [tiny_sequences[i] for i in range(7)]  # 4 + 3 windows: the ranks' target counts differ
    info = dataset_info(tiny_sequences.seq)
    run_ranks(2, _sharded_step, samples, info, sharding, tmp_path / "sharded.safetensors")
    got = load_file(str(tmp_path / "sharded.safetensors"))

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
