"""The ``triton`` backend against ``reference`` on random jagged batches of odd lengths: outputs and
the gradients of q, k, v and both bias tables, for every mask rule and for queries after a KV cache;
and the fused attention as a custom op that ``torch.compile`` and ``torch.export`` trace.

On a CUDA device everything runs, both dtypes (bf16 relative error <= 1e-2, fp32 <= 1e-4), over a
seeded sweep of random jagged shapes. Without one, when Triton is installed (the ``dev`` extra), the
HSTU kernels run on CPU tensors under Triton's interpreter, which tests/conftest.py switches on
(``TRITON_INTERPRET=1``, read when Triton is imported): fp32, a few small shapes per rule that
still span several 64-token tiles, so the kernels' logic — mask rules, tile schedule, bias and its
gradients, both dQ strategies, the custom ops and their autograd — is checked on every CI run in
about a minute. The interpreter runs the kernels' arithmetic in NumPy: it cannot show what only the
GPU compiler decides (shared memory, the bf16 tanh path, tile sizes above 64), which is what the
``gpu_only`` tests are for. flex_attention, whole models and CUDA graphs need the GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from genrec.nn import events
from genrec.nn.events import Events, append_candidates, dual_flow_layout, event_layout, item_action_layout
from genrec.nn.kv_cache import in_micro_batches
from genrec.ops.layout import TokenLayout
from genrec.ops.reference import attention as reference
from tests.helpers import make_batch

CUDA = torch.cuda.is_available()
INTERPRET = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"  # set by tests/conftest.py when Triton is here
pytestmark = pytest.mark.skipif(not CUDA and not INTERPRET,
                                reason="needs a CUDA device, or Triton (the dev extra) for its CPU interpreter")
backend_module = pytest.importorskip("genrec.ops.triton.backend") if (CUDA or INTERPRET) else None
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
LAYOUTS = {"causal": "causal", "request_causal": "request_causal", "dual_flow": "dual_flow",
           "genrank_candidates": "dual_flow", "dfgr_target_fake_flow": "dual_flow"}  # layout -> its mask rule
gpu_only = pytest.mark.skipif(not CUDA, reason="flex_attention, whole models, large tiles and CUDA graphs need a "
                              "CUDA device (the CPU interpreter runs the HSTU kernels only)")


def random_lengths(seed: int, count: int, longest: int) -> list[int]:
    """A seeded jagged batch shape: ``count`` sequences of 1..longest events, one of them > 64 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest + 1, count).tolist()
    lengths[int(rng.integers(0, count))] = longest
    return lengths


# GPU: a sweep of seeded random shapes per rule; interpreter: one small one (3 sequences, up to 70 events).
SHAPE_SEEDS = range(6) if CUDA else range(1)


def _shape(seed: int) -> list[int]:
    return random_lengths(seed, 5, 200) if CUDA else random_lengths(seed, 3, 70)


