"""A pre-norm transformer block with softmax attention, optionally ALiBi-biased (GenRank §4.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genrec.ops.dispatch import AttentionBackend
from genrec.ops.layout import TokenLayout
from genrec.ops.reference.attention import alibi_slopes


class SoftmaxBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, alibi: bool, backend: AttentionBackend):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model {dim} is not divisible by num_heads {num_heads}")
        self.backend = backend
        self.num_heads = num_heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("slopes", alibi_slopes(num_heads) if alibi else None, persistent=False)

    def forward(self, x: torch.Tensor, layout: TokenLayout, outputs_from: int = 0) -> torch.Tensor:
        """``x`` ``[B, n, D]``, the layout's tokens -> ``[B, n - outputs_from, D]``, the outputs of the
        tokens from ``outputs_from`` on. A model's last block takes it where its loss reads no
        earlier token (GenRank's candidates): the earlier tokens still give their keys and values,
        but their queries, attention rows, projection and feed-forward are skipped."""
        b, n, d = x.shape
        h = self.norm_attn(x)
        if outputs_from:
            q, k, v = self._projections(h, outputs_from)
        else:
            q, k, v = self.qkv(h).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = self.backend.softmax_attention(q, k, v, layout, self.slopes, outputs_from)  # [B, H, n - outputs_from, Dh]
        x = x[:, outputs_from:] + self.dropout(self.proj(a.transpose(1, 2).reshape(b, n - outputs_from, d)))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))

    def _projections(self, h: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """The queries ``[B, H, n - start, Dh]`` of the tokens from ``start`` only, the keys and values
        ``[B, H, n, Dh]`` of all: two products with the rows of ``qkv``'s weight they need (its
        chunks are q, k, v; k's and v's rows are adjacent, one slice)."""
        b, n, d = h.shape
        w, bias = self.qkv.weight, self.qkv.bias  # [3D, D], [3D]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.num_heads, d // self.num_heads).transpose(1, 2)

        k, v = F.linear(h, w[d:], bias[d:]).chunk(2, dim=-1)  # [B, n, D] each
        return heads(F.linear(h[:, start:], w[:d], bias[:d])), heads(k), heads(v)
