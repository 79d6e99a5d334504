"""Softmax attention (GenRank, UniGRF-Llama) through PyTorch's ``flex_attention``: the mask rule and
ALiBi are small functions of the token metadata that Inductor compiles into one fused Triton kernel,
forward and backward, skipping tiles the block mask marks empty.

The sequence length is padded to a multiple of 128 (as padded tokens: ``valid`` False) so that
batches of nearby lengths reuse one compiled kernel instead of compiling one per length. Queries
from an offset (a last block's tail, the tokens after a KV cache) start at the 128-token edge at or
before it, the rows before the offset zero queries whose outputs are dropped: the query length is a
multiple of 128 too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from genrec.ops.layout import TokenLayout
from genrec.ops.triton.tiles import FAKE, VALID, KernelMeta

PAD = 128
_flex = torch.compile(flex_attention, dynamic=False)


def _mask_mod(meta: KernelMeta, rule: str, q_offset: int):
    req, evt, flags = meta.request, meta.event, meta.flags

    def allowed(b, h, qi, ki):
        q = qi + q_offset
        valid = ((flags[b, q] & VALID) != 0) & ((flags[b, ki] & VALID) != 0)
        if rule == "causal":
            rule_ok = ki <= q
        elif rule == "request_causal":
            rule_ok = (req[b, ki] < req[b, q]) | ((evt[b, ki] == evt[b, q]) & (ki <= q))
        else:  # dual_flow
            k_real = (flags[b, ki] & FAKE) == 0
            q_fake = (flags[b, q] & FAKE) != 0
            earlier_or_self = (k_real & (req[b, ki] < req[b, q])) | (ki == q)
            rule_ok = torch.where(q_fake, earlier_or_self, k_real & (evt[b, ki] <= evt[b, q]))
        return valid & rule_ok

    if rule not in ("causal", "request_causal", "dual_flow"):  # the branches above, refused before tracing
        raise ValueError(f"mask rule {rule!r} has no flex mask in genrec.ops.triton.flex._mask_mod")
    return allowed


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                      alibi: torch.Tensor | None = None, q_offset: int = 0) -> torch.Tensor:
    """As :func:`genrec.ops.reference.attention.softmax_attention`; padded queries give zeros."""
    b, h, lq, d = q.shape
    seq = k.shape[2]
    length = -(-seq // PAD) * PAD
    q_start = q_offset // PAD * PAD  # the queries' first row: q_offset - q_start zero rows before q
    q_len = length - q_start
    meta = layout.cached(("flex_meta", length), lambda: KernelMeta.from_layout(layout).padded(length))
    block_mask = layout.cached(("flex_block_mask", length, layout.query_tag(q_offset)), lambda: create_block_mask(
        _mask_mod(meta, layout.rule, q_start), b, None, q_len, length, device=q.device))
    score_mod = None
    if alibi is not None:
        slopes, pos = alibi.float(), meta.position

        def score_mod(score, b_, h_, qi, ki):
            return score - slopes[h_] * (pos[b_, qi + q_start] - pos[b_, ki]).abs()

    def pad(t: torch.Tensor, before: int, n: int) -> torch.Tensor:
        return F.pad(t, (0, 0, before, n - before - t.shape[2]))

    first = q_offset - q_start
    out = _flex(pad(q, first, q_len), pad(k, 0, length), pad(v, 0, length), score_mod=score_mod,
                block_mask=block_mask)
    return out[:, :, first:first + lq]
