"""SFGR: single-flow generative ranking, the DFGR paper's intermediate (DESIGN §2.3), kept as an ablation.

One merged token per event; target events carry the mask action instead of their own, and every
token reads only earlier requests and itself (``request_causal`` with one token per event). Serving
is as cheap as DFGR's, but training pays for it: within one pass, the actions of the window's target
events are hidden from every later target too, so a target sees the true actions of earlier
*history* only. Recovering DFGR's signal would take one pass per target request. Same HSTU blocks
and features as DFGR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrec.data.batching import JaggedBatch, rows_at
from genrec.data.info import DatasetInfo
from genrec.models.generative import GenerativeRanker
from genrec.nn.embeddings import ActionEmbedding
from genrec.nn.events import Events, append_candidates, event_layout
from genrec.nn.hstu import HSTUBlock, attention_scale
from genrec.nn.prepared import LayoutPlan
from genrec.ops.dispatch import BackendName, get_backend
from genrec.ops.layout import TokenLayout
from genrec.settings import DropoutRate, Positive, check_heads


@dataclass
class SFGRConfig:
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

    def check(self) -> None:
        check_heads(self.d_model, self.num_heads)


def training_layout(ev: Events) -> TokenLayout:
    """One token per event, the targets' actions hidden (``fake``) and their position their request's first event's."""
    return TokenLayout(valid=ev.valid, request=ev.request, event=ev.position, fake=ev.target,
                       position=torch.where(ev.target, ev.request_start, ev.position), timestamp=ev.timestamp,
                       rule="request_causal")


def _batch_layout(batch: JaggedBatch) -> TokenLayout:
    """The layout :meth:`SFGR.target_hidden` hands its blocks, from the batch alone (for the loader)."""
    return training_layout(Events.from_batch(batch))


def last_outputs_from(batch: JaggedBatch) -> int:
    """The first token of ``batch``'s layout whose output :meth:`SFGR.target_hidden` reads (its last
    block's ``outputs_from``): the first target event's, one token per event."""
    return batch.first_target


class SFGR(GenerativeRanker):
    def __init__(self, cfg: SFGRConfig, info: DatasetInfo):
        super().__init__(cfg.d_model, info, cfg)
        self.cfg = cfg
        backend = get_backend(cfg.attention_backend)
        self.item_emb = nn.Embedding(info.num_items + 1, cfg.d_model, padding_idx=0)
        self.action_emb = ActionEmbedding(info.num_actions, cfg.d_model, len(info.signal_names),
                                          cfg.action_encoding)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        scale = attention_scale(cfg.max_len, tokens_per_event=1)
        self.blocks = nn.ModuleList(
            HSTUBlock(cfg.d_model, cfg.num_heads, cfg.dropout, scale, backend, num_position_buckets=cfg.max_len + 1,
                      relative_bias=cfg.relative_bias)
            for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def layout_plan(self, dtype: torch.dtype) -> LayoutPlan | None:
        return LayoutPlan.of(_batch_layout, (block.attention_spec() for block in self.blocks), dtype,
                             outputs_from=last_outputs_from)

    def target_hidden(self, batch: JaggedBatch) -> torch.Tensor:
        ev = Events.from_batch(batch)
        x = self.item_emb(ev.items) + self.action_emb(ev.actions, hidden=ev.target)  # [B, N, D]
        layout = training_layout(ev)
        layout.seed(batch.known_layout)
        x = self._run(x, layout, outputs_from=last_outputs_from(batch))  # [B, N - first, D]
        at_targets = ev.target[:, ev.target.shape[1] - x.shape[1]:]  # the targets, all from the first on
        return rows_at(x, at_targets, batch.num_targets)  # [N_t, D]

    def _run(self, x: torch.Tensor, layout: TokenLayout, outputs_from: int = 0) -> torch.Tensor:
        """The normed outputs ``[B, n - outputs_from, D]`` of the tokens from ``outputs_from`` on (the
        last block computes only those)."""
        for block in self.blocks[:-1]:
            x = block(x, layout)
        return self.norm(self.blocks[-1](x, layout, outputs_from=outputs_from))

    def score(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """Candidates as masked-action tokens of the next request after the whole history, whose
        actions are all read (at serving time every earlier action is known)."""
        ev = Events.from_batch(history)
        n, m = ev.items.shape[1], candidates.shape[1]
        layout = append_candidates(event_layout(ev, "request_causal"), ev, m, request_time, fake=True)
        hidden = torch.ones_like(candidates, dtype=torch.bool)
        x = torch.cat([self.item_emb(ev.items) + self.action_emb(ev.actions),
                       self.item_emb(candidates) + self.action_emb(torch.zeros_like(candidates), hidden)], dim=1)
        return self.heads.candidate_logits(self._run(x, layout)[:, n:])
