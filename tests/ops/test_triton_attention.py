"""The ``triton`` backend against ``reference`` on random jagged batches of odd lengths: outputs and
the gradients of q, k, v and both bias tables, for every mask rule and for queries after a KV cache.

On a CUDA device both dtypes run (bf16 relative error <= 1e-2, fp32 <= 1e-4). Without one the HSTU
kernels still run here in fp32 under Triton's interpreter (``TRITON_INTERPRET=1``, set by the CI
script) when Triton is installed, so the kernel logic is checked on every CI run; otherwise skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

from genrec.nn.events import Events, append_candidates, dual_flow_layout, event_layout, item_action_layout
from genrec.nn.kv_cache import in_micro_batches
from genrec.ops.layout import TokenLayout
from genrec.ops.reference import attention as reference
from tests.helpers import make_batch

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not CUDA and not INTERPRET, reason="needs a CUDA device or TRITON_INTERPRET=1")
triton_backend = pytest.importorskip("genrec.ops.triton.backend") if (CUDA or INTERPRET) else None
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
LAYOUTS = ["causal", "request_causal", "dual_flow", "genrank_candidates"]
gpu_only = pytest.mark.skipif(not CUDA, reason="flex_attention, whole models and large tiles need a CUDA device")


def _layout(kind: str, lengths: list[int], seed: int) -> TokenLayout:
    ev = Events.from_batch(make_batch(lengths, seed, all_targets=False).to(DEVICE))
    if kind == "causal":
        return event_layout(ev, "causal")
    if kind == "request_causal":
        return item_action_layout(ev)
    if kind == "dual_flow":
        return dual_flow_layout(ev)
    return dual_flow_layout(ev, fake_valid=ev.target)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _run(backend, q, k, v, layout, tables, q_offset, upstream):
    """Output and gradients of (q, k, v, *tables) for the loss ``sum(out * upstream)``."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *tables)]
    bias = leaves[3:] or [None, None]
    out = backend.hstu_attention(*leaves[:3], layout, *bias, 0.05, q_offset)
    (out.float() * upstream).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _inputs(layout: TokenLayout, dtype, bias: bool, q_offset: int = 0, heads: int = 2, dim: int = 32,
            pos_buckets: int = 101):
    b, seq = layout.shape
    gen = torch.Generator(device=DEVICE).manual_seed(seq + int(bias))
    q = torch.randn(b, heads, seq - q_offset, dim, device=DEVICE, generator=gen).to(dtype)
    k, v = (torch.randn(b, heads, seq, dim, device=DEVICE, generator=gen).to(dtype) for _ in range(2))
    tables = [torch.randn(heads, pos_buckets, device=DEVICE, generator=gen) * 0.5,
              torch.randn(heads, 32, device=DEVICE, generator=gen) * 0.5] if bias else []
    upstream = torch.randn(b, heads, seq - q_offset, dim, device=DEVICE, generator=gen)
    return q, k, v, tables, upstream * layout.valid[:, None, q_offset:, None]


def _check(layout, dtype, bias, q_offset=0, dim=32, pos_buckets=101):
    q, k, v, tables, upstream = _inputs(layout, dtype, bias, q_offset, dim=dim, pos_buckets=pos_buckets)
    want, want_grads = _run(reference, q.double(), k.double(), v.double(), layout, [t.double() for t in tables],
                            q_offset, upstream.double())
    got, got_grads = _run(triton_backend, q, k, v, layout, tables, q_offset, upstream)
    valid = layout.valid[:, None, q_offset:, None]
    assert _rel_error(got * valid, want * valid) <= TOLERANCE[dtype]
    for name, g, w in zip(("q", "k", "v", "rel_pos", "rel_time"), got_grads, want_grads, strict=False):
        assert g is not None and torch.isfinite(g).all(), name
        assert _rel_error(g, w) <= TOLERANCE[dtype], name


