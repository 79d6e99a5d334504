"""What the fused kernels read instead of a dense mask: per-token int32 metadata and, per query
tile, the list of key tiles that may hold an allowed pair (the block-sparse schedule).

Both are plain PyTorch and run anywhere, so the schedule is tested on CPU against the dense masks of
:mod:`genrec.ops.masks`: a tile pair is listed whenever the rule allows any pair in it (tiles are
skipped, never pairs; the kernel evaluates the exact rule per element). A tile pair is judged from
per-tile minima and maxima of the metadata, which is exact for the sorted layouts the models build
and conservative (extra work, never a wrong answer) otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genrec.ops.layout import TokenLayout, check_time_span

VALID, FAKE = 1, 2  # bits of KernelMeta.flags
FULL, BIAS_IN_DQ, NEAR = 1, 2, 4  # bits of a schedule's per-pair flags (tile_lists, simple_bias_pairs, bias_forms)
BAND = 1 << 24  # and a pair whose position gradient the diagonal-band kernel adds (hstu._bias_flags)
LO_SHIFT, HI_SHIFT, BUCKET_MASK = 8, 16, 31  # a pair's time buckets in its flags (bias_forms; buckets <= 31)
_BIG = 2**30
POS_BOUND = 2**29  # above any position: differences of +-POS_BOUND fit int32
TS_TOP = 2**31 - 1  # kernel timestamps lie in [0, 2^31)


@dataclass
class KernelMeta:
    """``[B, L]`` int32 contiguous copies of the layout fields a kernel reads per token."""

    request: torch.Tensor
    event: torch.Tensor
    flags: torch.Tensor  # VALID | FAKE bits
    position: torch.Tensor
    timestamp: torch.Tensor  # seconds since the batch's earliest timestamp

    @classmethod
    def from_layout(cls, layout: TokenLayout) -> KernelMeta:
        # A CUDA graph cannot read a value back while it records: genrec.serve.graphs checks each
        # history and request it is given instead. (Under torch.compile the check is a device assert,
        # and dynamo cannot trace the capture query: asked only outside it.)
        capturing = (not torch.compiler.is_compiling() and layout.timestamp.is_cuda
                     and torch.cuda.is_current_stream_capturing())
        if not capturing:
            check_time_span(layout.timestamp)
        ts = layout.timestamp - layout.timestamp.min()
        flags = layout.valid.int() * VALID + layout.fake.int() * FAKE

        def i32(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.int32).contiguous()

        return cls(i32(layout.request), i32(layout.event), i32(flags), i32(layout.position), i32(ts))

    def padded(self, length: int) -> KernelMeta:
        """The fields padded with zeros to ``length`` tokens (flags 0: invalid tokens); itself when
        they have that many."""
        pad = length - self.flags.shape[1]
        if not pad:
            return self
        return KernelMeta(*(F.pad(t, (0, pad)) for t in (self.request, self.event, self.flags, self.position,
                                                           self.timestamp)))


def _chunks(t: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    """``[..., L]`` -> ``[..., ceil(L / size), size]``, padded with ``fill`` (no copy where L divides)."""
    pad = -t.shape[-1] % size
    return (F.pad(t, (0, pad), value=fill) if pad else t).unflatten(-1, (-1, size))


_SUBSETS = ("", "real_", "fake_")  # token subsets of the statistics: valid, real, fake (stacked so)
_FIELDS = ("idx", "req", "evt")


def tile_reduction(meta: KernelMeta, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tile counts ``[3 subsets, B, nT]`` and minima / maxima ``[3 subsets x 3 fields, B, nT]``
    over the tokens ``start..L-1`` cut into tiles of ``size``. Empty sets give +_BIG for a minimum and
    -_BIG for a maximum, so every comparison with them fails. All fields and subsets go through one
    stacked reduction: this runs per serving request, where each small kernel's launch costs more
    than its work."""
    sl = slice(start, None)
    idx = torch.arange(start, meta.flags.shape[1], device=meta.flags.device, dtype=torch.int32)
    valid = (meta.flags[:, sl] & VALID) != 0
    fake = valid & ((meta.flags[:, sl] & FAKE) != 0)
    subsets = torch.stack([valid, valid & ~fake, fake])[:, None]  # [3 subsets, 1, B, L']
    values = torch.stack([idx.expand_as(valid), meta.request[:, sl], meta.event[:, sl]])  # [3 fields, B, L']
    counts = _chunks(subsets[:, 0], size, 0).sum(-1, dtype=torch.int32)  # [3, B, nT]
    low = _chunks(torch.where(subsets, values, _BIG), size, _BIG).amin(-1)  # [3 subsets, 3 fields, B, nT]
    high = _chunks(torch.where(subsets, values, -_BIG), size, -_BIG).amax(-1)
    return counts, low.flatten(0, 1), high.flatten(0, 1)


