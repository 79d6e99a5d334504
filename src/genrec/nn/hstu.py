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
from genrec.nn.prepared import AttentionSpec
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

    def attention_spec(self) -> AttentionSpec | None:
        """What a :class:`~genrec.nn.prepared.LayoutPlan` prepares for this block (None: its backend
        prepares nothing)."""
        if self.backend.prepare_hstu is None:
            return None
        slots = (None, None) if self.rel_pos is None else (self.rel_pos.shape[1], self.rel_time.shape[1])
        return AttentionSpec(self.backend, self.uvqk.in_features // self.num_heads, *slots)

    def forward(self, x: torch.Tensor, layout: TokenLayout, cache: LayerCache | None = None,
                outputs_from: int = 0) -> torch.Tensor:
        """``x`` ``[B, n, D]``: all of the layout's tokens, or with a ``cache`` the new tokens after the
        cached ones (their keys and values are added to it). ``outputs_from`` (no cache): return
        ``[B, n - outputs_from, D]``, the outputs of the tokens from there on only. A model's last block
        takes it where its loss reads no earlier token (DFGR's fake flow, HSTU's and SFGR's tokens from
        the first target): the earlier tokens still give their keys and values, but their queries,
        gates, output projection and residual are skipped, and so are their pairs of the attention."""
        b, n, d = x.shape
        if outputs_from:
            if cache is not None:
                raise ValueError("outputs_from skips the queries of a full sequence; with a cache the "
                                 "queries are the new tokens already")
            u, q, v, k = self._projections(self.norm_in(x), outputs_from)
        else:
            u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).chunk(4, dim=-1)  # each [B, n, D]
        q_offset = outputs_from
        if cache is not None:
            k, v, q_offset = cache.write(k, v)  # [B, q_offset + n, D]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.num_heads, d // self.num_heads).transpose(1, 2)  # [B, H, L, Dh]

        a = self.backend.hstu_attention(heads(q), heads(k), heads(v), layout, self.rel_pos, self.rel_time,
                                        self.attn_scale, q_offset)  # [B, H, n - outputs_from, Dh]
        a = a.transpose(1, 2).reshape(b, n - outputs_from, d)
        return x[:, outputs_from:] + self.dropout(self.out(self.norm_attn(a) * u))

    def _projections(self, h: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """``SiLU(W1 · h)`` split as in :meth:`forward`, the gates and queries ``[B, n - start, D]`` of the
        tokens from ``start`` only, the values and keys ``[B, n, D]`` of all: two products with the
        rows of ``uvqk``'s weight they need (its chunks are u, v, q, k)."""
        d = h.shape[-1]
        w, bias = self.uvqk.weight.split(d), self.uvqk.bias.split(d)  # u, v, q, k: [D, D] and [D] each

        def project(x: torch.Tensor, first: int, second: int) -> tuple[torch.Tensor, torch.Tensor]:
            out = F.linear(x, torch.cat([w[first], w[second]]), torch.cat([bias[first], bias[second]]))
            return F.silu(out).chunk(2, dim=-1)

        return (*project(h[:, start:], 0, 2), *project(h, 1, 3))  # u, q [B, n - start, D]; v, k [B, n, D]