def _layout(kind: str, lengths: list[int], seed: int) -> TokenLayout:
    ev = Events.from_batch(make_batch(lengths, seed, all_targets=False).to(DEVICE))
    if kind == "causal":
        return event_layout(ev, "causal")
    if kind == "request_causal":
        return item_action_layout(ev)
    if kind == "dual_flow":
        return dual_flow_layout(ev)
    if kind == "dfgr_target_fake_flow":  # [real N | fake T]: DFGR's fake flow of the target events only
        return events.target_dual_flow_layout(ev)[0]
    return dual_flow_layout(ev, fake_valid=ev.target)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _run(attention, q, k, v, layout, tables, q_offset, upstream):
    """Output and gradients of (q, k, v, *tables) for the loss ``sum(out * upstream)``."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *tables)]
    bias = leaves[3:] or [None, None]
    out = attention(*leaves[:3], layout, *bias, 0.05, q_offset)
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


def _check(layout, dtype, bias, q_offset=0, dim=32, pos_buckets=101, backend=None):
    backend = backend or backend_module.TRITON
    q, k, v, tables, upstream = _inputs(layout, dtype, bias, q_offset, dim=dim, pos_buckets=pos_buckets)
    want, want_grads = _run(reference.hstu_attention, q.double(), k.double(), v.double(), layout,
                            [t.double() for t in tables], q_offset, upstream.double())
    got, got_grads = _run(backend.hstu_attention, q, k, v, layout, tables, q_offset, upstream)
    valid = layout.valid[:, None, q_offset:, None]
    assert _rel_error(got * valid, want * valid) <= TOLERANCE[dtype]
    for name, g, w in zip(("q", "k", "v", "rel_pos", "rel_time"), got_grads, want_grads, strict=False):
        assert g is not None and torch.isfinite(g).all(), name
        assert _rel_error(g, w) <= TOLERANCE[dtype], name


def _backend(dq_separate: bool):
    """The triton backend with one dQ strategy at every head dim."""
    from genrec.ops.triton.hstu import KernelConfig

    return backend_module.triton_backend(KernelConfig(dq_separate=dq_separate, dq_separate_small=dq_separate))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(LAYOUTS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", SHAPE_SEEDS)
def test_hstu_attention_matches_reference(kind, dtype, bias, seed):
    """Random jagged shapes (seeded), the default dQ strategy (at head dim 32: dQ in the dK/dV
    kernel); without the bias too (a model setting, ``relative_bias``), whose kernels are compiled
    without its code."""
    _check(_layout(kind, _shape(seed + 7 * len(kind)), seed=len(kind) + int(bias)), dtype, bias)


@pytest.mark.parametrize("kind", ["dual_flow"] if INTERPRET else list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False] if CUDA else [True])
def test_hstu_attention_with_the_separate_dq_kernel_matches_reference(kind, dtype, bias):
    """The other dQ strategy at head dim 32: dQ by its own kernel (the default at 128)."""
    lengths = [37, 90, 5, 61] if CUDA else [37, 9, 21]
    _check(_layout(kind, lengths, seed=2), dtype, bias=bias, backend=_backend(dq_separate=True))


@pytest.mark.parametrize("kind", ["causal", "dfgr_target_fake_flow"])
@pytest.mark.parametrize("longest", [64, 61])
def test_a_layout_length_on_or_off_a_multiple_of_16_matches_reference(kind, longest):
    """The kernels read the per-token fields from rows padded to a multiple of 16 and mask those loads
    by the padded length: a layout whose length is one (64 events, causal) and one whose length is
    not (61), with the bias, both dQ strategies where the GPU runs them."""
    from genrec.ops.triton.hstu import KernelMeta, _aligned_rows

    layout = _layout(kind, [longest, 30, 7], seed=longest)
    rows = _aligned_rows(KernelMeta.from_layout(layout))
    length = layout.shape[1]
    assert all(r.shape == (3, length + -length % 16) and r.is_contiguous() for r in rows)
    assert not any(r[:, length:].any() for r in rows)  # the padding: zeros, so invalid tokens (flags 0)
    for separate in (True, False) if CUDA else (True,):
        _check(layout, DTYPES[-1], bias=True, backend=_backend(dq_separate=separate))


@pytest.mark.parametrize("kind", ["causal", "dual_flow"])
def test_hstu_attention_with_a_clamped_position_table_matches_reference(kind):
    """A 150-event sequence against 9 position buckets: most pairs share the last, clamped bucket,
    and (dual flow) a tile holds real events 128..149 beside fake ones 0..41."""
    _check(_layout(kind, [150, 7], seed=5), DTYPES[0], bias=True, pos_buckets=9)


def _bias_form_layout(positions: str) -> TokenLayout:
    """Two causal sequences (256 and 150 tokens: four 64-token tiles, the third partial in the second)
    whose timestamps put one, two and many time buckets into different tile pairs, among them pairs
    past the position table in one bucket (tile 2 against 0) and in many (tile 3 against 0 and 1:
    its times spread over a factor of 9, straddling tile 1's); ``positions`` "consecutive" (one
    per token; the diagonal-band kernel's pairs), "jump" (consecutive, 7 skipped from tile 2 on: a
    band's pairs at two offsets), "pairs" (two tokens per position: the one-hot gradient path),
    "skips" (one position skipped every 16 tokens: a tile's positions span 66, the one-hot path
    with the few tokens past its 64 slots added per pair, as DFGR's fake tiles) or "spread" (3 apart: a tile
    spans more positions than it has tokens, the per-pair path)."""
    idx = torch.arange(256)
    ts = torch.where(idx < 64, idx, torch.where(idx < 128, 2**20 + idx - 64, 3 * 2**20 + idx - 128))
    ts = torch.where(idx < 192, ts, 2**18 + (idx - 192) * 2**15)
    pos = {"consecutive": idx, "jump": torch.where(idx < 128, idx, idx + 7), "pairs": idx // 2,
           "skips": idx + idx // 16, "spread": 3 * idx}[positions]
    valid = torch.stack([idx < 256, idx < 150])
    return TokenLayout(valid=valid.to(DEVICE), request=idx.expand(2, -1).to(DEVICE), event=idx.expand(2, -1).to(DEVICE),
                       fake=torch.zeros(2, 256, dtype=torch.bool, device=DEVICE), position=pos.expand(2, -1).to(DEVICE),
                       timestamp=ts.expand(2, -1).to(DEVICE), rule="causal")


@pytest.mark.parametrize("forward_tiles", [64, 16])
@pytest.mark.parametrize("positions", ["consecutive", "jump", "pairs", "skips", "spread"])
def test_every_bias_form_of_a_tile_matches_reference(positions, forward_tiles):
    """The kernels pick a tile's bias form from its flags (one value, one comparison or one read per
    pair; the gradient by tile sum, diagonal sums, one-hot products or per pair): this layout holds
    each of them, which the test checks it does before comparing with the reference. With 16-token
    forward and dQ tiles the forms are decided per smaller tile, and the dQ kernel's share of the
    bias gradients covers half of a dK/dV pair: no longer split (one kernel adds them all)."""
    from genrec.ops.masks import time_bucket

    layout = _bias_form_layout(positions)
    ts, pos = layout.timestamp[0], layout.position[0]
    buckets = {(q, k): len(torch.unique(time_bucket(ts[q * 64:(q + 1) * 64, None] - ts[None, k * 64:(k + 1) * 64],
                                                    32))) for q in range(4) for k in range(q + 1)}
    assert {1, 2} <= set(buckets.values()) and max(buckets.values()) >= 3, buckets
    if positions == "consecutive":  # past a 40-slot table: the one-value form, and its gradient summed per tile
        far = {(q, k) for q, k in buckets if pos[q * 64:(q + 1) * 64].min() - pos[k * 64:(k + 1) * 64].max() >= 40 - 1}
        assert buckets[2, 0] == 1 and (3, 0) in far and buckets[3, 0] >= 3, (far, buckets)
    spans = {int(pos[t * 64:(t + 1) * 64].max() - pos[t * 64:(t + 1) * 64].min()) for t in range(4)}
    want = {"consecutive": {63}, "jump": {63}, "pairs": {31}, "skips": {66}, "spread": {189}}[positions]
    assert spans == want, spans
    from genrec.ops.triton import hstu

    small = (16, 16, 4, 1)
    tiles = {} if forward_tiles == 64 else dict(fwd=small, dq=small, fwd_large=small, dq_large=small)
    config = hstu.KernelConfig(dq_separate_small=True, **tiles)  # the dQ kernel, which takes its share
    split = hstu._splits_bias_grads(True, config.separates_dq(32), *config.tiles(32)[1:])
    count, index, _ = hstu._bias_flags(layout, True, config.separates_dq(32), config.tiles(32), 0, 40, 32, split,
                                       bands=True)[3]
    band_pairs = {(b, band - 3 + int(index[b, band, i]), int(index[b, band, i]))  # (row, query tile, key tile)
                  for b, band in count[..., 0].nonzero().tolist() for i in range(int(count[b, band, 0]))}
    offsets = {(q - k, int(pos[q * 64] - pos[k * 64])) for b, q, k in band_pairs}  # (band, offset)
    assert bool(band_pairs) == (positions in ("consecutive", "jump")), band_pairs
    assert (len(offsets) > len({band for band, _ in offsets})) == (positions == "jump"), offsets
    _check(layout, DTYPES[0], bias=True, pos_buckets=40, backend=backend_module.triton_backend(config))


def test_time_differences_at_every_bucket_edge_match_reference():
    """The kernels' time bucket (fp32 arithmetic on the GPU, integers in the interpreter) against the
    reference at each bucket's first second and the one before, 2^t - 1 and 2^t - 2 for t = 1..30,
    and at the widest span a batch may hold (2^31 - 1 s: bucket 31, where the kernels had capped it at
    30); a second sequence runs backwards in time (every read pair in bucket 0). A table slot per
    distance: every tile pair reads its buckets per pair."""
    edges = [0] + [e for t in range(1, 31) for e in (2**t - 2, 2**t - 1)] + [2**31 - 1]  # 62 times, ascending
    ts = torch.tensor([edges, edges[::-1]], dtype=torch.long)
    n = ts.shape[1]
    idx = torch.arange(n).expand(2, -1)
    layout = TokenLayout(valid=torch.ones(2, n, dtype=torch.bool, device=DEVICE), request=idx.to(DEVICE),
                         event=idx.to(DEVICE), fake=torch.zeros(2, n, dtype=torch.bool, device=DEVICE),
                         position=idx.to(DEVICE), timestamp=ts.to(DEVICE), rule="causal")
    _check(layout, DTYPES[0], bias=True, pos_buckets=n + 1)


@pytest.mark.parametrize("dq_rows", [64, 128])
def test_bias_gradients_shared_by_the_dq_and_bias_gradient_kernels_match_reference(dq_rows):
    """Pairs past a 9-slot position table in at most two time buckets get their bias gradients from
    the dQ kernel (row sums of its score gradients), the others from the bias-gradient kernel, which
    skips the first: a pair counted twice or never would show in the tables' gradients. Quadratic
    timestamps make one query tile's flagged pairs fall from one bucket into a pair of lower ones
    (the dQ kernel's per-bucket registers change), which the test checks before comparing."""
    from genrec.ops.masks import time_bucket
    from genrec.ops.triton.hstu import KernelConfig
    from genrec.ops.triton.tiles import KernelMeta, bias_forms, simple_bias_pairs, tile_extremes

    idx = torch.arange(320)
    layout = TokenLayout(valid=torch.stack([idx < 320, idx < 250]).to(DEVICE), request=idx.expand(2, -1).to(DEVICE),
                         event=idx.expand(2, -1).to(DEVICE), fake=torch.zeros(2, 320, dtype=torch.bool, device=DEVICE),
                         position=idx.expand(2, -1).to(DEVICE), timestamp=(40 * idx**2).expand(2, -1).to(DEVICE),
                         rule="causal")
    meta = KernelMeta.from_layout(layout)
    forms = bias_forms(tile_extremes(meta, 0, dq_rows), tile_extremes(meta, 0, 64), 9, 32)
    flagged = simple_bias_pairs(forms)[0].cpu()
    ts = layout.timestamp[0].cpu()
    lowest, forms = set(), set()
    for qt, kt in flagged.nonzero().tolist():
        buckets = time_bucket(ts[qt * dq_rows:(qt + 1) * dq_rows, None] - ts[None, kt * 64:(kt + 1) * 64], 32)
        forms.add(len(torch.unique(buckets)))
        lowest.add((qt, int(buckets.min())))
    assert forms == {1, 2} and len(lowest) > len({qt for qt, _ in lowest}), (forms, lowest)
    tile = (dq_rows, 64, 4, 1)
    _check(layout, DTYPES[0], bias=True, pos_buckets=9,
           backend=backend_module.triton_backend(KernelConfig(dq=tile, dq_large=tile, dq_fp32_large=tile,
                                                              dq_separate_small=True)))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("kind", ["causal", "dual_flow"])
@pytest.mark.parametrize("bias", [True, False])
def test_hstu_attention_over_dtypes_and_head_dims_matches_reference(kind, dtype, dim, bias):
    """Every dtype x head dim: each selects its tile table (KernelConfig.tiles), whose shared memory
    only the GPU compiler decides (float32 at head dim 128 once asked more than an SM has)."""
    _check(_layout(kind, [37, 200, 5, 161], seed=9), dtype, bias, dim=dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["request_causal", "dual_flow"])
@pytest.mark.parametrize("dq_separate", [True, False])
def test_hstu_attention_after_a_kv_cache_matches_reference(kind, dtype, dq_separate):
    """Queries = the 7 candidates appended after each history (HSTU and DFGR serving)."""
    ev = Events.from_batch(make_batch([37, 9, 21], seed=11).to(DEVICE))
    history = item_action_layout(ev) if kind == "request_causal" else event_layout(ev, "dual_flow")
    layout = append_candidates(history, ev, 7, fake=kind == "dual_flow")
    _check(layout, dtype, bias=True, q_offset=history.shape[1], backend=_backend(dq_separate))


def _op_args(layout: TokenLayout, bias: bool = True):
    q, k, v, tables, _ = _inputs(layout, torch.float32, bias)
    return q, k, v, tables


def test_the_fused_attention_passes_the_custom_op_checks():
    """torch.library.opcheck: schema, fake (meta) implementation against the real kernels, autograd
    registration and AOT dispatch, on one small dual-flow batch; the backward op too (a compiled
    training step calls it from its graph), with its packed lists as the forward's autograd passes them."""
    from genrec.ops.triton import hstu

    layout = _layout("dual_flow", [20, 6], seed=1)
    q, k, v, (rel_pos, rel_time) = _op_args(layout)
    meta = hstu.KernelMeta.from_layout(layout)
    tile = hstu.DEFAULT_CONFIG.tiles(32)
    fwd, bwd, dq, bands, q_ext, k_ext = hstu._bias_flags(layout, True, True, tile, 0, rel_pos.shape[-1],
                                                         rel_time.shape[-1], split=True, bands=True)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
            [meta.request, meta.event, meta.flags, meta.position, meta.timestamp, q_ext, k_ext],
            rel_pos.requires_grad_(), rel_time.requires_grad_(), [*fwd, *bwd, *dq, *bands],
            0.05, 0, 2, True, [*tile[0], *tile[1], *tile[2]], True)
    torch.library.opcheck(torch.ops.genrec.hstu_attention_fwd.default, args)
    grad_out = torch.randn_like(q)
    bwd_args = (grad_out, *(t.detach() for t in (q, k, v)), args[3], rel_pos.detach(), rel_time.detach(),
                [*bwd, *dq, *bands], 0.05, 0, 2, True, [*tile[1], *tile[2]], True)
    torch.library.opcheck(torch.ops.genrec.hstu_attention_bwd.default, bwd_args)


