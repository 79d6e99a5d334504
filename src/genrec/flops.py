"""Analytic FLOPs of the generative rankers, to check DFGR's 2x (training) / 4x (serving) claims on paper.

Counted per layer for one sequence of N events, one event per request (the densest case: every
earlier event is visible), every event a target; a multiply-add is 2 FLOPs, backward = 2x forward.

* HSTU block on T tokens: projections 2·T·D·4D + 2·T·D·D = 10·T·D²; attention 4·P·D for P visible
  (query, key) pairs (Q·Kᵀ and A·V). Softmax block (GenRank): 24·T·D² (qkv, out, 4x FFN) + 4·P·D.
* Training tokens / pairs: HSTU 2N / 2N(2N+1)/2; DFGR 2N / N(N+1) (real causal + fake cross + self);
  GenRank N + N candidates / N(N+1); SFGR N / N(N+1)/2 (but one pass per target request).
* Serving M candidates after N history events: HSTU (M-FALCON) 2N + M tokens, 2N(2N+1)/2 + M(2N+1)
  pairs; DFGR / GenRank / SFGR N + M tokens, N(N+1)/2 + M(N+1) pairs; with the history's K/V cached,
  only the M candidate tokens and their M(N+1) pairs.
"""

from __future__ import annotations

from genrec.ops.layout import TokenLayout
from genrec.ops.masks import build_mask

LINEAR_PER_TOKEN = {"hstu": 10, "dfgr": 10, "sfgr": 10, "genrank": 24}  # × D² per layer


def tokens_and_pairs(model: str, n: int, m: int | None = None, mode: str = "train") -> tuple[int, int]:
    if model not in LINEAR_PER_TOKEN:
        raise ValueError(f"no FLOP model for {model!r}")
    causal = n * (n + 1) // 2
    if mode == "train":
        return {"hstu": (2 * n, 2 * n * (2 * n + 1) // 2), "dfgr": (2 * n, 2 * causal),
                "genrank": (2 * n, 2 * causal), "sfgr": (n, causal)}[model]
    if m is None:
        raise ValueError("serving needs the number of candidates m")
    if mode == "serve":
        if model == "hstu":
            return 2 * n + m, 2 * n * (2 * n + 1) // 2 + m * (2 * n + 1)
        return n + m, causal + m * (n + 1)
    if mode == "serve_cached":
        if model == "hstu":
            return m, m * (2 * n + 1)
        return m, m * (n + 1)
    raise ValueError(f"mode must be train, serve or serve_cached, got {mode!r}")


def flops(model: str, n: int, d: int, layers: int, m: int | None = None, mode: str = "train") -> dict[str, float]:
    """FLOPs of one sequence: ``linear``, ``attention``, ``total`` and per event (train) or candidate (serve)."""
    tokens, pairs = tokens_and_pairs(model, n, m, mode)
    passes = 3 if mode == "train" else 1  # forward + backward (2x)
    linear = passes * layers * LINEAR_PER_TOKEN[model] * tokens * d * d
    attention = passes * layers * 4 * pairs * d
    total = linear + attention
    per = n if mode == "train" else m
    return {"linear": float(linear), "attention": float(attention), "total": float(total),
            "per_unit": total / per, "tokens": tokens, "pairs": pairs}


KEYS_VALUES_PER_TOKEN = 4  # × D²: the keys' and values' projections, of every token in a last block with a tail


def layout_flops(layout: TokenLayout, d: int, layers: int, q_offset: int = 0,
                 outputs_from: int = 0, model: str = "hstu") -> tuple[float, float]:
    """Linear and attention FLOPs of one forward of ``model``'s blocks (HSTU's by default; GenRank's
    softmax blocks) over an actual token layout, counting the pairs its mask allows (requests of
    several events, padding, micro-batches: what the closed forms above idealise) for the queries
    from ``q_offset`` (a KV cache holds the others). ``outputs_from``: the last block computes the
    outputs of the tokens from there only (:meth:`genrec.nn.hstu.HSTUBlock.forward`,
    :meth:`genrec.nn.softmax.SoftmaxBlock.forward`): its keys and values are every token's (4·D²
    each), the rest of its projections (HSTU's queries, gates and output, 6·D²; GenRank's queries,
    output and feed-forward, 20·D²) and its pairs those of the tokens from there."""
    if q_offset and outputs_from:
        raise ValueError("q_offset (a KV cache) and outputs_from (a last block's tail) do not go together")
    mask = build_mask(layout)
    tokens = int(layout.valid[:, q_offset:].sum())
    pairs = int(mask[:, q_offset:].sum())
    per_token = LINEAR_PER_TOKEN[model]
    if not outputs_from:
        return float(layers * per_token * tokens * d * d), float(layers * 4 * pairs * d)
    tail_tokens, tail_pairs = int(layout.valid[:, outputs_from:].sum()), int(mask[:, outputs_from:].sum())
    kv = KEYS_VALUES_PER_TOKEN
    linear = (layers - 1) * per_token * tokens + kv * tokens + (per_token - kv) * tail_tokens
    return float(linear * d * d), float(((layers - 1) * pairs + tail_pairs) * 4 * d)