def _oriented(reduced: tuple[torch.Tensor, torch.Tensor, torch.Tensor], tile_dim: int) -> dict[str, torch.Tensor]:
    """:func:`tile_reduction`'s tables by name, shaped for the ``[B, nQ, nK]`` grid of tile pairs: ``tile_dim``
    1 (query tiles: ``[B, nT, 1]``) or 2 (key tiles: ``[B, 1, nT]``); one unsqueeze and one unbind per
    table, not one call per field (this is dispatch-bound)."""
    counts, low, high = (t.unsqueeze(4 - tile_dim).unbind() for t in reduced)
    out = dict(zip(("n_valid", "n_real", "n_fake"), counts, strict=True))
    for i, subset in enumerate(_SUBSETS):
        for j, name in enumerate(_FIELDS):
            out[f"{subset}{name}_min"], out[f"{subset}{name}_max"] = low[3 * i + j], high[3 * i + j]
    return out


def tile_stats(meta: KernelMeta, block_q: int, block_k: int, q_offset: int = 0,
               reduction: Callable[[int, int], tuple] | None = None) -> tuple[dict, dict]:
    """Statistics of the query tiles ``[B, nQ, 1]`` and key tiles ``[B, 1, nK]``, which
    :func:`tile_pairs` and :func:`tile_full` compare (computed once when both are needed).
    ``reduction(start, size)``: :func:`tile_reduction` of ``meta``, memoised, so the two sides share
    one where their tiles are the same (no cache offset); the kernels pass one memoised per layout,
    shared by every tile shape too."""
    if reduction is None:  # not `or`: dynamo of torch 2.11 cannot branch on a function's truth value
        reduction = functools.cache(functools.partial(tile_reduction, meta))
    return _oriented(reduction(q_offset, block_q), 1), _oriented(reduction(0, block_k), 2)


