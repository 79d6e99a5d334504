"""The HSTU block (Zhai et al. 2024, §3.1): pointwise projection, pointwise aggregated attention with
a relative position + time bias, and a gated output.

    U, V, Q, K = split(SiLU(W1 · LN(X)))
    A = SiLU(Q Kᵀ / √d + rab(p, t)) · scale ⊙ mask
    Y = X + W2 · (LN(A V) ⊙ U)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genrec.nn.kv_cache import LayerCache
from genrec.nn.prepared import AttentionSpec, QueriesFrom
from genrec.ops.dispatch import AttentionBackend
from genrec.ops.layout import TokenLayout


def attention_scale(max_len: int, tokens_per_event: int) -> float:
    """The constant HSTU's pointwise attention is multiplied by: one over the most tokens a query can
    read, ``tokens_per_event · max_len`` (HSTU and UniGRF interleave 2 tokens per event; DFGR and SFGR
    have 1, as a fake token reads the real flow and itself). Without a softmax the mass a query gathers
    grows with its history, and a constant, unlike the query's own count, is the same in training and
    serving, so the two agree. ``max_len`` is the data's (:func:`genrec.models.build_model`)."""
    return 1.0 / (tokens_per_event * max_len)


class HSTUBlock(nn.Module):
    """``relative_bias`` False: no ``rab`` term and no tables (``rel_pos``, ``rel_time`` None). The
    bias is the costliest part of the fused attention (its gradients most of all: README, GPU
    section), so it is a model setting, for ablations and for logs where positions and times carry
    little."""

    def __init__(self, dim: int, num_heads: int, dropout: float, attn_scale: float, backend: AttentionBackend,
                 num_position_buckets: int = 256, num_time_buckets: int = 32, relative_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model {dim} is not divisible by num_heads {num_heads}")
        self.backend = backend
        self.num_heads = num_heads
        self.attn_scale = attn_scale
        self.norm_in = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.norm_attn = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.rel_pos = nn.Parameter(torch.zeros(num_heads, num_position_buckets)) if relative_bias else None
        self.rel_time = nn.Parameter(torch.zeros(num_heads, num_time_buckets)) if relative_bias else None

    def attention_spec(self, queries_from: QueriesFrom | None = None) -> AttentionSpec | None:
        """What a :class:`~genrec.nn.prepared.LayoutPlan` prepares for this block (None: its backend
        prepares nothing); ``queries_from``: where the model calls it with ``queries_from``, the
        batch's first queried token (:meth:`forward`)."""
        if self.backend.prepare_hstu is None:
            return None
        slots = (None, None) if self.rel_pos is None else (self.rel_pos.shape[1], self.rel_time.shape[1])
        return AttentionSpec(self.backend, self.uvqk.in_features // self.num_heads, *slots, queries_from)

    def forward(self, x: torch.Tensor, layout: TokenLayout, cache: LayerCache | None = None,
                queries_from: int = 0) -> torch.Tensor:
        """``x`` ``[B, n, D]``: all of the layout's tokens, or with a ``cache`` the new tokens after the
        cached ones (their keys and values are added to it). ``queries_from``: only the tokens from
        there on are queried and returned, ``[B, n - queries_from, D]``; the earlier ones give their
        keys and values alone (the ``V, K`` rows of ``W1``). A model whose predictions read a suffix
        of the last block's tokens (DFGR's fake flow) skips the rest of that block for the others:
        their outputs would be read by nothing."""
        if cache is not None and queries_from:
            raise ValueError("queries_from and a KV cache both set the queries' offset: give one")
        b, n, d = x.shape
        h = self.norm_in(x)
        u, v, q, k = F.silu(self.uvqk(h[:, queries_from:])).chunk(4, dim=-1)  # each [B, n - queries_from, D]
        q_offset = queries_from
        if queries_from:  # the keys and values of the tokens before: [B, queries_from, D] each
            rows = self.uvqk.weight.view(4, d, d)[1::2].reshape(2 * d, d)  # V and K rows
            v_before, k_before = F.silu(F.linear(h[:, :queries_from], rows,
                                                 self.uvqk.bias.view(4, d)[1::2].reshape(2 * d))).chunk(2, dim=-1)
            v, k = torch.cat([v_before, v], 1), torch.cat([k_before, k], 1)  # [B, n, D]
            x = x[:, queries_from:]
        if cache is not None:
            k, v, q_offset = cache.write(k, v)  # [B, q_offset + n, D]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.num_heads, d // self.num_heads).transpose(1, 2)  # [B, H, L, Dh]

        a = self.backend.hstu_attention(heads(q), heads(k), heads(v), layout, self.rel_pos, self.rel_time,
                                        self.attn_scale, q_offset)  # [B, H, n - queries_from, Dh]
        a = a.transpose(1, 2).reshape(b, x.shape[1], d)
        return x + self.dropout(self.out(self.norm_attn(a) * u))
