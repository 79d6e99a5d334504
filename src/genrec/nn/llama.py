"""The Llama block (Touvron et al. 2023): pre-RMSNorm, rotary position embeddings on queries and
keys, softmax attention and a SwiGLU feed-forward. UniGRF's second backbone (paper 003 §5.3.3).

    Y = X + W_o · Attn(RoPE(W_q h), RoPE(W_k h), W_v h),   h = RMSNorm(X)
    Z = Y + W_2 · (SiLU(W_1 g) ⊙ W_3 g),                    g = RMSNorm(Y)

Rotations use the token layout's ``position``, so the attention score of two tokens depends on
their position difference only, and candidates sharing a request position are interchangeable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genrec.ops.dispatch import AttentionBackend
from genrec.ops.layout import TokenLayout


def rotary(x: torch.Tensor, position: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Rotate channel pairs ``(i, i + Dh/2)`` of ``x [B, H, L, Dh]`` by ``position [B, L] · base^(-2i/Dh)``."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # [Dh/2]
    angle = position.float()[:, None, :, None] * freq  # [B, 1, L, Dh/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, backend: AttentionBackend):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"d_model {dim} / num_heads {num_heads} must give an even head size for RoPE")
        self.backend = backend
        self.num_heads = num_heads
        self.norm_attn = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm_ffn = nn.RMSNorm(dim)
        self.ffn = SwiGLU(dim, 4 * dim * 2 // 3)  # Llama's 2/3 of 4d keeps the FFN cost of a GELU MLP
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: TokenLayout, outputs_from: int = 0) -> torch.Tensor:
        """``x`` ``[B, n, D]``, the layout's tokens -> ``[B, n - outputs_from, D]``, the outputs of the
        tokens from ``outputs_from`` on. A model's last block takes it where its loss reads no earlier
        token (UniGRF's tokens from the first target's query on): the earlier tokens still give their
        keys and values, but their queries, attention rows, projection and feed-forward are skipped."""
        b, n, d = x.shape
        h = self.norm_attn(x)
        if outputs_from:
            q, k, v = self._projections(h, outputs_from)
        else:
            q, k, v = self.qkv(h).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, layout.position[:, outputs_from:]), rotary(k, layout.position)  # [B, H, Lq or L, Dh]
        a = self.backend.softmax_attention(q, k, v, layout, None, outputs_from)  # [B, H, n - outputs_from, Dh]
        x = x[:, outputs_from:] + self.dropout(self.proj(a.transpose(1, 2).reshape(b, n - outputs_from, d)))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))

    def _projections(self, h: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """The queries ``[B, H, n - start, Dh]`` of the tokens from ``start`` only, the keys and values
        ``[B, H, n, Dh]`` of all: two products with the rows of ``qkv``'s weight they need (its chunks
        are q, k, v; k's and v's rows are adjacent, one slice)."""
        b, n, d = h.shape
        w = self.qkv.weight  # [3D, D], no bias

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.num_heads, d // self.num_heads).transpose(1, 2)

        k, v = F.linear(h, w[d:]).chunk(2, dim=-1)  # [B, n, D] each
        return heads(F.linear(h[:, start:], w[:d])), heads(k), heads(v)