def test_a_block_on_the_triton_backend_compiles_into_one_graph_and_matches_eager():
    """torch.compile(fullgraph=True) of an HSTU block on the triton backend: the attention (layout
    metadata, tile schedule, the custom op and its backward) traces without a graph break."""
    from genrec.nn.hstu import HSTUBlock

    torch.manual_seed(0)
    block = HSTUBlock(64, 2, 0.0, 0.01, backend_module.TRITON, num_position_buckets=64).to(DEVICE)
    with torch.no_grad():
        block.rel_pos.normal_(0, 0.5)
        block.rel_time.normal_(0, 0.5)
    layout = _layout("dual_flow", [20, 6], seed=3)
    x = torch.randn(*layout.shape, 64, device=DEVICE, requires_grad=True)
    eager = block(x, layout)
    eager.sum().backward()
    want = [x.grad.clone(), block.rel_pos.grad.clone()]
    x.grad = block.rel_pos.grad = None
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if INTERPRET else "inductor")
    fresh = TokenLayout(layout.valid, layout.request, layout.event, layout.fake, layout.position, layout.timestamp,
                        layout.rule)  # no cached schedule: the compiled graph builds its own
    out = compiled(x, fresh)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, want[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(block.rel_pos.grad, want[1], rtol=1e-4, atol=1e-5)


def test_a_block_on_the_triton_backend_exports():
    """torch.export of an HSTU block on the triton backend: one custom-op node per attention call,
    traced through its fake implementation; the exported program gives the eager output."""
    from genrec.nn.hstu import HSTUBlock

    class Wrapped(torch.nn.Module):  # export takes tensors: rebuild the layout from its fields
        def __init__(self):
            super().__init__()
            self.block = HSTUBlock(32, 2, 0.0, 0.01, backend_module.TRITON)

        def forward(self, x, valid, request, event, fake, position, timestamp):
            return self.block(x, TokenLayout(valid, request, event, fake, position, timestamp, "request_causal"))

    torch.manual_seed(0)
    model = Wrapped().to(DEVICE).eval()
    layout = _layout("request_causal", [9, 4], seed=4)
    fields = (layout.valid, layout.request, layout.event, layout.fake, layout.position, layout.timestamp)
    x = torch.randn(*layout.shape, 32, device=DEVICE)
    with torch.no_grad():
        program = torch.export.export(model, (x, *fields))
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert sum("genrec.hstu_attention_fwd" in t for t in targets) == 1, targets
        torch.testing.assert_close(program.module()(x, *fields), model(x, *fields), rtol=1e-5, atol=1e-6)


@gpu_only
@pytest.mark.parametrize("name, preset", [("hstu", {}), ("dfgr", {}), ("dfgr", {"fake_flow": "targets"})],
                         ids=["hstu", "dfgr", "dfgr_sparse"])
def test_a_compiled_training_step_on_the_triton_backend_has_no_graph_break_in_the_attention(name, preset):
    """torch.compile of a whole model's training step (with the trainer's inductor options): every
    graph break dynamo reports happens outside the attention (the batch's jagged bookkeeping reads
    lengths on the host), and the compiled loss and gradients equal eager ones. A break is placed by
    its innermost frame: the outer ones name every model module it was called through. DFGR's
    target-only fake flow on a batch whose targets are some of its events."""
    import genrec.nn.hstu
    from genrec.models import build_model
    from genrec.train.trainer import COMPILE_OPTIONS
    from tests.models.test_generative import INFO

    hstu_block_file = genrec.nn.hstu.__file__
    batch = make_batch(random_lengths(1, 4, 90), seed=5, all_targets=not preset).to(DEVICE)
    torch.manual_seed(0)
    model = build_model(name, {"d_model": 64, "num_heads": 2, "num_layers": 2, "dropout": 0.0,
                               "attention_backend": "triton", **preset}, INFO, 128).to(DEVICE)
    explanation = torch._dynamo.explain(lambda b: model(b)["loss"])(batch)
    sites = [(f"{r.user_stack[-1].filename}:{r.user_stack[-1].lineno}" if r.user_stack else "?",
              str(r.reason).splitlines()[0]) for r in explanation.break_reasons]
    inside = [s for s in sites if s[0] == "?" or "/genrec/ops/" in s[0] or s[0].startswith(f"{hstu_block_file}:")]
    assert not inside, sites
    eager = model(batch)["loss"]
    eager.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = torch.compile(lambda b: model(b)["loss"], options=COMPILE_OPTIONS)(batch)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-5)
    for got, ref in zip((p.grad for p in model.parameters()), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-5)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_flex_softmax_attention_matches_reference(kind, dtype):
    layout = _layout(kind, [37, 90, 5, 61], seed=3)
    q, k, v, _, upstream = _inputs(layout, dtype, bias=False)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    outs = []
    for attention, cast in ((reference.softmax_attention, torch.double),
                            (backend_module.TRITON.softmax_attention, dtype)):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, layout, slopes)
        (out.float() * upstream).sum().backward()
        outs.append((out.detach(), [t.grad for t in leaves]))
    valid = layout.valid[:, None, :, None]
    assert _rel_error(outs[1][0] * valid, outs[0][0] * valid) <= TOLERANCE[dtype]
    for g, w in zip(outs[1][1], outs[0][1], strict=True):
        assert _rel_error(g, w) <= TOLERANCE[dtype]


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_flex_softmax_attention_from_a_tail_matches_reference(dtype):
    """GenRank's last block: queries from the candidates on (offset N = 150, inside the second
    128-token tile: flex gets the queries padded to the keys' rows, the rows before the offset masked
    out), ALiBi on; outputs and the gradients of q, k, v against the float64 reference."""
    layout = _layout("genrank_candidates", [150, 40, 133], seed=2)
    n = layout.shape[1] // 2
    q, k, v, _, upstream = _inputs(layout, dtype, bias=False, q_offset=n)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    outs = []
    for attention, cast in ((reference.softmax_attention, torch.double),
                            (backend_module.TRITON.softmax_attention, dtype)):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, layout, slopes, n)
        (out.float() * upstream).sum().backward()
        outs.append((out.detach(), [t.grad for t in leaves]))
    valid = layout.valid[:, None, n:, None]
    assert _rel_error(outs[1][0] * valid, outs[0][0] * valid) <= TOLERANCE[dtype]
    for g, w in zip(outs[1][1], outs[0][1], strict=True):
        assert _rel_error(g, w) <= TOLERANCE[dtype]


