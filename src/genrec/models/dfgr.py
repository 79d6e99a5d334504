"""DFGR: Dual-Flow Generative Ranking (Guo et al. 2025, papers 000-002; DESIGN §2.3).

One token per event (item + action). The sequence is duplicated into a *real flow* (true actions)
and a *fake flow* (same items, a learned placeholder action F); both run through the same HSTU
blocks (shared weights) as one ``[real | fake]`` token sequence under the ``dual_flow`` mask:

* real token i reads real tokens j <= i (causal context);
* fake token i reads the real keys/values of earlier requests and its own fake key/value only.

So no fake token ever sees its own action or its request's actions, at any depth. Losses and
predictions are taken on fake-flow outputs at the target events. Fake tokens take the position of
their request's first event, so that training and serving (history + candidates) agree exactly.
Attention cost per layer: N²/2 (real causal) + N²/2 (fake cross) ≈ N², against HSTU's (2N)²/2.
Serving runs the history through the real flow once (KV cache) and scores candidates as fake tokens.
``fake_flow="targets"`` builds fake tokens for the target events only (``[real N | fake T]``,
:func:`~genrec.nn.events.target_dual_flow_layout`): the same model and logits, N + T tokens a step.
Features: item id, action, position and time through HSTU's relative bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from genrec.data.batching import JaggedBatch, rows_at
from genrec.data.info import DatasetInfo
from genrec.models.generative import GenerativeRanker
from genrec.nn.embeddings import ActionEmbedding
from genrec.nn.events import Events, append_candidates, dual_flow_layout, event_layout, target_dual_flow_layout
from genrec.nn.hstu import HSTUBlock, attention_scale
from genrec.nn.kv_cache import KVCache, KVServing
from genrec.nn.prepared import LayoutPlan
from genrec.ops.dispatch import BackendName, get_backend
from genrec.ops.layout import TokenLayout
from genrec.settings import DropoutRate, Positive, check_heads


@dataclass
class DFGRConfig:
    d_model: Positive = 64
    num_layers: Positive = 2
    num_heads: Positive = 2
    dropout: DropoutRate = 0.1
    max_len: int = 200  # events (the data's max_len); the attention scale is 1 / max_len
    attention_backend: BackendName = "reference"
    extra_thresholds: tuple[float, ...] = ()
    multiclass_weight: float = 0.0
    action_encoding: str = "joint"  # several signals: "joint" code, "sum" of per-signal embeddings, "linear"
    task_weights: tuple[float, ...] = ()  # BCE weight per signal (default 1 each)
    task_head: str = "mlp"  # "mlp" (shared bottom) or "mmoe"
    num_experts: int = 4  # mmoe only
    relative_bias: bool = True  # the relative position + time bias of every HSTU block (genrec.nn.hstu.HSTUBlock)
    # training's fake flow: one token per event ("dense", [real N | fake N]) or per target event only
    # ("targets", [real N | fake T]); the same logits at the targets, fewer tokens when few are targets
    fake_flow: Literal["dense", "targets"] = "dense"

    def check(self) -> None:
        check_heads(self.d_model, self.num_heads)


def fake_tail(layout: TokenLayout, m: int) -> TokenLayout:
    """``layout`` with exactly its last ``m`` tokens flagged fake (``m`` may be 0)."""
    hidden = torch.ones_like(layout.fake[:, layout.shape[1] - m:])
    fake = torch.cat([torch.zeros_like(layout.fake[:, :layout.shape[1] - m]), hidden], dim=1)
    return TokenLayout(layout.valid, layout.request, layout.event, fake, layout.position, layout.timestamp,
                       layout.rule)


def training_layout(ev: Events, batch: JaggedBatch, fake_flow: str) -> tuple[TokenLayout, torch.Tensor | None]:
    """Training's ``[real | fake]`` layout of ``batch`` (``ev`` its events) before its fake tokens are
    flagged (:func:`fake_tail`), and the event of each fake token ``[B, T]`` (None for the dense fake
    flow: every event's, in order)."""
    if fake_flow == "targets":
        return target_dual_flow_layout(ev, batch.max_targets)  # [B, N + T], [B, T]
    return dual_flow_layout(ev), None  # [B, 2N]


def _batch_layout(batch: JaggedBatch, fake_flow: str) -> TokenLayout:
    """The layout :meth:`DFGR.target_hidden` hands its blocks, from the batch alone (for the loader)."""
    ev = Events.from_batch(batch)
    layout, _ = training_layout(ev, batch, fake_flow)
    return fake_tail(layout, layout.shape[1] - ev.valid.shape[1])


def last_outputs_from(batch: JaggedBatch) -> int:
    """The real flow's length in training's layout: its last block computes the fake flow's outputs
    only (the loss reads no real token's), the real tokens giving their keys and values."""
    return batch.max_len


class DFGR(GenerativeRanker):
    def __init__(self, cfg: DFGRConfig, info: DatasetInfo):
        super().__init__(cfg.d_model, info, cfg)
        self.cfg = cfg
        backend = get_backend(cfg.attention_backend)
        self.item_emb = nn.Embedding(info.num_items + 1, cfg.d_model, padding_idx=0)
        self.action_emb = ActionEmbedding(info.num_actions, cfg.d_model, len(info.signal_names),
                                          cfg.action_encoding)  # placeholder = fake action F
        nn.init.normal_(self.item_emb.weight, std=0.02)
        scale = attention_scale(cfg.max_len, tokens_per_event=1)
        self.blocks = nn.ModuleList(
            HSTUBlock(cfg.d_model, cfg.num_heads, cfg.dropout, scale, backend, num_position_buckets=cfg.max_len + 1,
                      relative_bias=cfg.relative_bias)
            for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.kv_serving = KVServing(self.blocks, self.history_tokens, self.candidate_tokens, self.candidate_logits)

    def history_tokens(self, ev: Events, item_vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenLayout]:
        """The real flow and its layout; ``item_vectors``: ``ev.items``' embeddings where the caller
        looked them up already (training, for both flows)."""
        items = self.item_emb(ev.items) if item_vectors is None else item_vectors
        return items + self.action_emb(ev.actions), event_layout(ev, "dual_flow")

    def fake_flow(self, item_vectors: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, TokenLayout]:
        """The fake flow: tokens ``[B, M, D]`` for the items' embeddings ``[B, M, D]`` with the
        placeholder action F, and ``layout`` (whose last M tokens they are) with exactly those tokens
        flagged ``fake``. Training's ``[real | fake]`` sequence and serving's candidates both come from
        here, so the tokens the mask treats as fake are always the ones embedded without their action.
        It takes embeddings, not ids, so training looks its items up once for both flows."""
        hidden = torch.ones(item_vectors.shape[:2], dtype=torch.bool, device=item_vectors.device)
        tokens = item_vectors + self.action_emb(torch.zeros_like(hidden, dtype=torch.long), hidden)
        return tokens, fake_tail(layout, item_vectors.shape[1])

    def candidate_tokens(self, candidates: torch.Tensor, cache: KVCache,
                         request_time: torch.Tensor) -> tuple[torch.Tensor, TokenLayout]:
        """Candidates of the next request as fake tokens after the cached real flow, and their layout."""
        layout = append_candidates(cache.layout, cache.events, candidates.shape[1], request_time)
        return self.fake_flow(self.item_emb(candidates), layout)

    def candidate_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, M, D] -> [B, M, T]
        return self.heads.candidate_logits(self.norm(hidden))

    def layout_plan(self, dtype: torch.dtype) -> LayoutPlan | None:
        return LayoutPlan.of(partial(_batch_layout, fake_flow=self.cfg.fake_flow),
                             (block.attention_spec() for block in self.blocks), dtype, outputs_from=last_outputs_from)

    def target_hidden(self, batch: JaggedBatch) -> torch.Tensor:
        ev = Events.from_batch(batch)
        # One lookup for both flows: each lookup's backward is a pass over the whole item table.
        items = self.item_emb(ev.items)  # [B, N, D]
        real_flow, _ = self.history_tokens(ev, items)
        layout, index = training_layout(ev, batch, self.cfg.fake_flow)
        if index is not None:  # the target events' fake tokens
            fake_items = items.gather(1, index[..., None].expand(-1, -1, items.shape[2]))  # [B, T, D]
            at_targets = layout.valid[:, ev.valid.shape[1]:]  # [B, T]
        else:
            fake_items, at_targets = items, ev.target  # [B, N, D], [B, N]
        fake_flow, layout = self.fake_flow(fake_items, layout)
        layout.seed(batch.known_layout)
        x = torch.cat([real_flow, fake_flow], dim=1)  # [B, N + T or 2N, D]
        for block in self.blocks[:-1]:
            x = block(x, layout)
        x = self.blocks[-1](x, layout, outputs_from=real_flow.shape[1])  # the fake flow's outputs only, [B, T or N, D]
        return rows_at(self.norm(x), at_targets, batch.num_targets)  # fake flow at targets

    def score(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        return self.kv_serving.score(history, candidates, request_time)
