"""Fused HSTU pointwise attention in Triton, forward and backward, for every mask rule.

Computes what :func:`genrec.ops.reference.attention.hstu_attention` computes,
``out = (SiLU(Q Kᵀ/√d + rab) · scale ⊙ mask) V``, without materialising the ``L × L`` scores, mask or
bias: each program owns one query tile (forward) or one key tile (backward), visits only the tiles
the block-sparse schedule lists (:mod:`genrec.ops.triton.tiles`) and evaluates the mask rule and the
relative position / time bias per element from int32 token metadata. The DFGR dual-flow mask (real
causal + fake cross-triangle) is one rule among three, so the whole ``[real | fake]`` sequence is one
launch.

Backward: one kernel per key tile computes dK and dV in registers; dQ comes from a second kernel per
query tile (seven matrix products per tile pair, no atomics; the default at head dim >= 128), or
from the first, which adds each pair's dQ tile to an fp32 buffer by one TMA bulk reduction (the
FlashAttention-2 split, five products; the default below), per head-dim family:
:meth:`KernelConfig.separates_dq`.
The relative bias costs each tile pair only what its extremes require (:func:`_scores`): one value
where all its distances lie past the position table or all its time differences in one bucket,
one comparison per pair where they span two buckets, a table read per pair otherwise (its time
bucket in fp32 arithmetic, :func:`_time_slot`). The form is decided once per layout and tile size
(:func:`genrec.ops.triton.tiles.bias_forms`) and read as bits of the pair's schedule flags, one
load whose address the loop index gives. Its gradients
come from a kernel of their own over the dK/dV schedule (:func:`_hstu_bwd_rab`: beside dK/dV's
accumulators they spilled registers), gathered in each program (the table's last slot and the time
table in registers, added once at the program's end); the position table's other slots are reduced
per tile by distance (:func:`_position_grad`) before their atomic adds. At head dims up to
``BAND_MAX_DIM`` the near pairs of tiles at consecutive positions go to a second kernel instead, one
program per diagonal band of tile pairs (:func:`_hstu_bwd_rab_bands`): a band's score gradients add
up in registers and its diagonals are summed once, not per pair. The pairs whose bias is the
table's last slot and at most two time buckets (most of a long sequence's pairs with a bounded
table; :func:`genrec.ops.triton.tiles.simple_bias_pairs`) lead every schedule and run through a
loop compiled for that form alone (:func:`genrec.ops.triton.tiles.tile_lists`). They need no
recomputed scores for their gradients: with the dQ kernel on, it adds them as row sums of the
score gradients it already holds, and the bias-gradient kernel skips those pairs (flag
``BIAS_IN_DQ`` in the schedules). ``q_offset``
makes the queries the layout's tokens ``q_offset..L-1`` against all ``L`` keys: that is attention
over a KV cache (history keys, then the new tokens).

Padded tokens (``valid`` False) produce zero output and receive zero gradient; the reference lets
them read themselves, which no model uses.

The kernels run inside two ``torch.library`` custom ops (``genrec::hstu_attention_fwd`` and ``_bwd``,
with fake implementations and an autograd formula), so ``torch.compile`` and ``torch.export`` trace a
model on this backend as one node per attention call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from genrec.ops.layout import RULE_IDS, TokenLayout
from genrec.ops.triton import tiles
from genrec.ops.triton.tiles import (
    BAND,
    BIAS_IN_DQ,
    FAKE,
    FULL,
    NEAR,
    VALID,
    KernelMeta,
    bias_forms,
    consecutive_tiles,
    simple_bias_pairs,
    tile_extremes,
    tile_full,
    tile_lists,
    tile_pairs,
    tile_reduction,
    tile_stats,
)

Tile = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M runs over queries


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes of the three kernels and the dQ strategy: an argument of :func:`hstu_attention`
    (the backend holds one, :func:`genrec.ops.triton.backend.triton_backend`), never module state.

    ``*_large`` apply at head dim >= 128: chosen on the H100 by benchmarks/tune_hstu_kernel.py
    (results/hstu_tuning_NVIDIA_H100_80GB_HBM3.md); the small ones, set by hand, came within about
    1.5 % of that sweep's best forward + backward on the training steps' layouts at head dim 64
    (``--head-dim 64``: results/hstu_tuning_d64_NVIDIA_H100_80GB_HBM3.md), so they stay. The
    head-dim-128 sweep's dQ pick (128, 128, 8, 2) runs out of shared memory with the relative bias;
    (128, 64, 8, 2) is within 1 % of it without. ``*_fp32_large`` are the float32 tiles at head dim
    >= 128: float32 tiles take twice the bytes, and the bf16 ones ask up to 262,676 bytes of shared
    memory where a Hopper SM has 232,448 (fewer pipeline stages and query rows instead;
    benchmarks/tiles_fit.py compiles every table for sm_90 on the CPU: results/tiles_fit_sm90.md).

    The dQ strategy, per head-dim family (:meth:`separates_dq`): ``dq_separate`` (head dim >= 128)
    and ``dq_separate_small`` (below) choose dQ by its own kernel (no atomics, seven matrix products
    per tile pair) over dQ in the dK/dV kernel (five products), each pair's dQ tile added to an fp32
    buffer by one TMA bulk reduction (``cp.reduce.async.bulk.tensor``). benchmarks/dq_strategy.py
    times both on a GPU (results/dq_strategy_NVIDIA_H100_80GB_HBM3.md): below head dim 128, on the
    training steps' layouts at head dim 64, the reductions are 6-15 % faster at N = 1024 and 8192,
    with the bias and without, so they are the default there; at 128 an A/B
    (results/gpu_logs/dq_tma_ab_9a3deaf_tma_patch_*) found them within 3 % either way and with the
    bias 27 % slower at N = 8192, so the separate kernel stays. The backward's tiles must be square
    and >= 64 (the position-bias gradient's reduction)."""

    fwd: Tile = (64, 64, 4, 3)
    bwd: Tile = (64, 64, 4, 2)
    dq: Tile = (64, 64, 4, 3)
    fwd_large: Tile = (64, 64, 4, 3)
    bwd_large: Tile = (64, 64, 4, 2)
    dq_large: Tile = (128, 64, 8, 2)
    fwd_fp32_large: Tile = (64, 64, 4, 2)
    bwd_fp32_large: Tile = (64, 64, 4, 1)
    dq_fp32_large: Tile = (64, 64, 4, 2)
    dq_separate: bool = True
    dq_separate_small: bool = False

    def separates_dq(self, head_dim: int) -> bool:
        """Whether dQ comes from its own kernel at this head dim (else from the dK/dV kernel)."""
        return self.dq_separate if head_dim >= 128 else self.dq_separate_small

    def with_dq_separate(self, head_dim: int, separate: bool) -> KernelConfig:
        """This config with the dQ strategy of ``head_dim``'s family set (the other family's kept)."""
        return replace(self, **{"dq_separate" if head_dim >= 128 else "dq_separate_small": separate})

    def tiles(self, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> tuple[Tile, Tile, Tile]:
        """(forward, dK/dV, dQ) tiles for this head dim and dtype."""
        if head_dim >= 128 and dtype == torch.float32:
            return self.fwd_fp32_large, self.bwd_fp32_large, self.dq_fp32_large
        if head_dim >= 128:
            return self.fwd_large, self.bwd_large, self.dq_large
        return self.fwd, self.bwd, self.dq


DEFAULT_CONFIG = KernelConfig()
# The diagonal-band kernel (_hstu_bwd_rab_bands) runs at head dims up to this, where it passed the
# GPU parity tests on the H100 (training's 512 / 8 heads = 64). At 128 it first ran beside a change
# that failed them (benchmarks/results/gpu_logs/bias_grad_bands_ab_NVIDIA_H100.log), then alone it
# made the bias gradients slower than the key-tile kernel by itself (band_kernel_dim128_ab_NVIDIA_H100.log
# there): above it the key-tile kernel adds every pair.
BAND_MAX_DIM = 64
VALID_BIT: tl.constexpr = tl.constexpr(VALID)
FAKE_BIT: tl.constexpr = tl.constexpr(FAKE)
FULL_BIT: tl.constexpr = tl.constexpr(FULL)
BIAS_IN_DQ_BIT: tl.constexpr = tl.constexpr(BIAS_IN_DQ)
BAND_BIT: tl.constexpr = tl.constexpr(BAND)
# The rule ids the kernels branch on, from the one table of mask rules (genrec.ops.layout.RULES).
CAUSAL: tl.constexpr = tl.constexpr(RULE_IDS["causal"])
REQUEST_CAUSAL: tl.constexpr = tl.constexpr(RULE_IDS["request_causal"])
DUAL_FLOW: tl.constexpr = tl.constexpr(RULE_IDS["dual_flow"])


@triton.jit
def _allowed(q_idx, k_idx, q_req, k_req, q_evt, k_evt, q_flag, k_flag, RULE: tl.constexpr):
    """The mask rules of genrec.ops.masks, per element (arguments broadcast against each other). A rule
    id without a branch here fails when the kernel compiles, never as another rule's mask."""
    valid = ((q_flag & VALID_BIT) != 0) & ((k_flag & VALID_BIT) != 0)
    if RULE == CAUSAL:
        allowed = k_idx <= q_idx
    elif RULE == REQUEST_CAUSAL:
        allowed = (k_req < q_req) | ((k_evt == q_evt) & (k_idx <= q_idx))
    else:
        tl.static_assert(RULE == DUAL_FLOW, "a mask rule without a branch in genrec.ops.triton.hstu._allowed")
        k_real = (k_flag & FAKE_BIT) == 0
        q_fake = (q_flag & FAKE_BIT) != 0
        allowed = tl.where(q_fake, (k_real & (k_req < q_req)) | (k_idx == q_idx), k_real & (k_evt <= q_evt))
    return allowed & valid


@triton.jit
def _sigmoid(x, PRECISION: tl.constexpr):
    """1 / (1 + e^-x): the elementwise work per score is what separates this kernel from a
    matrix-product-bound one. With bf16 inputs ("tf32" products) through one hardware tanh,
    ``(1 + tanh(x/2)) / 2`` (relative error 2^-11, below bf16's 2^-8); in fp32 through exp2 and the
    fast division (two special-function operations, within 1e-6)."""
    if PRECISION == "ieee":
        return tl.fdiv(1.0, 1.0 + tl.exp2(-1.4426950408889634 * x), ieee_rounding=False)
    tanh = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [0.5 * x], dtype=tl.float32,
                                     is_pure=True, pack=1)
    return 0.5 + 0.5 * tanh