def tile_extremes(meta: KernelMeta, start: int, block: int) -> torch.Tensor:
    """``[B, ceil((L - start) / block), 4]`` int32: the lowest and highest position and timestamp of
    the valid tokens of each tile of ``block`` tokens from ``start`` ((POS_BOUND, -POS_BOUND, TS_TOP,
    0) where none is). :func:`bias_forms` compares them per tile pair, and the bias-gradient kernel
    reads a pair's position spans from them: reduced once per layout, not per tile pair and layer."""
    valid = (meta.flags[:, start:] & VALID) != 0

    def low_high(x: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (_chunks(torch.where(valid, x, low), block, low).amin(-1),
                _chunks(torch.where(valid, x, high), block, high).amax(-1))
    extremes = (*low_high(meta.position[:, start:], POS_BOUND, -POS_BOUND),
                *low_high(meta.timestamp[:, start:], TS_TOP, 0))
    return torch.stack(extremes, -1).to(torch.int32).contiguous()


def consecutive_tiles(meta: KernelMeta, start: int, block: int) -> torch.Tensor:
    """``[B, ceil((L - start) / block)]`` bool: tiles of ``block`` tokens from ``start`` whose tokens
    are all valid at consecutive positions (one event per token: a causal sequence, DFGR's real flow).
    All distances of a pair of such tiles lie on its diagonals, at offsets their first positions fix."""
    pos = _chunks(meta.position[:, start:], block, 0)  # [B, nT, block]
    valid = _chunks((meta.flags[:, start:] & VALID) != 0, block, False)  # padding: not valid
    step = torch.arange(block, device=pos.device, dtype=pos.dtype)
    return (valid & (pos == pos[..., :1] + step)).all(-1)


def bias_forms(q_extremes: torch.Tensor, k_extremes: torch.Tensor, num_pos: int, num_time: int) -> torch.Tensor:
    """``[B, nQ, nK]`` int32 schedule flags that pick each tile pair's relative-bias form in the
    kernels, from the :func:`tile_extremes` of its query and key tiles: NEAR where a distance may
    fall before the position table's last slot (else the position bias is that one value), and the
    lowest and highest time bucket of the pair (bits ``LO_SHIFT`` and ``HI_SHIFT``; the bucket is
    monotone in the time difference, so the extremes bound it). Decided here once per layout, the
    kernels read one word per pair where they combined span rows, a chain of dependent loads."""
    q, k = q_extremes[:, :, None], k_extremes[:, None]  # [B, nQ, 1, 4], [B, 1, nK, 4]: int32 differences fit
    near = q[..., 0] - k[..., 1] < num_pos - 1
    # time_bucket of the lowest and highest difference, in one pass: floor(log2(1 + dt)) is frexp's
    # exponent - 1, exact for every int32 difference (genrec.ops.masks.time_bucket's values, fewer ops;
    # time_bucket itself keeps its corrected log2: inductor's CPU code for frexp does not compile, and
    # it runs in the exported serving models)
    spans = torch.stack([q[..., 2] - k[..., 3], q[..., 3] - k[..., 2]]).clamp_(min=0).double() + 1  # [2, B, nQ, nK]
    low, high = (torch.frexp(spans).exponent - 1).clamp_(max=num_time - 1)
    return near.int() * NEAR | low << LO_SHIFT | high << HI_SHIFT


def simple_bias_pairs(forms: torch.Tensor) -> torch.Tensor:
    """``[B, nQ, nK]`` bool from :func:`bias_forms`: tile pairs whose relative bias is one value of
    the position table (every distance at or past its last slot) and at most two time buckets. The
    kernels visit them first, in a loop compiled for that form alone (:func:`tile_lists`), and
    their bias gradients are row sums of the score gradients, split once by time: the dQ kernel adds
    those (no barrier, no recomputed scores) and the bias-gradient kernel skips the pair."""
    low, high = (forms >> LO_SHIFT) & BUCKET_MASK, (forms >> HI_SHIFT) & BUCKET_MASK
    return ((forms & NEAR) == 0) & (high <= low + 1)


def tile_pairs(meta: KernelMeta, rule: str, block_q: int, block_k: int, q_offset: int = 0,
               stats: tuple[dict, dict] | None = None) -> torch.Tensor:
    """``[B, nQ, nK]`` bool: may query tile i (tokens ``q_offset + i*block_q ...``) read key tile j?"""
    q, k = stats or tile_stats(meta, block_q, block_k, q_offset)
    if rule == "causal":
        return k["idx_min"] <= q["idx_max"]
    if rule == "request_causal":
        own_event = (k["evt_min"] <= q["evt_max"]) & (k["evt_max"] >= q["evt_min"]) & (k["idx_min"] <= q["idx_max"])
        return (k["req_min"] < q["req_max"]) | own_event
    if rule == "dual_flow":
        real_causal = k["real_evt_min"] <= q["real_evt_max"]
        earlier = k["real_req_min"] < q["fake_req_max"]
        itself = (k["idx_min"] <= q["fake_idx_max"]) & (k["idx_max"] >= q["fake_idx_min"])
        return real_causal | earlier | itself
    raise ValueError(f"mask rule {rule!r} has no tile schedule in genrec.ops.triton.tiles.tile_pairs")


def tile_full(meta: KernelMeta, rule: str, block_q: int, block_k: int, q_offset: int = 0,
              stats: tuple[dict, dict] | None = None) -> torch.Tensor:
    """``[B, nQ, nK]`` bool: does the rule allow *every* pair of the tile pair (all tokens valid)?
    The kernels skip the per-element mask there (the off-diagonal bulk of a causal mask)."""
    q, k = stats or tile_stats(meta, block_q, block_k, q_offset)
    complete = (q["n_valid"] == block_q) & (k["n_valid"] == block_k)
    if rule == "causal":
        return complete & (k["idx_max"] <= q["idx_min"])
    if rule == "request_causal":
        return complete & (k["req_max"] < q["req_min"])
    if rule == "dual_flow":
        all_real_k = k["n_real"] == block_k
        real = (q["n_real"] == block_q) & (k["real_evt_max"] <= q["real_evt_min"])
        fake = (q["n_fake"] == block_q) & (k["real_req_max"] < q["fake_req_min"])
        return complete & all_real_k & (real | fake)
    raise ValueError(f"mask rule {rule!r} has no full-tile test in genrec.ops.triton.tiles.tile_full")


def tile_lists(pairs: torch.Tensor, full: torch.Tensor,
               simple: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, nQ, nK]`` pairs and full flags -> per query tile the counts ``[B, nQ, 2]`` (the pairs
    listed, and how many of them lead the list as simple ones), the key tiles ``[B, nQ, nK]`` with
    the listed ones first, and each one's flags (int32: the FULL bit; ``hstu._bias_flags`` adds the
    bias forms and BIAS_IN_DQ). ``simple`` (with the relative bias: :func:`simple_bias_pairs`): the
    listed pairs it marks come first, then the other listed ones, each group in ascending order;
    the kernels run the first through a loop compiled for the simple bias form alone, without the
    per-pair table reads and time buckets in its body. Without it none is simple.
    Kept at full width: trimming to the largest count would cost a device-to-host sync."""
    group = (~pairs).to(torch.int8)  # listed 0, unlisted 1
    if simple is not None:  # simple 0, other listed 1, unlisted 2
        group = group * 2 + (pairs & ~simple).to(torch.int8)
    order = torch.sort(group, dim=-1, stable=True).indices
    count = pairs.sum(-1, dtype=torch.int32)
    first = torch.zeros_like(count) if simple is None else (pairs & simple).sum(-1, dtype=torch.int32)
    return (torch.stack([count, first], -1), order.to(torch.int32).contiguous(),
            (full.gather(-1, order).to(torch.int32) * FULL).contiguous())
