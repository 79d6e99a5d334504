"""Softmax attention (GenRank, UniGRF-Llama) through PyTorch's ``flex_attention``: the mask rule and
ALiBi are small functions of the token metadata that Inductor compiles into one fused Triton kernel,
forward and backward, skipping tiles the block mask marks empty.

The sequence length is padded to a multiple of 128 (as padded tokens: ``valid`` False) so that
batches of nearby lengths reuse one compiled kernel instead of compiling one per length. Queries
from an offset (a last block's tail) take the same shape: zero rows before them, which the mask
allows no key (``live``), so the kernel skips their tiles and their outputs are dropped. The offset
is a mask tensor, not a number in the compiled call (a number there compiles a kernel per value),
and every call has one, all true without an offset, so the full and the tail blocks share one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from genrec.ops.layout import TokenLayout
from genrec.ops.triton.tiles import FAKE, VALID, KernelMeta

PAD = 128
_flex = torch.compile(flex_attention, dynamic=False)


def _mask_mod(meta: KernelMeta, rule: str, live: torch.Tensor):
    """The mask of token ``q`` (query) and ``ki`` (key), both indices into the padded layout;
    ``live`` ``[L]``: the query rows that are computed (all of them but a tail's zero rows)."""
    req, evt, flags = meta.request, meta.event, meta.flags

    def allowed(b, h, q, ki):
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
        return valid & rule_ok & live[q]

    if rule not in ("causal", "request_causal", "dual_flow"):  # the branches above, refused before tracing
        raise ValueError(f"mask rule {rule!r} has no flex mask in genrec.ops.triton.flex._mask_mod")
    return allowed


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                      alibi: torch.Tensor | None = None, q_offset: int = 0) -> torch.Tensor:
    """As :func:`genrec.ops.reference.attention.softmax_attention`; padded queries give zeros."""
    b, h, lq, d = q.shape
    seq = k.shape[2]
    length = -(-seq // PAD) * PAD
    tag = layout.query_tag(q_offset)
    meta = layout.cached(("flex_meta", length), lambda: KernelMeta.from_layout(layout).padded(length))
    # [L] the queries' rows: a tensor, so every offset and none share the compiled call
    live = layout.cached(("flex_live", length, tag), lambda: torch.arange(length, device=q.device) >= q_offset)
    block_mask = layout.cached(("flex_block_mask", length, tag), lambda: create_block_mask(
        _mask_mod(meta, layout.rule, live), b, None, length, length, device=q.device))
    score_mod = None
    if alibi is not None:
        slopes, pos = alibi.float(), meta.position

        def score_mod(score, b_, h_, qi, ki):
            return score - slopes[h_] * (pos[b_, qi] - pos[b_, ki]).abs()

    def pad(t: torch.Tensor, before: int) -> torch.Tensor:  # [B, H, L, Dh]: the layout's rows, zero elsewhere
        return F.pad(t, (0, 0, before, length - before - t.shape[2]))

    out = _flex(pad(q, q_offset), pad(k, 0), pad(v, 0), score_mod=score_mod, block_mask=block_mask)
    return out[:, :, q_offset:q_offset + lq]
