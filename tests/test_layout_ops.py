"""benchmarks/layout_ops.py on the CPU: every stage of a small layout build is counted, and the
prepared copy is one host-to-device copy per distinct tensor of the loader's plan."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
layout_ops = pytest.importorskip("layout_ops")


@pytest.mark.parametrize("name", ["hstu", "dfgr_sparse"])
@pytest.mark.parametrize("head_dim", [32, 128])  # with and without the band kernel's schedule
def test_each_stage_is_counted_and_the_prepared_copy_moves_each_tensor_once(name, head_dim):
    from genrec.nn.events import Events
    from genrec.ops.triton import hstu

    rows, callers = layout_ops.count(name, 64, 2, head_dim)
    ops = {r["stage"]: r["ops"] for r in rows}
    assert list(ops) == list(layout_ops.STAGES) and all(ops.values()), ops
    assert all(r["launching"] == r["ops"] - r["views"] for r in rows)
    assert not any(c.endswith("from_layout") for c in callers)  # the metadata is its own stage
    data = layout_ops.speed.synthetic_batch(2, 64, 0, device="cpu", target_share=0.1 if name == "dfgr_sparse" else 1)
    host = layout_ops.speed.TRAIN_LAYOUTS[name](Events.from_batch(data))
    prepared = host.prepared(hstu.prepare_attention(host, head_dim, torch.bfloat16, 65, 32, grads=True))
    distinct: dict[int, None] = {}

    def flat(v) -> None:
        if isinstance(v, torch.Tensor):
            distinct[id(v)] = None
        else:
            for x in v:
                flat(x)
    flat(list(prepared.entries.values()))
    assert ops["prepared_copy"] == len(distinct)
