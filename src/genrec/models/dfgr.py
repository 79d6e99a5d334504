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
Features: item id, action, position and time through HSTU's relative bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrec.data.batching import JaggedBatch
from genrec.models.base import DatasetInfo
from genrec.models.generative import GenerativeRanker
from genrec.nn.embeddings import ActionEmbedding
from genrec.nn.events import Events
from genrec.nn.hstu import HSTUBlock
from genrec.ops.dispatch import get_backend
from genrec.ops.layout import TokenLayout


@dataclass
class DFGRConfig:
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.1
    max_len: int = 200  # events; the attention scale is 1 / max_len
    attention_backend: str = "reference"
    extra_thresholds: tuple[float, ...] = ()
    multiclass_weight: float = 0.0


class DFGR(GenerativeRanker):
    def __init__(self, cfg: DFGRConfig, info: DatasetInfo):
        super().__init__(cfg.d_model, info, cfg.extra_thresholds, cfg.multiclass_weight)
        self.cfg = cfg
        self.backend = get_backend(cfg.attention_backend)
        self.item_emb = nn.Embedding(info.num_items + 1, cfg.d_model, padding_idx=0)
        self.action_emb = ActionEmbedding(info.num_actions, cfg.d_model)  # placeholder = fake action F
        nn.init.normal_(self.item_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(
            HSTUBlock(cfg.d_model, cfg.num_heads, cfg.dropout, 1.0 / cfg.max_len, num_position_buckets=cfg.max_len + 1)
            for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def _run(self, real_flow: torch.Tensor, fake_flow: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        x = torch.cat([real_flow, fake_flow], dim=1)  # [B, N + M, D]
        for block in self.blocks:
            x = block(x, layout, self.backend)
        return self.norm(x[:, real_flow.shape[1]:])  # fake-flow outputs [B, M, D]

    def target_hidden(self, batch: JaggedBatch) -> torch.Tensor:
        ev = Events.from_batch(batch)
        real_flow = self.item_emb(ev.items) + self.action_emb(ev.actions)  # [B, N, D]
        fake_flow = self.item_emb(ev.items) + self.action_emb(ev.actions, hidden=torch.ones_like(ev.valid))
        layout = TokenLayout(
            valid=torch.cat([ev.valid, ev.valid], 1), request=torch.cat([ev.request, ev.request], 1),
            event=torch.cat([ev.position, ev.position], 1),
            fake=torch.cat([torch.zeros_like(ev.valid), torch.ones_like(ev.valid)], 1),
            position=torch.cat([ev.position, ev.request_start], 1),
            timestamp=torch.cat([ev.timestamp, ev.timestamp], 1), rule="dual_flow")
        return self._run(real_flow, fake_flow, layout)[ev.target]

    def serve_logits(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """Score ``candidates`` ``[B, M]`` (item ids) of the next request at ``request_time`` ``[B]``,
        reading each user's ``history`` (all earlier events) through the real flow only."""
        ev = Events.from_batch(history)
        b, m = candidates.shape
        real_flow = self.item_emb(ev.items) + self.action_emb(ev.actions)
        fake_flow = self.item_emb(candidates) + self.action_emb(torch.zeros_like(candidates),
                                                                hidden=torch.ones_like(candidates, dtype=torch.bool))
        lengths = history.lengths[:, None].expand(b, m)
        next_request = (ev.request.masked_fill(~ev.valid, -1).max(1).values + 1)[:, None].expand(b, m)
        layout = TokenLayout(
            valid=torch.cat([ev.valid, torch.ones_like(candidates, dtype=torch.bool)], 1),
            request=torch.cat([ev.request, next_request], 1), event=torch.cat([ev.position, lengths], 1),
            fake=torch.cat([torch.zeros_like(ev.valid), torch.ones_like(candidates, dtype=torch.bool)], 1),
            position=torch.cat([ev.position, lengths], 1),
            timestamp=torch.cat([ev.timestamp, request_time[:, None].expand(b, m)], 1), rule="dual_flow")
        return self.heads.main_logit(self.heads(self._run(real_flow, fake_flow, layout).reshape(b * m, -1))).view(b, m)