@pytest.fixture(params=[False, True], ids=["dq_atomic", "dq_kernel"])
def dq_mode(request, monkeypatch):
    """Both dQ strategies of the backward pass."""
    from genrec.ops.triton import hstu

    monkeypatch.setattr(hstu, "DQ_SEPARATE", request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_hstu_attention_matches_reference(kind, dtype, bias, dq_mode):
    _check(_layout(kind, [37, 90, 5, 61] if CUDA else [37, 9, 21], seed=len(kind) + int(bias)), dtype, bias)


@pytest.mark.parametrize("kind", ["causal", "dual_flow"])
def test_hstu_attention_with_a_clamped_position_table_matches_reference(kind):
    """A 150-event sequence against 9 position buckets: most pairs share the last, clamped bucket,
    and (dual flow) a tile holds real events 128..149 beside fake ones 0..41."""
    _check(_layout(kind, [150, 7], seed=5), DTYPES[0], bias=True, pos_buckets=9)


@gpu_only
@pytest.mark.parametrize("kind", ["causal", "dual_flow"])
@pytest.mark.parametrize("bias", [True, False])
def test_hstu_attention_with_the_large_tiles_matches_reference(kind, bias):
    """Head dim 128 selects the other tile table (the benchmark's shapes); bf16 and the default dQ
    kernel only, as each tile configuration costs seconds of compilation per dtype and strategy."""
    _check(_layout(kind, [37, 200, 5, 161], seed=9), torch.bfloat16, bias, dim=128)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["request_causal", "dual_flow"])
def test_hstu_attention_after_a_kv_cache_matches_reference(kind, dtype, dq_mode):
    """Queries = the 7 candidates appended after each history (HSTU and DFGR serving)."""
    ev = Events.from_batch(make_batch([37, 9, 21], seed=11).to(DEVICE))
    history = item_action_layout(ev) if kind == "request_causal" else event_layout(ev, "dual_flow")
    layout = append_candidates(history, ev, 7, fake=kind == "dual_flow")
    _check(layout, dtype, bias=True, q_offset=history.shape[1])



@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_flex_softmax_attention_matches_reference(kind, dtype):
    layout = _layout(kind, [37, 90, 5, 61], seed=3)
    q, k, v, _, upstream = _inputs(layout, dtype, bias=False)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    outs = []
    for backend, cast in ((reference, torch.double), (triton_backend, dtype)):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = backend.softmax_attention(*leaves, layout, slopes)
        (out.float() * upstream).sum().backward()
        outs.append((out.detach(), [t.grad for t in leaves]))
    valid = layout.valid[:, None, :, None]
    assert _rel_error(outs[1][0] * valid, outs[0][0] * valid) <= TOLERANCE[dtype]
    for g, w in zip(outs[1][1], outs[0][1], strict=True):
        assert _rel_error(g, w) <= TOLERANCE[dtype]


@gpu_only
@pytest.mark.parametrize("name", ["hstu", "dfgr", "genrank"])
def test_models_give_the_same_predictions_and_gradients_on_both_backends(name):
    from genrec.models import build_model
    from tests.models.test_generative import INFO

    batch = make_batch([37, 90, 5, 61], seed=5).to(DEVICE)
    got = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        args = {"d_model": 64, "num_heads": 2, "num_layers": 2, "dropout": 0.0, "attention_backend": backend}
        model = build_model(name, args, INFO, 128).to(DEVICE)
        loss = model(batch)["loss"]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad():
            logits = model.rank_logits(batch)
            cands = torch.randint(1, 41, (4, 9), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
            when = batch.timestamps[batch.offsets[1:] - 1] + 60
            if model.kv_serving is not None:  # KV-cache serving in micro-batches of 4
                served = in_micro_batches(model.kv_serving.score_cached, model.kv_serving.encode_history(batch, 4),
                                          cands, when)
            else:
                served = model.score(batch, cands, when)
        got[backend] = (logits, grads, served)
    (ref_logits, ref_grads, ref_served), (logits, grads, served) = got["reference"], got["triton"]
    assert _rel_error(logits, ref_logits) <= 1e-4
    assert _rel_error(grads, ref_grads) <= 1e-4
    assert _rel_error(served, ref_served) <= 1e-4