@gpu_only
@pytest.mark.parametrize(("name", "lengths"), [("hstu", [37, 90, 5, 61]), ("dfgr", [37, 90, 5, 61]),
                                               ("genrank", [37, 90, 5, 61]), ("genrank", [150, 40, 133])])
def test_models_give_the_same_predictions_and_gradients_on_both_backends(name, lengths):
    """GenRank's longer batch starts its last block's queries (N = 150) inside flex's second
    128-token tile, after a tile of masked rows."""
    from genrec.models import build_model
    from tests.models.test_generative import INFO

    batch = make_batch(lengths, seed=5).to(DEVICE)
    got = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        args = {"d_model": 64, "num_heads": 2, "num_layers": 2, "dropout": 0.0, "attention_backend": backend}
        model = build_model(name, args, INFO, 256).to(DEVICE)
        loss = model(batch)["loss"]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad():
            logits = model.rank_logits(batch)
            cands = torch.randint(1, 41, (len(lengths), 9), device=DEVICE,
                                  generator=torch.Generator(DEVICE).manual_seed(1))
            when = batch.timestamps[batch.offsets[1:] - 1] + 60
            if model.kv_serving is not None:  # KV-cache serving in micro-batches of 4
                serving = model.kv_serving
                served = in_micro_batches(serving.score_cached, serving.encode_history(batch, 4), cands, when)
            else:
                served = model.score(batch, cands, when)
        got[backend] = (logits, grads, served)
    (ref_logits, ref_grads, ref_served), (logits, grads, served) = got["reference"], got["triton"]
    assert _rel_error(logits, ref_logits) <= 1e-4
    assert _rel_error(grads, ref_grads) <= 1e-4
    assert _rel_error(served, ref_served) <= 1e-4


