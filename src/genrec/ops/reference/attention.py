"""Reference attention: dense masks and biases materialised from the token layout.

``hstu_attention``: HSTU's pointwise aggregated attention (Zhai et al. 2024, eq. 2),
``A = SiLU(alpha * Q K^T + rab) * scale ⊙ mask``, ``out = A V``. No softmax, so the mass a query
gathers grows with its history; ``scale`` is a constant (1 / max tokens), identical in training
and serving, so the two agree.

``softmax_attention``: scaled dot-product softmax attention with an optional ALiBi bias
(Press et al. 2021): ``-slope_h * (position_q - position_k)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genrec.ops.layout import TokenLayout
from genrec.ops.masks import build_mask, time_bucket


def relative_bias(layout: TokenLayout, rel_pos: torch.Tensor, rel_time: torch.Tensor,
                  q_offset: int = 0) -> torch.Tensor:
    """HSTU's relative attention bias ``[B, H, L - q_offset, L]`` of the queries ``q_offset..L-1``: a
    learned value per head for the position distance (clamped to the table) plus one per log-2 bucket
    of the time difference. Only the query rows are built, so scoring a few new tokens against a KV
    cache costs O(new tokens x L), not O(L²).

    The lookups go through ``F.embedding``: its backward sorts the indices, where a plain gather's
    backward scatter-adds B·L² values into a few hundred table slots (atomic contention on GPU)."""
    num_pos, num_time = rel_pos.shape[1], rel_time.shape[1]
    pos, time = layout.position, layout.timestamp
    dist = layout.cached(("dist", num_pos, layout.query_tag(q_offset)), lambda: (
        pos[:, q_offset:, None] - pos[:, None, :]).clamp(0, num_pos - 1))  # [B, Lq, L]
    dt = layout.cached(("dt", num_time, layout.query_tag(q_offset)), lambda: time_bucket(
        time[:, q_offset:, None] - time[:, None, :], num_time))  # [B, Lq, L]
    bias = F.embedding(dist, rel_pos.T) + F.embedding(dt, rel_time.T)  # [B, Lq, L, H]
    return bias.permute(0, 3, 1, 2)


def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                   rel_pos: torch.Tensor | None, rel_time: torch.Tensor | None, scale: float,
                   q_offset: int = 0) -> torch.Tensor:
    """k, v ``[B, H, L, Dh]``; q ``[B, H, L - q_offset, Dh]``: the queries are the layout's tokens
    ``q_offset..L-1`` (all of them by default; the new tokens after a KV cache otherwise).
    Returns ``[B, H, L - q_offset, Dh]``. ``rel_pos = rel_time = None``: no relative bias."""
    mask = layout.cached(("mask",), lambda: build_mask(layout))[:, None, q_offset:]  # [B, 1, Lq, L]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if rel_pos is not None:
        scores = scores + relative_bias(layout, rel_pos, rel_time, q_offset)
    weights = F.silu(scores) * scale * mask
    return weights @ v


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Geometric slopes 2^(-8/H), 2^(-16/H), ... of the ALiBi paper."""
    return torch.tensor([2 ** (-8 * (h + 1) / num_heads) for h in range(num_heads)])


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                      alibi: torch.Tensor | None = None, q_offset: int = 0) -> torch.Tensor:
    """k, v ``[B, H, L, Dh]``, q ``[B, H, L - q_offset, Dh]`` (as in :func:`hstu_attention`) ->
    ``[B, H, L - q_offset, Dh]``; ``alibi`` slopes ``[H]`` or None."""
    mask = layout.cached(("mask",), lambda: build_mask(layout))[:, None, q_offset:]  # [B, 1, Lq, L]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if alibi is not None:
        pos = layout.position
        dist = (pos[:, q_offset:, None] - pos[:, None, :]).abs().to(q.dtype)  # [B, Lq, L]
        scores = scores - alibi.to(q.dtype)[None, :, None, None] * dist[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
