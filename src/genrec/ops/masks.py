"""Attention masks as small pure functions of the token metadata. ``mask[b, q, k]`` is True where
query token ``q`` may read key token ``k``. Each docstring draws the mask for a tiny example.

Shared notation for the drawings: three events e0, e1, e2, where e1 and e2 belong to one request
(r0 = {e0}, r1 = {e1, e2}). ``x`` = allowed, ``.`` = masked.
"""

from __future__ import annotations

import torch

from genrec.ops.layout import TokenLayout


def causal_mask(layout: TokenLayout) -> torch.Tensor:
    """Plain causal mask over token order (SASRec, Llama)::

            k0 k1 k2
        q0   x  .  .
        q1   x  x  .
        q2   x  x  x
    """
    b, n = layout.shape
    idx = torch.arange(n, device=layout.valid.device)
    return (idx[None, :, None] >= idx[None, None, :]).expand(b, n, n)


def request_causal_mask(layout: TokenLayout) -> torch.Tensor:
    """A token reads every token of *earlier requests* and the tokens of its own event up to itself,
    never other events of its own request (their actions happen at the same time: reading them leaks
    labels, and at serving time they are unknown). Used by HSTU (interleaved item/action tokens) and
    SFGR (one token per event).

    HSTU tokens ``[x0 a0 x1 a1 x2 a2]`` (request r0 = e0, r1 = e1, e2)::

              x0 a0 x1 a1 x2 a2
        x0     x  .  .  .  .  .
        a0     x  x  .  .  .  .
        x1     x  x  x  .  .  .
        a1     x  x  x  x  .  .
        x2     x  x  .  .  x  .     <- x2 never reads x1 or a1 (same request)
        a2     x  x  .  .  x  x
    """
    b, n = layout.shape
    idx = torch.arange(n, device=layout.valid.device)
    earlier_request = layout.request[:, None, :] < layout.request[:, :, None]
    own_event = (layout.event[:, None, :] == layout.event[:, :, None]) & (idx[None, None, :] <= idx[None, :, None])
    return earlier_request | own_event


def dual_flow_mask(layout: TokenLayout) -> torch.Tensor:
    """DFGR's session-aware cross-triangle mask (also GenRank's candidate mask).

    * a real token reads real tokens of events at or before its own (causal over the real flow);
    * a fake token (candidate) reads real tokens of *earlier requests* and itself, nothing else:
      never its own action, never another event of its request, never another fake token.

    Tokens ``[R0 R1 R2 | F0 F1 F2]`` (R = real flow, F = fake flow)::

              R0 R1 R2 F0 F1 F2
        R0     x  .  .  .  .  .
        R1     x  x  .  .  .  .
        R2     x  x  x  .  .  .
        F0     .  .  .  x  .  .     <- first request: no history, only itself
        F1     x  .  .  .  x  .
        F2     x  .  .  .  .  x     <- not R1 (same request), not R2 (own action)
    """
    n = layout.shape[1]
    idx = torch.arange(n, device=layout.valid.device)
    real_q, real_k = ~layout.fake[:, :, None], ~layout.fake[:, None, :]
    causal_real = real_q & real_k & (layout.event[:, None, :] <= layout.event[:, :, None])
    earlier = real_k & (layout.request[:, None, :] < layout.request[:, :, None])
    self_only = idx[None, :, None] == idx[None, None, :]
    return causal_real | (~real_q & (earlier | self_only))


# rule (genrec.ops.layout.Rule) -> its mask; tests/ops/test_layout.py checks every rule has one
RULE_MASKS = {"causal": causal_mask, "request_causal": request_causal_mask, "dual_flow": dual_flow_mask}


def build_mask(layout: TokenLayout) -> torch.Tensor:
    """The rule's mask restricted to valid tokens. A padded query reads only itself (it is never
    used; this keeps its softmax row finite)."""
    if layout.rule not in RULE_MASKS:
        raise ValueError(f"mask rule {layout.rule!r} has no dense mask in genrec.ops.masks.RULE_MASKS")
    mask = RULE_MASKS[layout.rule](layout) & layout.valid[:, None, :] & layout.valid[:, :, None]
    n = layout.shape[1]
    diagonal = torch.eye(n, dtype=torch.bool, device=mask.device)[None]
    return mask | (diagonal & ~layout.valid[:, :, None])


def time_bucket(seconds: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Log-2 buckets of a non-negative time difference, ``min(floor(log2(1 + s)), num_buckets - 1)``:
    0 s -> 0, 1-2 s -> 1, 3-6 s -> 2, ... capped. The float log2 is corrected by one in integers where
    it rounded across a power of two: CUDA's float64 log2 is not exact there (2^3, 2^6, 2^12, ... on
    an H200), which put those differences one bucket low on the GPU only. (Elementwise ops only, which
    AOTInductor compiles; its CPU package aborted on ``torch.bucketize``.)"""
    x = seconds.clamp(min=0) + 1
    log = torch.log2(x.double()).floor().long()
    one = torch.ones_like(log)
    log = log + (x >= one << (log + 1)).long() - (x < one << log).long()
    return log.clamp(max=num_buckets - 1)
