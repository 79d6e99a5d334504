"""A pre-norm transformer block with softmax attention, optionally ALiBi-biased (GenRank §4.2)."""

from __future__ import annotations

import torch
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

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = self.backend.softmax_attention(q, k, v, layout, self.slopes)  # [B, H, L, Dh]
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))