@pytest.mark.parametrize("kind", ["request_causal", "dfgr_target_fake_flow"])
def test_a_last_block_computing_its_tail_only_on_the_kernels_matches_the_full_reference_block(kind):
    """A block's ``outputs_from`` on the triton backend (the kernels' queries from an offset, in a
    training step: forward and backward, the schedules built for that offset) against the reference
    block run over every token, sliced there: outputs and the gradients of the input and both bias
    tables (what HSTU's and DFGR's last block runs in training)."""
    import copy

    from genrec.nn.hstu import HSTUBlock
    from genrec.ops.dispatch import REFERENCE

    torch.manual_seed(0)
    want_block = HSTUBlock(32, 2, 0.0, 0.05, REFERENCE, num_position_buckets=64).to(DEVICE)
    with torch.no_grad():
        want_block.rel_pos.normal_(0, 0.5)
        want_block.rel_time.normal_(0, 0.5)
    block = copy.deepcopy(want_block)
    block.backend = backend_module.TRITON
    lengths = _shape(5)
    layout = _layout(kind, lengths, seed=5)
    start = max(lengths)  # DFGR's real flow; mid-sequence for HSTU's layout; inside a 64-token tile both
    x = torch.randn(*layout.shape, 32, device=DEVICE, requires_grad=True)
    upstream = torch.randn(layout.shape[0], layout.shape[1] - start, 32, device=DEVICE)
    results = []
    for b, out in ((want_block, lambda: want_block(x, layout)[:, start:]),
                   (block, lambda: block(x, layout, outputs_from=start))):
        x.grad = None
        got = out()
        (got * upstream * layout.valid[:, start:, None]).sum().backward()
        results.append((got * layout.valid[:, start:, None], x.grad.clone(), b.rel_pos.grad, b.rel_time.grad))
    for got, want in zip(results[1], results[0], strict=True):
        assert _rel_error(got, want) < TOLERANCE[torch.float32]


def test_a_last_block_asked_for_no_output_runs_on_the_kernels_and_gives_every_weight_a_gradient():
    """No query (a batch without targets): the kernels' grids over queries are empty (the launcher
    skips them), the dK/dV grid reads no pair, and every weight gets a zero gradient (as DDP needs)."""
    from genrec.nn.hstu import HSTUBlock

    torch.manual_seed(0)
    block = HSTUBlock(32, 2, 0.0, 0.05, backend_module.TRITON, num_position_buckets=64).to(DEVICE)
    layout = _layout("request_causal", _shape(6), seed=6)
    x = torch.randn(*layout.shape, 32, device=DEVICE, requires_grad=True)
    out = block(x, layout, outputs_from=layout.shape[1])
    assert out.shape == (layout.shape[0], 0, 32)
    (out.sum() + x.sum() * 0).backward()
    assert all(p.grad is not None and not p.grad.any() for p in block.parameters())
