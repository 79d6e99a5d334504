"""HSTU / "MetaGR" generative ranking (Zhai et al. 2024; DESIGN §2.1), the baseline of DFGR and GenRank.

Tokens interleave items and actions, ``[x0 a0 x1 a1 ...]`` (2N tokens). The output at item token
``x_k`` predicts action ``a_k``. Masking (``request_causal``): a token reads all tokens of earlier
requests and its own event's tokens up to itself, so ``x_k`` never sees ``a_k`` nor the actions of
events in its request, at any depth (layout: :func:`genrec.nn.events.item_action_layout`).
Features: item id, action, position and time through the relative bias. Serving appends candidates
as item tokens of the next request, against a KV cache of the history (:class:`genrec.nn.kv_cache.KVServing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrec.data.batching import JaggedBatch, rows_at
from genrec.data.info import DatasetInfo
from genrec.models.generative import GenerativeRanker
from genrec.nn.embeddings import ActionEmbedding
from genrec.nn.events import Events, append_candidates, interleave, item_action_layout
from genrec.nn.hstu import HSTUBlock, attention_scale
from genrec.nn.kv_cache import KVCache, KVServing
from genrec.nn.prepared import LayoutPlan
from genrec.ops.dispatch import BackendName, get_backend
from genrec.ops.layout import TokenLayout
from genrec.settings import DropoutRate, Positive, check_heads


@dataclass
class HSTUConfig:
    d_model: Positive = 64
    num_layers: Positive = 2
    num_heads: Positive = 2
    dropout: DropoutRate = 0.1
    max_len: int = 200  # events (the data's max_len); the attention scale is 1 / (2 * max_len) tokens
    attention_backend: BackendName = "reference"
    extra_thresholds: tuple[float, ...] = ()
    multiclass_weight: float = 0.0
    action_encoding: str = "joint"  # several signals: "joint" code, "sum" of per-signal embeddings, "linear"
    task_weights: tuple[float, ...] = ()  # BCE weight per signal (default 1 each)
    task_head: str = "mlp"  # "mlp" (shared bottom) or "mmoe"
    num_experts: int = 4  # mmoe only
    relative_bias: bool = True  # the relative position + time bias of every HSTU block (genrec.nn.hstu.HSTUBlock)

    def check(self) -> None:
        check_heads(self.d_model, self.num_heads)


def _batch_layout(batch: JaggedBatch) -> TokenLayout:
    """The layout :meth:`HSTU.target_hidden` hands its blocks, from the batch alone (for the loader)."""
    return item_action_layout(Events.from_batch(batch))


def last_outputs_from(batch: JaggedBatch) -> int:
    """The first token of ``batch``'s layout whose output :meth:`HSTU.target_hidden` reads (its last
    block's ``outputs_from``): the item token of the first target event."""
    return 2 * batch.first_target


class HSTU(GenerativeRanker):
    def __init__(self, cfg: HSTUConfig, info: DatasetInfo):
        super().__init__(cfg.d_model, info, cfg)
        self.cfg = cfg
        backend = get_backend(cfg.attention_backend)
        self.item_emb = nn.Embedding(info.num_items + 1, cfg.d_model, padding_idx=0)
        self.action_emb = ActionEmbedding(info.num_actions, cfg.d_model, len(info.signal_names),
                                          cfg.action_encoding)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        scale = attention_scale(cfg.max_len, tokens_per_event=2)
        self.blocks = nn.ModuleList(
            HSTUBlock(cfg.d_model, cfg.num_heads, cfg.dropout, scale, backend, num_position_buckets=cfg.max_len + 1,
                      relative_bias=cfg.relative_bias)
            for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.kv_serving = KVServing(self.blocks, self.history_tokens, self.candidate_tokens, self.candidate_logits)

    def history_tokens(self, ev: Events) -> tuple[torch.Tensor, TokenLayout]:
        return interleave(self.item_emb(ev.items), self.action_emb(ev.actions)), item_action_layout(ev)  # [B, 2N, D]

    def candidate_tokens(self, candidates: torch.Tensor, cache: KVCache,
                         request_time: torch.Tensor) -> tuple[torch.Tensor, TokenLayout]:
        """Item tokens of the next request ``[B, M, D]`` after the cached history, and their layout."""
        layout = append_candidates(cache.layout, cache.events, candidates.shape[1], request_time)
        return self.item_emb(candidates), layout

    def candidate_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, M, D] -> [B, M, T]
        return self.heads.candidate_logits(self.norm(hidden))

    def layout_plan(self, dtype: torch.dtype) -> LayoutPlan | None:
        return LayoutPlan.of(_batch_layout, (block.attention_spec() for block in self.blocks), dtype,
                             outputs_from=last_outputs_from)

    def target_hidden(self, batch: JaggedBatch) -> torch.Tensor:
        ev = Events.from_batch(batch)
        x, layout = self.history_tokens(ev)
        layout.seed(batch.known_layout)
        for block in self.blocks[:-1]:
            x = block(x, layout)
        x = self.blocks[-1](x, layout, outputs_from=last_outputs_from(batch))  # [B, 2(N - first), D]
        items = x[:, 0::2]  # the item tokens from the first target event's on
        at_targets = ev.target[:, ev.target.shape[1] - items.shape[1]:]
        return self.norm(rows_at(items, at_targets, batch.num_targets))  # [N_t, D]

    def score(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        return self.kv_serving.score(history, candidates, request_time)