@triton.jit
def _log2_floor(x):
    """floor(log2(x)) for int32 ``x >= 1``, read off the float exponent and corrected by one where
    rounding carried it up: exact for every int32 (the reference computes it in float64)."""
    e = ((x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(e, 30)
    return tl.where((tl.full(e.shape, 1, tl.int32) << e) > x, e - 1, e)


TS_TOP: tl.constexpr = tl.constexpr(tiles.TS_TOP)
NO_RUN: tl.constexpr = tl.constexpr(-tiles.POS_BOUND)  # below any difference of two positions
NEAR_BIT: tl.constexpr = tl.constexpr(NEAR)
LO_SHIFT: tl.constexpr = tl.constexpr(tiles.LO_SHIFT)
HI_SHIFT: tl.constexpr = tl.constexpr(tiles.HI_SHIFT)
BUCKET_MASK: tl.constexpr = tl.constexpr(tiles.BUCKET_MASK)


@triton.jit
def _bias_form(flags):
    """A tile pair's relative-bias form from its schedule flags (:func:`genrec.ops.triton.tiles.bias_forms`):
    whether a distance may fall before the position table's last slot, and its lowest and highest
    time bucket."""
    return (flags & NEAR_BIT) != 0, (flags >> LO_SHIFT) & BUCKET_MASK, (flags >> HI_SHIFT) & BUCKET_MASK


@triton.jit
def _bucket_of(dt, NUM_TIME):
    """The time bucket ``min(floor(log2(1 + max(Δt, 0))), NUM_TIME - 1)`` of an int32 Δt (scalar or
    tensor; Δt <= TS_TOP), as :func:`genrec.ops.masks.time_bucket`: ``1 + Δt`` overflows int32 at
    TS_TOP alone, whose bucket is 31."""
    log = tl.where(dt >= TS_TOP, 31, _log2_floor(tl.minimum(tl.maximum(dt, 0), TS_TOP - 1) + 1))
    return tl.minimum(log, NUM_TIME - 1)


# Triton's interpreter (the CPU tests) has no libdevice: there :func:`_time_slot` takes the integer path.
DEVICE_MATH: tl.constexpr = tl.constexpr(not isinstance(_bucket_of, InterpretedFunction))
SLOT_BASE: tl.constexpr = tl.constexpr(127)  # the float exponent bias that _time_slot's index carries


@triton.jit
def _fp32(x):
    """int32 -> fp32 where LLVM cannot see it: it rewrites a difference of two converted token
    vectors as the conversion of their difference, one conversion per pair instead of per token."""
    return tl.inline_asm_elementwise("cvt.rn.f32.s32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _read(ptrs):
    """``tl.load(ptrs)``: a bias table read at per-pair addresses (``[rows, cols]`` fp32). On the GPU
    through an inline ``ld.global.nc`` (the tables are read-only in the kernels), which Triton lays
    out as the scores it is added to. A ``tl.load`` of addresses it cannot see to be contiguous gets
    a layout of its own, converted to the scores' through shared memory: on sm_90 two stores, loads
    and barriers per tile pair and table, and its index vectors loaded in that layout too."""
    if DEVICE_MATH:
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [ptrs.to(tl.int64)], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.load(ptrs)


@triton.jit
def _time_slot(q_ts, k_ts, NUM_TIME):
    """``SLOT_BASE +`` the time bucket of ``q_ts - k_ts`` (:func:`_bucket_of`; int32 token times,
    broadcast against each other). On the GPU in fp32 adds: each time splits into its multiple of
    4096 and the rest, whose differences are exact in fp32, and their sum rounded toward zero,
    ``1 + Δt``, has ``floor(log2(1 + Δt))`` as its exponent, read off the bits. The integer form's
    ops (and its int-to-float conversion) run at half (an eighth) of the fp32 rate on Hopper and
    were most of a near tile pair's work. The times' splits are per token, not per pair."""
    if DEVICE_MATH:
        ahead = libdevice.add_rz(_fp32(q_ts & -4096) - _fp32(k_ts & -4096),
                                 _fp32((q_ts & 4095) + 1) - _fp32(k_ts & 4095))  # 1 + Δt
        exponent = tl.maximum(ahead, 1.0).to(tl.int32, bitcast=True) >> 23  # SLOT_BASE + floor(log2)
        return tl.minimum(exponent, SLOT_BASE + NUM_TIME - 1)
    return SLOT_BASE + _bucket_of(q_ts - k_ts, NUM_TIME)


@triton.jit
def _load_tile(PTR, b, h, idx, cols, s_b, s_h, s_n, n):
    """Rows ``idx`` (those < n; others 0) of head h of sequence b: ``[len(idx), D]``."""
    return tl.load(PTR + b * s_b + h * s_h + idx[:, None] * s_n + cols[None, :], mask=idx[:, None] < n, other=0.0)


@triton.jit
def _rule_meta(REQ, EVT, FLAG, at, mask):
    """Request, event and flags of tokens ``at``: what the mask rule reads."""
    return (tl.load(REQ + at, mask=mask, other=0), tl.load(EVT + at, mask=mask, other=0),
            tl.load(FLAG + at, mask=mask, other=0))


@triton.jit
def _bias_meta(POS, TS, FLAG, at, mask):
    """Position, time and liveness (valid, in range) of tokens ``at``: what the bias gradients read."""
    live = mask & ((tl.load(FLAG + at, mask=mask, other=0) & VALID_BIT) != 0)
    return tl.load(POS + at, mask=mask, other=0), tl.load(TS + at, mask=mask, other=0), live


@triton.jit
def _bucket_at_least(dt, t):
    """Whether Δt's bucket is >= ``t`` (``t`` >= 1): ``1 + Δt >= 2^t``, one comparison per pair."""
    return dt >= (1 << t) - 1


@triton.jit
def _two_buckets(s, TS, q_at, k_at, q_in, k_in, TIME_H, t_lo, t_hi, t_base):
    """``s`` plus, where a pair's time bucket is ``t_hi`` rather than ``t_lo`` (whose value
    ``t_base`` is in ``s`` already), the difference of the two: one comparison per pair."""
    dt = tl.load(TS + q_at, mask=q_in, other=0) - tl.load(TS + k_at, mask=k_in, other=0)
    return s + tl.where(_bucket_at_least(dt, t_hi), tl.load(TIME_H + t_hi) - t_base, 0.0)


@triton.jit
def _scores(x, y, flags, POS, TS, q_at, k_at, q_in, k_in, pos_top, POS_H, TIME_H, NUM_POS, NUM_TIME, alpha,
            HAS_BIAS: tl.constexpr, SIMPLE: tl.constexpr, PRECISION: tl.constexpr):
    """``x yᵀ · alpha`` plus, with the bias, the position table ``POS_H`` (head h's row; ``pos_top``
    its last slot, loaded once per program) at the clamped position difference of the query and key
    tokens and the time table ``TIME_H`` at the bucket of their time difference. ``x, y`` = (q, k)
    for ``[queries, keys]`` tiles or (k, q) for ``[keys, queries]``; ``q_at, k_at`` (token indices
    into ``POS``, ``TS``; in range where ``q_in``, ``k_in``) come shaped to broadcast to that tile.
    The pair's ``flags`` (:func:`_bias_form`) pick the cheapest exact form: where every distance lies
    at or past the table's last slot (a table of 256 slots: every tile pair of events more than 256
    apart; the models' table has a slot per distance) and the time buckets are one, the whole bias
    is one value, added in the scaling's multiply-add; two buckets cost one comparison per pair, a
    table read per pair is left to the other pairs. ``SIMPLE``: the pair is known to be past the
    table in at most two buckets (:func:`genrec.ops.triton.tiles.tile_lists`), and the other forms
    are not compiled. Token positions and times are loaded only by the forms that read them (held
    for every tile pair, they and their differences pushed the kernels into register spills on
    sm_90)."""
    s = tl.dot(x, tl.trans(y), input_precision=PRECISION)
    if HAS_BIAS:
        near, t_lo, t_hi = _bias_form(flags)
        t_base = tl.load(TIME_H + t_lo)
        if SIMPLE:
            s = s * alpha + (pos_top + t_base)
            if t_hi == t_lo + 1:
                s = _two_buckets(s, TS, q_at, k_at, q_in, k_in, TIME_H, t_lo, t_hi, t_base)
        else:
            few = (t_hi >= t_lo) & (t_hi <= t_lo + 1)  # one or two buckets: t_lo's value is in the constant
            s = s * alpha + (tl.where(near, 0.0, pos_top) + tl.where(few, t_base, 0.0))
            if near:
                dist = tl.load(POS + q_at, mask=q_in, other=0) - tl.load(POS + k_at, mask=k_in, other=0)
                s += _read(POS_H + tl.minimum(tl.maximum(dist, 0), NUM_POS - 1))
            if t_hi == t_lo + 1:
                s = _two_buckets(s, TS, q_at, k_at, q_in, k_in, TIME_H, t_lo, t_hi, t_base)
            elif t_hi != t_lo:
                slot = _time_slot(tl.load(TS + q_at, mask=q_in, other=0), tl.load(TS + k_at, mask=k_in, other=0),
                                  NUM_TIME)
                s += _read((TIME_H - SLOT_BASE) + slot)
    else:
        s = s * alpha
    return s


@triton.jit
def _time_grad(acc, ds, total, q_ts, k_ts, t_lo, t_hi, NUM_TIME, SLOTS: tl.constexpr):
    """``acc`` ``[SLOTS]`` (the program's time-table gradient, added to the table once at its end)
    plus ``ds``'s sum per time bucket: the tile sum ``total`` where the tile holds one bucket, split
    by one comparison where it holds two, one masked sum per bucket elsewhere (``q_ts, k_ts`` shaped
    to broadcast to ``ds``). Masked pairs have ``ds = 0``, so bucket edges need no mask."""
    slot = tl.arange(0, SLOTS)
    if t_hi == t_lo:
        acc += tl.where(slot == t_lo, total, 0.0)
    elif t_hi == t_lo + 1:
        upper = tl.sum(tl.where(_bucket_at_least(q_ts - k_ts, t_hi), ds, 0.0))
        acc += tl.where(slot == t_hi, upper, tl.where(slot == t_lo, total - upper, 0.0))
    else:
        bucket = _time_slot(q_ts, k_ts, NUM_TIME) - SLOT_BASE
        for t in range(t_lo, t_hi + 1):
            acc += tl.where(slot == t, tl.sum(tl.where(bucket == t, ds, 0.0)), 0.0)
    return acc


@triton.jit
def _grouped_sums(c, T: tl.constexpr, DIFF: tl.constexpr, PRECISION: tl.constexpr, OP: tl.constexpr):
    """``z[e, f] = Σ c[i, j]`` for ``c`` ``[T, T]`` (T = 64 or 128) over ``i + j = 8 f + e``
    (anti-diagonals) or, ``DIFF``, over ``j - i = 8 (f - T/8 + 1) + e - 7`` (diagonals): by two
    one-hot products instead of a gather. With ``i = 8a + b`` and ``j = 8c + d``, first ``b ± d`` is
    summed out of each 8 x 8 block, then ``a ± c``. Returns ``[16, 2T/8]``; two entries may share one
    (anti-)diagonal (``e`` reaches 14). ``OP``: the products' operand type, bfloat16 with
    half-precision inputs (``PRECISION`` "tf32"), ``c`` and the partial sums rounded to it (the
    one-hot factors are exact): float32 operands went through shared memory at twice the bytes, and
    the position gradient is most of the bias-gradient kernel (an H100 A/B: benchmarks/results/gpu_logs/
    position_grad_bf16_ab_NVIDIA_H100.log). The table's gradient stays within bf16 rounding of the
    float64 reference (GPU parity tests)."""
    S: tl.constexpr = 8
    B: tl.constexpr = T // S
    x = tl.reshape(tl.permute(tl.reshape(c.to(OP), [B, S, B, S]), (0, 2, 1, 3)), [B * B, S * S])  # [(a, c), (b, d)]
    bd = tl.arange(0, S * S)
    e = tl.arange(0, 2 * S)
    if DIFF:
        inner = ((bd[:, None] % S - bd[:, None] // S + S - 1) == e[None, :]).to(OP)  # [(b, d), e]
    else:
        inner = ((bd[:, None] // S + bd[:, None] % S) == e[None, :]).to(OP)
    y = tl.dot(x, inner, input_precision=PRECISION)  # [(a, c), e]
    y = tl.reshape(tl.permute(tl.reshape(y.to(OP), [B, B, 2 * S]), (2, 0, 1)), [2 * S, B * B])  # [e, (a, c)]
    ac = tl.arange(0, B * B)
    f = tl.arange(0, 2 * B)
    if DIFF:
        outer = ((ac[:, None] % B - ac[:, None] // B + B - 1) == f[None, :]).to(OP)  # [(a, c), f]
    else:
        outer = ((ac[:, None] // B + ac[:, None] % B) == f[None, :]).to(OP)
    return tl.dot(y, outer, input_precision=PRECISION)  # [e, f]


@triton.jit
def _add_at_distance(D_POS, values, dist, mask, NUM_POS):
    """Atomically adds ``values`` into the position-bias gradient ``D_POS`` at the slots of the
    distances ``dist`` (same shape), clamped to the table as the bias reads it."""
    tl.atomic_add(D_POS + tl.minimum(tl.maximum(dist, 0), NUM_POS - 1), values, mask=mask)


@triton.jit
def _add_diagonals(D_POS, c, offset, NUM_POS, PRECISION: tl.constexpr, T: tl.constexpr):
    """Adds ``c`` ``[keys, queries]`` (T x T) of a tile pair whose positions are consecutive on both
    sides into the position-bias gradient ``D_POS``: its diagonals' sums (:func:`_grouped_sums`) at
    distance ``offset`` (first query position - first key position) + query - key, 16 x 16 atomics."""
    OP: tl.constexpr = tl.bfloat16 if PRECISION == "tf32" else tl.float32  # bf16 inputs: bf16 products
    sums = _grouped_sums(c, T, True, PRECISION, OP)  # [e, f]: distance offset + 8 (f - T/8 + 1) + e - 7
    dist = offset + 8 * (tl.arange(0, 2 * T // 8)[None, :] - T // 8 + 1) + tl.arange(0, 16)[:, None] - 7
    _add_at_distance(D_POS, sums, dist, sums != 0.0, NUM_POS)


@triton.jit
def _consecutive(pos, live, lo, T: tl.constexpr):
    """Whether all T tokens are live at positions ``lo, lo + 1, ...`` (one event per token)."""
    return tl.sum((live & (pos == lo + tl.arange(0, T))).to(tl.int32)) == T


@triton.jit
def _position_grad(D_POS, top, ds, total, far, q_pos, k_pos, q_live, q_lo, q_hi, k_lo, k_hi, k_run, allowed,
                   NUM_POS, PRECISION: tl.constexpr, T: tl.constexpr):
    """Adds ``ds`` ``[keys, queries]`` (T x T) into the position-bias gradient ``D_POS`` at
    ``clamp(q_pos - k_pos)``; returns ``top``, the program's gradient of the table's last slot.
    Per-pair atomic adds dominated the whole backward, so: a tile past the table (``far``) adds
    its sum ``total`` to ``top`` (one atomic per program at its end). A tile whose live positions
    span fewer than T values sums along (anti-)diagonals: directly where both sides hold
    consecutive positions (``k_run`` for the keys), else after one-hot products that group the pairs
    by (query position - lowest, highest - key position), whose sum is the distance up to a
    constant; 16 x 16 atomics instead of T x T. A tile whose positions span less than ``T + T / 8``
    takes the one-hot path too, its few tokens past the first T positions adding per pair: DFGR's
    fake tiles span a few more than T, their requests' first events (a second one-hot base for those
    spilled registers and failed the bf16 parity tests at head dim 128 on the H100,
    benchmarks/results/gpu_logs/bias_grad_bands_ab_NVIDIA_H100.log). Other tiles add per pair.
    ``q_lo`` .. ``k_hi``: the live positions' spans."""
    live = (q_hi >= q_lo) & (k_hi >= k_lo)  # else ds is all 0
    OP: tl.constexpr = tl.bfloat16 if PRECISION == "tf32" else tl.float32  # bf16 inputs: bf16 products
    WIDE: tl.constexpr = T + T // 8  # the widest span of the one-hot path
    if far:
        top += total
    elif live & k_run & _consecutive(q_pos, q_live, q_lo, T):
        _add_diagonals(D_POS, ds, q_lo - k_lo, NUM_POS, PRECISION, T)
    elif live & (q_hi - q_lo < WIDE) & (k_hi - k_lo < WIDE):
        slot = tl.arange(0, T)  # a token past the first T positions matches no slot
        by_query = ((q_pos[:, None] - q_lo) == slot[None, :]).to(OP)  # [queries, q_pos - q_lo]
        by_key = ((k_hi - k_pos[:, None]) == slot[None, :]).to(OP)  # [keys, k_hi - k_pos]
        grouped = tl.dot(tl.trans(by_key), tl.dot(ds.to(OP), by_query, input_precision=PRECISION).to(OP),
                         input_precision=PRECISION)  # [k_hi - k_pos, q_pos - q_lo]
        sums = _grouped_sums(grouped, T, False, PRECISION, OP)  # [e, f]: distance q_lo - k_hi + 8 f + e
        dist = q_lo - k_hi + 8 * tl.arange(0, 2 * T // 8)[None, :] + tl.arange(0, 16)[:, None]
        _add_at_distance(D_POS, sums, dist, sums != 0.0, NUM_POS)
        if (q_hi - q_lo >= T) | (k_hi - k_lo >= T):  # the pairs of the tokens past them
            past = ((q_pos[None, :] - q_lo) >= T) | ((k_hi - k_pos[:, None]) >= T)  # [keys, queries]
            _add_at_distance(D_POS, ds, q_pos[None, :] - k_pos[:, None], allowed & past, NUM_POS)
    elif live:
        _add_at_distance(D_POS, ds, q_pos[None, :] - k_pos[:, None], allowed, NUM_POS)
    return top


@triton.jit
def _visited_key_tile(K, V, POS, TS, REL_POS, REL_TIME, KV_INDEX, KV_FLAGS, i, q, q_tok, q_in, pos_top, b, h, tile,
                      cols, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ib, s_iq, L, s_m, NUM_POS, NUM_TIME, alpha,
                      HAS_BIAS: tl.constexpr, SIMPLE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``i``-th key tile a query tile's program visits (forward, dQ): its tokens, keys and values,
    the biased scores ``[BLOCK_M, BLOCK_N]`` and the pair's schedule flags."""
    at = b * s_ib + tile * s_iq + i
    k_tile = tl.load(KV_INDEX + at)
    flags = tl.load(KV_FLAGS + at)
    keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_in = keys < L
    k = _load_tile(K, b, h, keys, cols, s_kb, s_kh, s_kn, L)
    v = _load_tile(V, b, h, keys, cols, s_vb, s_vh, s_vn, L)
    s = _scores(q, k, flags, POS, TS, (b * s_m + q_tok)[:, None], (b * s_m + keys)[None, :],
                q_in[:, None], k_in[None, :], pos_top, REL_POS + h * NUM_POS, REL_TIME + h * NUM_TIME, NUM_POS,
                NUM_TIME, alpha, HAS_BIAS, SIMPLE, PRECISION)  # [BLOCK_M, BLOCK_N]
    return keys, k_in, k, v, s, flags


@triton.jit
def _pair_range(COUNT, at, PART: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Bounds of a program's listed pairs (``COUNT + at``: its counts, :func:`genrec.ops.triton.tiles.tile_lists`):
    all of them without the bias; with it the simple ones (``PART`` 0), then the others (``PART`` 1),
    each pass through a loop compiled for its forms."""
    lo = 0
    hi = tl.load(COUNT + at)
    if HAS_BIAS:
        first = tl.load(COUNT + at + 1)
        if PART == 0:
            hi = first
        else:
            lo = first
    return lo, hi


@triton.jit
def _position_top(REL_POS, h, NUM_POS, HAS_BIAS: tl.constexpr):
    """Head h's last position slot, which every pair past the table adds: loaded once per program."""
    if HAS_BIAS:
        return tl.load(REL_POS + h * NUM_POS + NUM_POS - 1)
    return 0.0  # unread


@triton.jit
def _hstu_fwd(Q, K, V, O, REQ, EVT, FLAG, POS, TS, REL_POS, REL_TIME, KV_COUNT, KV_INDEX, KV_FLAGS,
              s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_cb, s_ib, s_iq,
              H, LQ, L, s_m, Q_OFFSET, NUM_POS, NUM_TIME, alpha, scale,
              RULE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows 0..LQ-1
    cols = tl.arange(0, D)
    q = _load_tile(Q, b, h, rows, cols, s_qb, s_qh, s_qm, LQ)
    q_tok = rows + Q_OFFSET
    q_in = rows < LQ
    q_req, q_evt, q_flag = _rule_meta(REQ, EVT, FLAG, b * s_m + q_tok, q_tok < s_m)
    pos_top = _position_top(REL_POS, h, NUM_POS, HAS_BIAS)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for part in tl.static_range(2):
        if HAS_BIAS or part == 0:
            lo, hi = _pair_range(KV_COUNT, b * s_cb + tile * 2, part, HAS_BIAS)
            for i in range(lo, hi):
                keys, k_in, k, v, s, flags = _visited_key_tile(
                    K, V, POS, TS, REL_POS, REL_TIME, KV_INDEX, KV_FLAGS, i, q, q_tok, q_in, pos_top, b, h, tile,
                    cols, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ib, s_iq, L, s_m, NUM_POS, NUM_TIME, alpha, HAS_BIAS,
                    part == 0, PRECISION, BLOCK_N)  # [BLOCK_M, BLOCK_N] scores
                a = s * _sigmoid(s, PRECISION) * scale
                if (flags & FULL_BIT) == 0:  # else the rule allows the whole tile
                    k_req, k_evt, k_flag = _rule_meta(REQ, EVT, FLAG, b * s_m + keys, keys < s_m)
                    allowed = _allowed(q_tok[:, None], keys[None, :], q_req[:, None], k_req[None, :],
                                       q_evt[:, None], k_evt[None, :], q_flag[:, None], k_flag[None, :], RULE)
                    a = tl.where(allowed, a, 0.0)
                acc += tl.dot(a.to(v.dtype), v, input_precision=PRECISION)
    tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_om + cols[None, :], acc.to(O.dtype.element_ty),
             mask=rows[:, None] < LQ)


@triton.jit
def _key_tile(K, V, REQ, EVT, FLAG, b, h, tile, cols, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, L, s_m,
              BLOCK_N: tl.constexpr):
    """What a backward program holds for its key tile: tokens, keys, values and rule metadata."""
    keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_in = keys < L
    k = _load_tile(K, b, h, keys, cols, s_kb, s_kh, s_kn, L)
    v = _load_tile(V, b, h, keys, cols, s_vb, s_vh, s_vn, L)
    k_req, k_evt, k_flag = _rule_meta(REQ, EVT, FLAG, b * s_m + keys, keys < s_m)
    return keys, k_in, k, v, k_req, k_evt, k_flag


@triton.jit
def _query_tile_grads(Q, DO, REQ, EVT, FLAG, POS, TS, REL_POS, REL_TIME, q_tile, flags, k, v, keys, k_in, k_req,
                      k_evt, k_flag, pos_top, b, h, cols, s_qb, s_qh, s_qm, s_db, s_dh, s_dm, LQ, L, s_m, Q_OFFSET,
                      NUM_POS, NUM_TIME, alpha, scale, RULE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SIMPLE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tile ``q_tile`` (schedule ``flags``) of a key tile's backward: its queries and output
    gradients, the pair's attention weights ``a`` and score gradients ``ds`` (``[BLOCK_N keys,
    BLOCK_M queries]``, zero where the rule forbids) and where the rule allows."""
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_in = rows < LQ
    q = _load_tile(Q, b, h, rows, cols, s_qb, s_qh, s_qm, LQ)
    do = _load_tile(DO, b, h, rows, cols, s_db, s_dh, s_dm, LQ)
    q_tok = rows + Q_OFFSET
    meta = b * s_m + q_tok
    s = _scores(k, q, flags, POS, TS, meta[None, :], (b * s_m + keys)[:, None], q_in[None, :], k_in[:, None],
                pos_top, REL_POS + h * NUM_POS, REL_TIME + h * NUM_TIME, NUM_POS, NUM_TIME, alpha, HAS_BIAS, SIMPLE,
                PRECISION)  # [BLOCK_N, BLOCK_M]
    if (flags & FULL_BIT) == 0:
        q_req, q_evt, q_flag = _rule_meta(REQ, EVT, FLAG, meta, q_tok < s_m)
        allowed = _allowed(q_tok[None, :], keys[:, None], q_req[None, :], k_req[:, None], q_evt[None, :],
                           k_evt[:, None], q_flag[None, :], k_flag[:, None], RULE)
    else:
        allowed = tl.full((BLOCK_N, BLOCK_M), 1, tl.int1)
    sig = _sigmoid(s, PRECISION)
    a = tl.where(allowed, s * sig * scale, 0.0)
    da = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
    ds = tl.where(allowed, da * scale * sig * (1.0 + s * (1.0 - sig)), 0.0)  # d loss / d s
    return rows, q_in, q, do, a, ds, allowed


@triton.jit
def _hstu_bwd(Q, K, V, DO, DQ, DQ_DESC, DK, DV, REQ, EVT, FLAG, POS, TS, REL_POS, REL_TIME, Q_COUNT, Q_INDEX, Q_FLAGS,
              s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm, s_cb, s_ib, s_iq,
              H, LQ, L, s_m, Q_OFFSET, NUM_POS, NUM_TIME, alpha, scale,
              s_gb, s_gh, s_gm, s_kgb, s_kgh, s_kgn, RULE: tl.constexpr, HAS_BIAS: tl.constexpr,
              PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """dK and dV, one key tile per program; scores are held transposed, ``[BLOCK_N keys, BLOCK_M
    queries]``. The bias tables' gradients come from :func:`_hstu_bwd_rab`. With ``DQ_ATOMIC``, also
    each pair's dQ tile, added to the fp32 buffer behind ``DQ_DESC`` (``[B·H, LQ, D]``) by one TMA
    bulk reduction (rows past ``LQ`` fall outside the descriptor and are dropped)."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.arange(0, D)
    keys, k_in, k, v, k_req, k_evt, k_flag = _key_tile(K, V, REQ, EVT, FLAG, b, h, tile, cols, s_kb, s_kh, s_kn,
                                                       s_vb, s_vh, s_vn, L, s_m, BLOCK_N)
    pos_top = _position_top(REL_POS, h, NUM_POS, HAS_BIAS)
    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    for part in tl.static_range(2):
        if HAS_BIAS or part == 0:
            lo, hi = _pair_range(Q_COUNT, b * s_cb + tile * 2, part, HAS_BIAS)
            for i in range(lo, hi):
                at = b * s_ib + tile * s_iq + i
                q_tile = tl.load(Q_INDEX + at)
                rows, q_in, q, do, a, ds, _ = _query_tile_grads(
                    Q, DO, REQ, EVT, FLAG, POS, TS, REL_POS, REL_TIME, q_tile, tl.load(Q_FLAGS + at),
                    k, v, keys, k_in, k_req, k_evt, k_flag, pos_top, b, h, cols, s_qb, s_qh, s_qm, s_db, s_dh, s_dm,
                    LQ, L, s_m, Q_OFFSET, NUM_POS, NUM_TIME, alpha, scale, RULE, HAS_BIAS, part == 0, PRECISION,
                    BLOCK_M, BLOCK_N)
                dv += tl.dot(a.to(do.dtype), do, input_precision=PRECISION)
                dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
                if DQ_ATOMIC:
                    dq = tl.dot(tl.trans(ds).to(k.dtype), k, input_precision=PRECISION) * alpha  # [BLOCK_M, D]
                    if DEVICE_MATH:  # one bulk reduction by the TMA unit, not BLOCK_M x D atomic adds
                        DQ_DESC.atomic_add([bh, q_tile * BLOCK_M, 0], tl.reshape(dq, [1, BLOCK_M, D]))
                    else:  # Triton's interpreter has no TMA reductions
                        tl.atomic_add(DQ + b * s_gb + h * s_gh + rows[:, None] * s_gm + cols[None, :], dq,
                                      mask=q_in[:, None])
    out = b * s_kgb + h * s_kgh + keys[:, None] * s_kgn + cols[None, :]
    tl.store(DK + out, (dk * alpha).to(DK.dtype.element_ty), mask=k_in[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=k_in[:, None])


@triton.jit
def _hstu_bwd_rab(Q, K, V, DO, REQ, EVT, FLAG, POS, TS, REL_POS, REL_TIME, Q_COUNT, Q_INDEX, Q_FLAGS,
                  s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm, s_cb, s_ib, s_iq,
                  H, LQ, L, s_m, Q_OFFSET, NUM_POS, NUM_TIME, alpha, scale, Q_EXT, K_EXT, s_qeb, s_keb,
                  D_REL_POS, D_REL_TIME, RULE: tl.constexpr, PRECISION: tl.constexpr, TIME_SLOTS: tl.constexpr,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The bias tables' gradients, one key tile per program over the dK/dV schedule: its own kernel
    (two more matrix products per tile pair) because beside dK/dV's ``[BLOCK_N, D]`` accumulators the
    gradient's reductions left no registers (1,992 bytes of spills per thread on sm_90). The
    gradients gather in the program (``pos_top``: the position table's last slot; ``time_grad``: the
    time table, ``TIME_SLOTS`` >= its size) and reach the tables by one atomic add each at the end,
    where one per tile pair contended across programs. ``Q_EXT``, ``K_EXT``: the backward tiles'
    extremes (:func:`genrec.ops.triton.tiles.tile_extremes`), the position spans the reductions need."""
    tl.static_assert((BLOCK_M == BLOCK_N) & (BLOCK_N >= 64), "the position-bias gradient needs square tiles >= 64")
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.arange(0, D)
    keys, k_in, k, v, k_req, k_evt, k_flag = _key_tile(K, V, REQ, EVT, FLAG, b, h, tile, cols, s_kb, s_kh, s_kn,
                                                       s_vb, s_vh, s_vn, L, s_m, BLOCK_N)
    k_pos_lo, k_pos_hi = tl.load(K_EXT + b * s_keb + tile * 4), tl.load(K_EXT + b * s_keb + tile * 4 + 1)
    k_pos, k_ts, k_live = _bias_meta(POS, TS, FLAG, b * s_m + keys, k_in)
    k_run = _consecutive(k_pos, k_live, k_pos_lo, BLOCK_N)
    pos_top = _position_top(REL_POS, h, NUM_POS, True)
    top_grad = tl.sum(tl.zeros((BLOCK_N,), dtype=tl.float32))
    time_grad = tl.zeros((TIME_SLOTS,), dtype=tl.float32)
    count = tl.load(Q_COUNT + b * s_cb + tile * 2)
    for i in range(0, count):
        at = b * s_ib + tile * s_iq + i
        flags = tl.load(Q_FLAGS + at)
        if (flags & (BIAS_IN_DQ_BIT | BAND_BIT)) == 0:  # else _hstu_bwd_dq or _hstu_bwd_rab_bands adds them
            q_tile = tl.load(Q_INDEX + at)
            rows, q_in, _, _, _, ds, allowed = _query_tile_grads(
                Q, DO, REQ, EVT, FLAG, POS, TS, REL_POS, REL_TIME, q_tile, flags, k, v, keys, k_in, k_req, k_evt,
                k_flag, pos_top, b, h, cols, s_qb, s_qh, s_qm, s_db, s_dh, s_dm, LQ, L, s_m, Q_OFFSET, NUM_POS,
                NUM_TIME, alpha, scale, RULE, True, False, PRECISION, BLOCK_M, BLOCK_N)
            q_pos, q_ts, q_live = _bias_meta(POS, TS, FLAG, b * s_m + rows + Q_OFFSET, q_in)
            near, t_lo, t_hi = _bias_form(flags)
            q_pos_lo, q_pos_hi = tl.load(Q_EXT + b * s_qeb + q_tile * 4), tl.load(Q_EXT + b * s_qeb + q_tile * 4 + 1)
            total = tl.sum(ds)
            top_grad = _position_grad(D_REL_POS + h * NUM_POS, top_grad, ds, total, (flags & NEAR_BIT) == 0, q_pos,
                                      k_pos, q_live, q_pos_lo, q_pos_hi, k_pos_lo, k_pos_hi, k_run, allowed, NUM_POS,
                                      PRECISION, BLOCK_N)
            time_grad = _time_grad(time_grad, ds, total, q_ts[None, :], k_ts[:, None], t_lo, t_hi, NUM_TIME,
                                   TIME_SLOTS)
    tl.atomic_add(D_REL_POS + h * NUM_POS + NUM_POS - 1, top_grad, mask=top_grad != 0.0)
    slot = tl.arange(0, TIME_SLOTS)
    tl.atomic_add(D_REL_TIME + h * NUM_TIME + slot, time_grad, mask=(slot < NUM_TIME) & (time_grad != 0.0))


@triton.jit
def _hstu_bwd_rab_bands(Q, K, V, DO, REQ, EVT, FLAG, POS, TS, REL_POS, REL_TIME, BAND_COUNT, BAND_INDEX, BAND_FLAGS,
                        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm, s_cb, s_ib, s_iq,
                        H, LQ, L, s_m, Q_OFFSET, NUM_POS, NUM_TIME, alpha, scale, NUM_K, Q_EXT, K_EXT, s_qeb, s_keb,
                        D_REL_POS, D_REL_TIME, RULE: tl.constexpr, PRECISION: tl.constexpr,
                        TIME_SLOTS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The bias tables' gradients of the BAND pairs (:func:`_bias_flags`: near pairs of tiles at
    consecutive positions, which :func:`_hstu_bwd_rab` skips), one program per diagonal band of
    tile pairs (query tile - key tile = ``program_id(0) - (NUM_K - 1)``). Within a band the pairs'
    first positions differ by one offset (in a sequence of one event per token), so their score
    gradients add up elementwise in registers and their diagonals are summed once per run of equal
    offsets (:func:`_add_diagonals`), where the key-tile programs grouped each pair (most of the
    bias-gradient kernel's time: benchmarks/results/gpu_logs/bias_grad_knockouts_NVIDIA_H100.log).
    ``BAND_COUNT`` .. ``BAND_FLAGS``: per band its BAND pairs, by key tile (:func:`_band_lists`). The
    time table's gradient is per pair, as in :func:`_hstu_bwd_rab`."""
    tl.static_assert((BLOCK_M == BLOCK_N) & (BLOCK_N >= 64), "the position-bias gradient needs square tiles >= 64")
    band, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    shift = band - (NUM_K - 1)  # query tile - key tile
    cols = tl.arange(0, D)
    pos_top = _position_top(REL_POS, h, NUM_POS, True)
    time_grad = tl.zeros((TIME_SLOTS,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # [keys, queries]: the run's summed score gradients
    offset = NO_RUN  # the run's first query position - first key position
    for i in range(0, tl.load(BAND_COUNT + b * s_cb + band * 2)):
        at = b * s_ib + band * s_iq + i
        k_tile = tl.load(BAND_INDEX + at)
        flags = tl.load(BAND_FLAGS + at)
        q_tile = k_tile + shift
        keys, k_in, k, v, k_req, k_evt, k_flag = _key_tile(K, V, REQ, EVT, FLAG, b, h, k_tile, cols, s_kb, s_kh,
                                                           s_kn, s_vb, s_vh, s_vn, L, s_m, BLOCK_N)
        rows, q_in, _, _, _, ds, _ = _query_tile_grads(
            Q, DO, REQ, EVT, FLAG, POS, TS, REL_POS, REL_TIME, q_tile, flags, k, v, keys, k_in, k_req, k_evt,
            k_flag, pos_top, b, h, cols, s_qb, s_qh, s_qm, s_db, s_dh, s_dm, LQ, L, s_m, Q_OFFSET, NUM_POS,
            NUM_TIME, alpha, scale, RULE, True, False, PRECISION, BLOCK_M, BLOCK_N)
        pair_offset = tl.load(Q_EXT + b * s_qeb + q_tile * 4) - tl.load(K_EXT + b * s_keb + k_tile * 4)
        if pair_offset != offset:  # a new run: the last one's diagonals
            if offset != NO_RUN:
                _add_diagonals(D_REL_POS + h * NUM_POS, acc, offset, NUM_POS, PRECISION, BLOCK_N)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            offset = pair_offset
        acc += ds
        _, q_ts, _ = _bias_meta(POS, TS, FLAG, b * s_m + rows + Q_OFFSET, q_in)
        _, k_ts, _ = _bias_meta(POS, TS, FLAG, b * s_m + keys, k_in)
        _, t_lo, t_hi = _bias_form(flags)
        time_grad = _time_grad(time_grad, ds, tl.sum(ds), q_ts[None, :], k_ts[:, None], t_lo, t_hi, NUM_TIME,
                               TIME_SLOTS)
    if offset != NO_RUN:
        _add_diagonals(D_REL_POS + h * NUM_POS, acc, offset, NUM_POS, PRECISION, BLOCK_N)
    slot = tl.arange(0, TIME_SLOTS)
    tl.atomic_add(D_REL_TIME + h * NUM_TIME + slot, time_grad, mask=(slot < NUM_TIME) & (time_grad != 0.0))


@triton.jit
def _time_rows_flush(time_grad, lo_rows, hi_rows, t, SLOTS: tl.constexpr):
    """``time_grad`` ``[SLOTS]`` plus the sums of the row accumulators of buckets ``t`` and ``t + 1``."""
    slot = tl.arange(0, SLOTS)
    return time_grad + tl.where(slot == t, tl.sum(lo_rows), tl.where(slot == t + 1, tl.sum(hi_rows), 0.0))


@triton.jit
def _hstu_bwd_dq(Q, K, V, DO, DQ, REQ, EVT, FLAG, POS, TS, REL_POS, REL_TIME, KV_COUNT, KV_INDEX, KV_FLAGS,
                 s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm, s_cb, s_ib, s_iq,
                 H, LQ, L, s_m, Q_OFFSET, NUM_POS, NUM_TIME, alpha, scale,
                 s_gb, s_gh, s_gm, D_REL_POS, D_REL_TIME, RULE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BIAS_GRADS: tl.constexpr, PRECISION: tl.constexpr, TIME_SLOTS: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ without atomics: one query tile per program over the forward schedule (recomputes the
    scores once more: two extra matrix products per tile pair). ``BIAS_GRADS``: it also adds the bias
    gradients of the pairs flagged BIAS_IN_DQ (the simple pairs, past the position table in at most
    two time buckets: :func:`genrec.ops.triton.tiles.simple_bias_pairs`), which :func:`_hstu_bwd_rab`
    then skips: here they are row sums of ``ds`` (a reduction within each row's threads, no
    barrier), gathered per bucket in registers. The schedule visits the simple key tiles first, in
    ascending order, so a query tile's time bucket only falls: the rows' sums reach the time table's
    registers when it changes."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    q = _load_tile(Q, b, h, rows, cols, s_qb, s_qh, s_qm, LQ)
    do = _load_tile(DO, b, h, rows, cols, s_db, s_dh, s_dm, LQ)
    q_tok = rows + Q_OFFSET
    q_in = rows < LQ
    q_req, q_evt, q_flag = _rule_meta(REQ, EVT, FLAG, b * s_m + q_tok, q_tok < s_m)
    pos_top = _position_top(REL_POS, h, NUM_POS, HAS_BIAS)
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    if BIAS_GRADS:
        q_ts = tl.load(TS + b * s_m + q_tok, mask=q_in, other=0)
        pos_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)  # the position table's last slot, per query
        lo_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)  # time bucket t, per query
        hi_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)  # time bucket t + 1
        t = -1
        time_grad = tl.zeros((TIME_SLOTS,), dtype=tl.float32)
    for part in tl.static_range(2):
        if HAS_BIAS or part == 0:
            lo, hi = _pair_range(KV_COUNT, b * s_cb + tile * 2, part, HAS_BIAS)
            for i in range(lo, hi):
                keys, k_in, k, v, s, flags = _visited_key_tile(
                    K, V, POS, TS, REL_POS, REL_TIME, KV_INDEX, KV_FLAGS, i, q, q_tok, q_in, pos_top, b, h, tile,
                    cols, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ib, s_iq, L, s_m, NUM_POS, NUM_TIME, alpha, HAS_BIAS,
                    part == 0, PRECISION, BLOCK_N)  # [BLOCK_M, BLOCK_N] scores
                sig = _sigmoid(s, PRECISION)
                da = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
                ds = da * scale * sig * (1.0 + s * (1.0 - sig))
                if (flags & FULL_BIT) == 0:
                    k_req, k_evt, k_flag = _rule_meta(REQ, EVT, FLAG, b * s_m + keys, keys < s_m)
                    allowed = _allowed(q_tok[:, None], keys[None, :], q_req[:, None], k_req[None, :],
                                       q_evt[:, None], k_evt[None, :], q_flag[:, None], k_flag[None, :], RULE)
                    ds = tl.where(allowed, ds, 0.0)
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                if BIAS_GRADS and part == 0:  # the simple pairs: BIAS_IN_DQ ones among them
                    if (flags & BIAS_IN_DQ_BIT) != 0:
                        _, t_lo, t_hi = _bias_form(flags)
                        by_row = tl.sum(ds, axis=1)  # [BLOCK_M]
                        pos_rows += by_row
                        if t_lo != t:
                            time_grad = _time_rows_flush(time_grad, lo_rows, hi_rows, t, TIME_SLOTS)
                            lo_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
                            hi_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
                            t = t_lo
                        if t_hi == t_lo + 1:  # two buckets: the pairs at or above t_hi's lower edge
                            k_ts = tl.load(TS + b * s_m + keys, mask=k_in, other=0)
                            upper = tl.sum(tl.where(_bucket_at_least(q_ts[:, None] - k_ts[None, :], t_hi), ds, 0.0),
                                           axis=1)
                            hi_rows += upper
                            lo_rows += by_row - upper
                        else:
                            lo_rows += by_row
    out = DQ + b * s_gb + h * s_gh + rows[:, None] * s_gm + cols[None, :]
    tl.store(out, (dq * alpha).to(DQ.dtype.element_ty), mask=rows[:, None] < LQ)
    if BIAS_GRADS:
        time_grad = _time_rows_flush(time_grad, lo_rows, hi_rows, t, TIME_SLOTS)
        top = tl.sum(pos_rows)
        tl.atomic_add(D_REL_POS + h * NUM_POS + NUM_POS - 1, top, mask=top != 0.0)
        slot = tl.arange(0, TIME_SLOTS)
        tl.atomic_add(D_REL_TIME + h * NUM_TIME + slot, time_grad, mask=(slot < NUM_TIME) & (time_grad != 0.0))


def _kernel_meta(layout: TokenLayout) -> KernelMeta:
    """The layout's per-token fields as the schedule builders read them, from its cache. Not among the
    keys :func:`prepare_attention` returns: the kernels read :func:`_aligned_rows` instead, so a
    prepared batch carries no second copy of them."""
    return layout.cached(("triton_meta",), lambda: KernelMeta.from_layout(layout))


def _pairs_and_full(layout: TokenLayout, tile: Tile, q_offset: int) -> tuple:
    """``[B, nQ, nK]`` tile pairs to visit and those the rule allows whole: per layout and tile shape,
    shared by both orientations (the forward's and dK/dV's) and by the schedules with the bias."""
    block_q, block_k = tile[:2]

    def build():
        meta = _kernel_meta(layout)

        def reduction(start: int, size: int) -> tuple:  # per tile size, shared by the tile shapes
            return layout.cached(("triton_reduction", layout.query_tag(start), size),
                                 lambda: tile_reduction(meta, start, size))
        stats = tile_stats(meta, block_q, block_k, q_offset, reduction)
        return (tile_pairs(meta, layout.rule, block_q, block_k, q_offset, stats),
                tile_full(meta, layout.rule, block_q, block_k, q_offset, stats))
    return layout.cached(("triton_pairs", block_q, block_k, layout.query_tag(q_offset)), build)


def _schedule_key(layout: TokenLayout, tile: Tile, q_offset: int, transpose: bool) -> tuple:
    return ("triton_tiles", *tile[:2], layout.query_tag(q_offset), transpose)


def _schedule(layout: TokenLayout, tile: Tile, q_offset: int, transpose: bool):
    """Per query tile the key tiles to visit (forward, dQ), or per key tile the query tiles (dK/dV),
    without the bias (:func:`_bias_flags` lists them with it): built once per layout, shared by
    every layer."""
    def build():
        pairs, full = _pairs_and_full(layout, tile, q_offset)
        return tile_lists(pairs.mT, full.mT) if transpose else tile_lists(pairs, full)
    return layout.cached(_schedule_key(layout, tile, q_offset, transpose), build)


def _splits_bias_grads(has_bias: bool, dq_separate: bool, bwd_tile: Tile, dq_tile: Tile) -> bool:
    """Whether the dQ kernel takes over the bias gradients of some tile pairs from
    :func:`_hstu_bwd_rab` (one decision for the schedules' flags and the dQ launch): with the bias and
    the separate dQ kernel on, its pairs must each cover whole pairs of the dK/dV schedule (same key
    tiles, query tiles a multiple)."""
    return has_bias and dq_separate and dq_tile[1] == bwd_tile[1] and dq_tile[0] % bwd_tile[0] == 0


def _band_lists(band: torch.Tensor, full: torch.Tensor, forms: torch.Tensor) -> tuple:
    """The diagonal-band kernel's schedule from the ``[B, nQ, nK]`` BAND pairs: per band (query tile -
    key tile + nK - 1) the counts ``[B, nQ + nK - 1, 2]``, the key tiles of its BAND pairs in order
    and each one's flags (FULL, the bias form), as :func:`tile_lists` lists a tile's pairs."""
    if band.shape[1] == 0:  # no query (a last block asked for no output): one query tile of no pair
        band, full, forms = (t.new_zeros(t.shape[0], 1, t.shape[2]) for t in (band, full, forms))
    _, num_q, num_k = band.shape
    k_tile = torch.arange(num_k, device=band.device)
    q_tile = torch.arange(num_q + num_k - 1, device=band.device)[:, None] - (num_k - 1) + k_tile  # [nBands, nK]
    inside = (q_tile >= 0) & (q_tile < num_q)
    q_tile = q_tile.clamp(0, num_q - 1)

    def sheared(t: torch.Tensor) -> torch.Tensor:  # [B, nQ, nK] -> [B, nBands, nK]
        return t[:, q_tile, k_tile]
    count, index, flags = tile_lists(sheared(band) & inside, sheared(full))
    return count, index, (flags | sheared(forms).gather(-1, index.long())).contiguous()


def _bias_flags(layout: TokenLayout, grads: bool, dq_separate: bool, tile_table: tuple,
                q_offset: int, num_pos: int, num_time: int, split: bool, bands: bool) -> tuple:
    """The forward, dK/dV and dQ schedules with the bias: each list led by its simple pairs
    (:func:`genrec.ops.triton.tiles.simple_bias_pairs`, :func:`tile_lists`), each pair's bias form in
    its flags, BIAS_IN_DQ set where the dQ kernel adds the pair's bias gradients (``split``: its
    simple pairs; a dK/dV pair inherits its dQ pair's flag), BAND where the diagonal-band kernel
    does (``bands``: near pairs of tiles at consecutive positions of the rest), so each pair's
    gradients are added by exactly one kernel; the band kernel's schedule (:func:`_band_lists`), and
    the dK/dV tiles' extremes that the bias-gradient kernels read. Without ``grads`` the backward
    schedules are the forward's (placeholders), without ``dq_separate`` the dQ schedule is the
    dK/dV one's (dQ in its kernel)."""
    _, (bwd_q, bwd_k), (dq_q, dq_k) = (tile[:2] for tile in tile_table)
    meta = _kernel_meta(layout)

    def extremes(start: int, block: int) -> torch.Tensor:
        return layout.cached(("triton_extremes", layout.query_tag(start), block),
                             lambda: tile_extremes(meta, start, block))

    def forms(block_q: int, block_k: int) -> torch.Tensor:  # [B, nQ, nK]
        return layout.cached(("triton_forms", block_q, block_k, layout.query_tag(q_offset), num_pos, num_time),
                             lambda: bias_forms(extremes(q_offset, block_q), extremes(0, block_k), num_pos, num_time))

    def simple(block_q: int, block_k: int) -> torch.Tensor:  # [B, nQ, nK]: the lists' lead and the dQ share
        return layout.cached(("triton_simple", block_q, block_k, layout.query_tag(q_offset), num_pos, num_time),
                             lambda: simple_bias_pairs(forms(block_q, block_k)))

    def listed(tile: Tile, extra: torch.Tensor | None = None, transpose: bool = False):
        def lists():  # shared by the forward and dQ schedules where their tiles are the same
            pairs, full = _pairs_and_full(layout, tile, q_offset)
            first = simple(*tile[:2])
            return tile_lists(pairs.mT, full.mT, first.mT) if transpose else tile_lists(pairs, full, first)
        key = ("triton_bias_lists", *tile[:2], layout.query_tag(q_offset), transpose, num_pos, num_time)
        count, index, flags = layout.cached(key, lists)
        bits = forms(*tile[:2]) if extra is None else forms(*tile[:2]) | extra  # [B, nQ, nK]
        return count, index, (flags | (bits.mT if transpose else bits).gather(-1, index.long())).contiguous()
    forward = listed(tile_table[0])
    if grads:
        in_dq = simple(dq_q, dq_k).int() * BIAS_IN_DQ if split else None  # [B, nQ, nK]
        bwd_rows = forms(bwd_q, bwd_k).shape[1]
        per_dq = None if in_dq is None else in_dq.repeat_interleave(dq_q // bwd_q, 1)[:, :bwd_rows]
        extra, by_band = per_dq, forward  # without bands: no BAND bits, the band schedule a placeholder
        if bands:
            pairs, full = _pairs_and_full(layout, tile_table[1], q_offset)
            runs = consecutive_tiles(meta, q_offset, bwd_q)[:, :, None] & consecutive_tiles(meta, 0, bwd_k)[:, None]
            band = pairs & ((forms(bwd_q, bwd_k) & NEAR) != 0) & runs  # [B, nQ, nK]
            if per_dq is not None:
                band &= per_dq == 0
            extra = band.int() * BAND if per_dq is None else per_dq | band.int() * BAND
            by_band = _band_lists(band, full, forms(bwd_q, bwd_k))
        backward = listed(tile_table[1], extra, transpose=True)
        dq = listed(tile_table[2], in_dq) if dq_separate else backward
    else:
        backward = dq = by_band = forward
    return (forward, backward, dq, by_band, extremes(q_offset, bwd_q), extremes(0, bwd_k))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _sizes(count: torch.Tensor, index: torch.Tensor, q: torch.Tensor, seq: int, meta: list[torch.Tensor],
           q_offset: int, num_pos: int, num_time: int, scale: float) -> tuple:
    """The scalar arguments every kernel takes after its tensors' strides: schedule strides, sizes
    (the layout's length, and its metadata's row stride), bias-table sizes and the two score scales."""
    b, h, lq, d = q.shape
    return (count.stride(0), index.stride(0), index.stride(1), h, lq, seq, meta[0].stride(0), q_offset,
            num_pos, num_time, 1.0 / math.sqrt(d), scale)


def _strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Batch, head and token strides of ``[B, H, L, Dh]`` tensors."""
    return tuple(s for t in tensors for s in t.stride()[:3])


# The fused attention as two custom ops (forward; backward), so that torch.compile and torch.export
# trace through them: each has a fake (meta) implementation giving its outputs' shapes and strides,
# and the forward's autograd formula calls the backward op. Their tensors are what the kernels read;
# the token layout is reduced to them by :func:`hstu_attention`. The backward's schedules are
# forward inputs (built once per layout, not per layer), and placeholders when no gradient is needed.
# The layout's tensors come packed in lists (``meta``: request, event, flags, position, timestamp and
# the bias's two extremes tables; ``schedules``: count, index and flags of the forward, dK/dV, dQ
# and band schedules; ``tiles``: the tiles' four numbers each) because torch's autograd wrapper of
# a custom op walks the op's schema once per argument on every call: with the 32 separate
# arguments these had, a forward with gradients took ~300 µs of host time before its launch, ~160
# packed (benchmarks/attention_host.py), where sparse DFGR's forward kernel takes ~220 µs a layer
# in a training step at N = 1024.
@torch.library.custom_op("genrec::hstu_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: list[torch.Tensor], rel_pos: torch.Tensor,
            rel_time: torch.Tensor, schedules: list[torch.Tensor], scale: float, q_offset: int, rule: int,
            has_bias: bool, tiles: list[int], dq_separate: bool) -> torch.Tensor:
    b, h, lq, d = q.shape
    seq = k.shape[2]
    count, index, full = schedules[:3]
    block_m, block_n, warps, stages = tiles[:4]
    out = torch.empty(b, lq, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)  # [B, H, LQ, Dh]
    grid = (triton.cdiv(lq, block_m), b * h)
    _hstu_fwd[grid](q, k, v, out, *meta[:5], rel_pos, rel_time, count, index, full,
                    *_strides(q, k, v, out),
                    *_sizes(count, index, q, seq, meta, q_offset, rel_pos.shape[-1], rel_time.shape[-1], scale),
                    RULE=rule, HAS_BIAS=has_bias, PRECISION=_precision(q.dtype), D=d, BLOCK_M=block_m,
                    BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out


@_fwd_op.register_fake
def _fwd_fake(q, k, v, *args, **kwargs) -> torch.Tensor:
    b, h, lq, d = q.shape
    return q.new_empty(b, lq, h, d).transpose(1, 2)


@torch.library.custom_op("genrec::hstu_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: list[torch.Tensor],
            rel_pos: torch.Tensor, rel_time: torch.Tensor, schedules: list[torch.Tensor], scale: float,
            q_offset: int, rule: int, has_bias: bool, tiles: list[int],
            dq_separate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and the fp32 gradients of both bias tables; ``schedules`` those of dK/dV, dQ and the
    bands, ``tiles`` the dK/dV tile then the dQ tile (as :func:`_fwd_op` packs them)."""
    b, h, lq, d = q.shape
    seq = k.shape[2]
    q_ext, k_ext = meta[5:7]
    bwd_count, bwd_index, bwd_full, dq_count, dq_index, dq_full, band_count, band_index, band_flags = schedules
    bwd_tile, dq_tile = tiles[:4], tiles[4:8]
    dq = (torch.empty if dq_separate else torch.zeros)(b, h, lq, d, device=q.device, dtype=torch.float32)
    dk = torch.empty(b, seq, h, d, device=q.device, dtype=k.dtype).transpose(1, 2)
    dv = torch.empty(b, seq, h, d, device=q.device, dtype=v.dtype).transpose(1, 2)
    d_pos, d_time = torch.zeros_like(rel_pos), torch.zeros_like(rel_time)
    reads = (*meta[:5], rel_pos, rel_time)  # what every backward kernel reads after its gradients
    strides = _strides(q, k, v, grad_out)
    precision = _precision(q.dtype)
    block_m, block_n, warps, stages = bwd_tile
    launch = dict(D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    sizes = _sizes(bwd_count, bwd_index, q, seq, meta, q_offset, rel_pos.shape[-1], rel_time.shape[-1], scale)
    dq_atomic = not dq_separate and lq > 0  # no query rows (a last block asked for none): no dQ, no descriptor
    dq_desc = TensorDescriptor.from_tensor(dq.view(b * h, lq, d), [1, block_m, d]) if dq_atomic else None
    _hstu_bwd[(triton.cdiv(seq, block_n), b * h)](
        q, k, v, grad_out, dq, dq_desc, dk, dv, *reads, bwd_count, bwd_index, bwd_full, *strides, *sizes,
        *_strides(dq, dk),
        RULE=rule, HAS_BIAS=has_bias, PRECISION=precision, DQ_ATOMIC=dq_atomic, **launch)
    time_slots = triton.next_power_of_2(max(rel_time.shape[-1], 16))
    split = _splits_bias_grads(has_bias, dq_separate, bwd_tile, dq_tile)  # as hstu_attention flagged
    if has_bias:
        _hstu_bwd_rab[(triton.cdiv(seq, block_n), b * h)](
            q, k, v, grad_out, *reads, bwd_count, bwd_index, bwd_full, *strides, *sizes, q_ext, k_ext,
            q_ext.stride(0), k_ext.stride(0), d_pos, d_time, RULE=rule, PRECISION=precision, TIME_SLOTS=time_slots,
            **launch)
    if has_bias and d <= BAND_MAX_DIM:
        num_k = triton.cdiv(seq, block_n)
        _hstu_bwd_rab_bands[(triton.cdiv(lq, block_m) + num_k - 1, b * h)](
            q, k, v, grad_out, *reads, band_count, band_index, band_flags, *strides,
            *_sizes(band_count, band_index, q, seq, meta, q_offset, rel_pos.shape[-1], rel_time.shape[-1], scale),
            num_k, q_ext, k_ext, q_ext.stride(0), k_ext.stride(0), d_pos, d_time, RULE=rule, PRECISION=precision,
            TIME_SLOTS=time_slots, **launch)
    if dq_separate:  # with the bias split, this launch also adds the BIAS_IN_DQ pairs' bias gradients
        block_m, block_n, warps, stages = dq_tile
        _hstu_bwd_dq[(triton.cdiv(lq, block_m), b * h)](
            q, k, v, grad_out, dq, *reads, dq_count, dq_index, dq_full, *strides,
            *_sizes(dq_count, dq_index, q, seq, meta, q_offset, rel_pos.shape[-1], rel_time.shape[-1], scale),
            *_strides(dq), d_pos, d_time, RULE=rule, HAS_BIAS=has_bias, BIAS_GRADS=split, PRECISION=precision,
            TIME_SLOTS=time_slots, D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return dq.to(q.dtype), dk, dv, d_pos, d_time


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, meta, rel_pos, rel_time, *args, **kwargs):
    b, h, lq, d = q.shape
    seq = k.shape[2]
    dk, dv = (t.new_empty(b, seq, h, d).transpose(1, 2) for t in (k, v))
    return q.new_empty(b, h, lq, d), dk, dv, torch.empty_like(rel_pos), torch.empty_like(rel_time)


_NON_TENSOR_ARGS = ("scale", "q_offset", "rule", "has_bias", "tiles", "dq_separate")


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, meta, rel_pos, rel_time, schedules, *rest = inputs
    ctx.save_for_backward(q, k, v, rel_pos, rel_time, *meta, *schedules[3:])  # the backward's schedules
    ctx.num_meta, ctx.num_schedules = len(meta), len(schedules)
    ctx.args = dict(zip(_NON_TENSOR_ARGS, rest, strict=True))


def _backward(ctx, grad_out: torch.Tensor):
    q, k, v, rel_pos, rel_time, *saved = ctx.saved_tensors
    meta, schedules = saved[:ctx.num_meta], saved[ctx.num_meta:]  # schedules: dK/dV, dQ, bands
    a = ctx.args
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv, d_pos, d_time = _bwd_op(grad_out, q, k, v, meta, rel_pos, rel_time, schedules, a["scale"],
                                         a["q_offset"], a["rule"], a["has_bias"], a["tiles"][4:], a["dq_separate"])
    bias = (d_pos, d_time) if a["has_bias"] else (None, None)
    # one gradient per input, a list of them per list (none for the layout's tensors)
    return dq, dk, dv, [None] * ctx.num_meta, *bias, [None] * ctx.num_schedules, *([None] * len(_NON_TENSOR_ARGS))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _aligned_rows(meta: KernelMeta) -> tuple[torch.Tensor, ...]:
    """The kernels' copies of the per-token fields (request, event, flags, position, timestamp):
    ``[B, L']``, L' the layout's length rounded up to 16, the padding zeros (invalid tokens). The
    kernels address a token's fields at ``sequence * L' + token`` (``s_m`` = L') and mask the rule's
    loads (request, event, flags) by ``token < L'``, not ``token < L``: a mask the JIT cannot prove
    uniform over 16 tokens splits a tile's loads into scalar ones, and with an odd L (sparse DFGR's
    N + T tokens) the forward loop's global loads doubled (sm_90, static:
    benchmarks/results/kernel_loops_d64_nobias_sm90_9ce88b3.md before, kernel_loops_d64_nobias_sm90.md
    after). The bias's loads (position, timestamp) keep the mask by L: at head dim 128 the wider
    masks cost the bias-gradient kernel more register spills."""
    length = meta.flags.shape[1]
    rows = meta.padded(length + -length % 16)
    return rows.request, rows.event, rows.flags, rows.position, rows.timestamp


def _plan(layout: TokenLayout, head_dim: int, dtype: torch.dtype, q_offset: int, num_pos: int | None,
          num_time: int | None, grads: bool, config: KernelConfig) -> tuple[tuple, tuple]:
    """What the kernels read from the layout for these arguments (``num_pos`` None: no bias), from its
    cache: ``(rows, tiles, forward, backward, dq, bands, q_ext, k_ext)`` (``rows``:
    :func:`_aligned_rows`; the band schedule and the extremes None without the bias), and the cache
    keys those are under. Where the cache lacks them they are built: once per layout, shared by every
    layer, or ahead of the step by :func:`prepare_attention`."""
    keys = [("triton_meta_rows",)]
    rows = layout.cached(keys[0], lambda: _aligned_rows(_kernel_meta(layout)))
    fwd_tile, bwd_tile, dq_tile = tile_table = config.tiles(head_dim, dtype)
    dq_separate = config.separates_dq(head_dim)
    if num_pos is not None:
        split = _splits_bias_grads(True, dq_separate, bwd_tile, dq_tile)
        banded = head_dim <= BAND_MAX_DIM  # as _bwd_op launches the band kernel
        keys.append(("triton_bias_flags", tuple(fwd_tile), tuple(bwd_tile), tuple(dq_tile), layout.query_tag(q_offset),
                     num_pos, num_time, grads, dq_separate, split, banded))
        forward, backward, dq, bands, q_ext, k_ext = layout.cached(keys[-1], lambda: _bias_flags(
            layout, grads, dq_separate, tile_table, q_offset, num_pos, num_time, split, banded))
        return (rows, tile_table, forward, backward, dq, bands, q_ext, k_ext), tuple(keys)
    def scheduled(tile: Tile, transpose: bool):  # a schedule, its key noted where it is read
        keys.append(_schedule_key(layout, tile, q_offset, transpose))
        return _schedule(layout, tile, q_offset, transpose)
    # placeholders where no gradient is asked, or dQ comes from the dK/dV kernel
    forward = scheduled(fwd_tile, transpose=False)
    backward = scheduled(bwd_tile, transpose=True) if grads else forward
    dq = scheduled(dq_tile, transpose=False) if grads and dq_separate else backward
    return (rows, tile_table, forward, backward, dq, None, None, None), tuple(dict.fromkeys(keys))


def prepare_attention(layout: TokenLayout, head_dim: int, dtype: torch.dtype, num_pos: int | None,
                      num_time: int | None, grads: bool, q_offset: int = 0,
                      config: KernelConfig = DEFAULT_CONFIG) -> tuple[tuple, ...]:
    """Build into ``layout``'s cache what :func:`hstu_attention` will read for queries of ``dtype`` and
    ``head_dim`` (``num_pos``/``num_time``: the bias tables' slots, None without the bias; ``grads``:
    the backward's schedules too), on whatever device the layout is: a data-loader worker does it on
    the host, ahead of the step. Returns the keys of those entries (the ones built on the way to them
    are not read again)."""
    return _plan(layout, head_dim, dtype, q_offset, num_pos, num_time, grads, config)[1]


def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                   rel_pos: torch.Tensor | None, rel_time: torch.Tensor | None, scale: float,
                   q_offset: int = 0, config: KernelConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """q ``[B, H, L - q_offset, Dh]``, k, v ``[B, H, L, Dh]`` -> ``[B, H, L - q_offset, Dh]``.
    Inner strides must be 1 (any head/sequence strides: the heads of a fused projection are views)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"triton hstu_attention needs unit stride in the head dim of {name}")
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"the triton backend needs a head dim that is a power of two in 16..256, got {d}")
    tables = () if rel_pos is None else (rel_pos, rel_time)
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *tables))
    has_bias = rel_pos is not None
    sizes = (rel_pos.shape[-1], rel_time.shape[-1]) if has_bias else (None, None)
    (rows, (fwd_tile, bwd_tile, dq_tile), forward, backward, dq, bands, q_ext, k_ext), _ = _plan(
        layout, d, q.dtype, q_offset, *sizes, grads, config)
    if has_bias:  # fp32 copies: autograd casts the tables' gradients back to their dtype
        rel_pos, rel_time = rel_pos.float().contiguous(), rel_time.float().contiguous()
    else:
        rel_pos = rel_time = torch.zeros(1, device=q.device, dtype=torch.float32)
        q_ext = k_ext = torch.zeros(1, 1, 4, device=q.device, dtype=torch.int32)  # unread
        bands = forward  # a placeholder, unread
    return _fwd_op(q, k, v, [*rows, q_ext, k_ext],
                   rel_pos, rel_time, [*forward, *backward, *dq, *bands], scale, q_offset, RULE_IDS[layout.rule],
                   has_bias, [*fwd_tile, *bwd_tile, *dq_tile], config.separates_dq(d))
