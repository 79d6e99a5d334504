"""The HSTU block queried from a suffix (``queries_from``: DFGR's last block reads its fake flow only)
gives that suffix of the whole block's output and the same gradients through it, on the reference
backend and on the fused kernels (the CPU interpreter, or the GPU)."""

from __future__ import annotations

import pytest
import torch

from genrec.nn import events
from genrec.nn.events import Events
from genrec.nn.hstu import HSTUBlock
from genrec.nn.kv_cache import LayerCache
from genrec.ops.dispatch import REFERENCE
from tests.helpers import make_batch
from tests.ops.triton.test_hstu import DEVICE, backend_module


def _backends() -> list:
    no_triton = pytest.mark.skipif(backend_module is None, reason="no Triton here (neither a GPU nor the interpreter)")
    return ["reference", pytest.param("triton", marks=no_triton)]


def _block(backend: str, dtype: torch.dtype, bias: bool) -> HSTUBlock:
    torch.manual_seed(0)
    chosen = REFERENCE if backend == "reference" else backend_module.TRITON
    block = HSTUBlock(32, 2, 0.0, 0.05, chosen, num_position_buckets=64, relative_bias=bias).to(DEVICE, dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sparse", [True, False])  # [real N | fake T] or [real N | fake N]
def test_a_block_queried_from_the_fake_flow_gives_the_whole_blocks_suffix_and_gradients(backend, bias, sparse):
    dtype = torch.float64 if backend == "reference" else torch.float32
    batch = make_batch([13, 2, 29, 7], seed=3, all_targets=False).to(DEVICE)
    ev = Events.from_batch(batch)
    layout = events.target_dual_flow_layout(ev)[0] if sparse else events.dual_flow_layout(ev)
    n = ev.valid.shape[1]
    block = _block(backend, dtype, bias)
    x = torch.randn(*layout.shape, 32, device=DEVICE, dtype=dtype)
    upstream = torch.randn(layout.shape[0], layout.shape[1] - n, 32, device=DEVICE, dtype=dtype)
    upstream = upstream * layout.valid[:, n:, None]  # padding's outputs are not compared

    def run(queries_from: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        block.zero_grad()
        leaf = x.clone().requires_grad_()
        out = block(leaf, layout, queries_from=queries_from)
        suffix = out if queries_from else out[:, n:]
        (suffix * upstream).sum().backward()
        return suffix.detach(), [leaf.grad, *(p.grad for p in block.parameters())]

    (got, got_grads), (want, want_grads) = run(n), run(0)
    assert got.shape == (layout.shape[0], layout.shape[1] - n, 32)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(got * layout.valid[:, n:, None], want * layout.valid[:, n:, None], **tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tol)


def test_queries_from_and_a_kv_cache_are_refused_together():
    block = _block("reference", torch.float64, True)
    ev = Events.from_batch(make_batch([5], seed=1).to(DEVICE))
    layout = events.event_layout(ev, "dual_flow")
    x = torch.zeros(1, 5, 32, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="queries_from and a KV cache"):
        block(x, layout, LayerCache(capacity=0), queries_from=2)
