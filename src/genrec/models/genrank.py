"""GenRank (Huang et al., KDD'25 workshop, paper 004; DESIGN §2.2).

Action-oriented organisation: one token per event,
``e_i = φ(x_i) + ψ(a_i) + E_pos(i) + E_req(r_i) + E_gap(bucket(t_i − t_prev_request))``.
Candidates replace ψ(a) with a learned mask action M and share one position per request (the
position the request starts at). Training appends one candidate token per target event after the
history tokens; the candidate mask (``dual_flow`` rule) lets a candidate read the history of earlier
requests and itself, never other candidates and never its own request's actions. Softmax attention
with ALiBi over positions (no O(N²) learned bias), loss only at candidate positions.
Features: item id, action, position, request index, time since the previous request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrec.data.batching import JaggedBatch, rows_at
from genrec.data.info import DatasetInfo
from genrec.models.generative import GenerativeRanker
from genrec.nn.embeddings import ActionEmbedding, TimeGapEmbedding
from genrec.nn.events import Events, append_candidates, dual_flow_layout, event_layout
from genrec.nn.softmax import SoftmaxBlock
from genrec.ops.dispatch import BackendName, get_backend
from genrec.ops.layout import TokenLayout
from genrec.settings import DropoutRate, Positive, check_heads


@dataclass
class GenRankConfig:
    d_model: Positive = 64
    num_layers: Positive = 2
    num_heads: Positive = 2
    dropout: DropoutRate = 0.1
    max_len: int = 200  # events: size of the position and request-index tables
    alibi: bool = True
    attention_backend: BackendName = "reference"
    extra_thresholds: tuple[float, ...] = ()
    multiclass_weight: float = 0.0
    action_encoding: str = "joint"  # several signals: "joint" code, "sum" of per-signal embeddings, "linear"
    task_weights: tuple[float, ...] = ()  # BCE weight per signal (default 1 each)
    task_head: str = "mlp"  # "mlp" (shared bottom) or "mmoe"
    num_experts: int = 4  # mmoe only

    def check(self) -> None:
        check_heads(self.d_model, self.num_heads)


def training_layout(ev: Events) -> TokenLayout:
    """The history's tokens, then one candidate slot per event, live for the target events only
    (the ``dual_flow`` rule's fake flow)."""
    return dual_flow_layout(ev, fake_valid=ev.target)


def last_outputs_from(batch: JaggedBatch) -> int:
    """The history's length in training's layout (:attr:`JaggedBatch.max_len` tokens, then one
    candidate slot per event): the last block computes the candidates' outputs only."""
    return batch.max_len


class GenRank(GenerativeRanker):
    def __init__(self, cfg: GenRankConfig, info: DatasetInfo):
        super().__init__(cfg.d_model, info, cfg)
        self.cfg = cfg
        backend = get_backend(cfg.attention_backend)
        self.item_emb = nn.Embedding(info.num_items + 1, cfg.d_model, padding_idx=0)
        self.action_emb = ActionEmbedding(info.num_actions, cfg.d_model, len(info.signal_names),
                                          cfg.action_encoding)  # placeholder = mask action M
        self.pos_emb = nn.Embedding(cfg.max_len + 1, cfg.d_model)
        self.req_emb = nn.Embedding(cfg.max_len + 1, cfg.d_model)
        self.gap_emb = TimeGapEmbedding(cfg.d_model)
        for table in (self.item_emb, self.pos_emb, self.req_emb):
            nn.init.normal_(table.weight, std=0.02)
        self.blocks = nn.ModuleList(SoftmaxBlock(cfg.d_model, cfg.num_heads, cfg.dropout, cfg.alibi, backend)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def _embed(self, items, actions, hidden, position, request, timestamp, prev_request_time) -> torch.Tensor:
        return (self.item_emb(items) + self.action_emb(actions, hidden) + self.pos_emb(position)
                + self.req_emb(request.clamp(max=self.cfg.max_len)) + self.gap_emb(timestamp, prev_request_time))

    def _run(self, history: torch.Tensor, candidates: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        x = torch.cat([history, candidates], dim=1)  # [B, N + M, D]
        for block in self.blocks[:-1]:
            x = block(x, layout)
        x = self.blocks[-1](x, layout, outputs_from=history.shape[1])  # the candidates' outputs only, [B, M, D]
        return self.norm(x)

    def target_hidden(self, batch: JaggedBatch) -> torch.Tensor:
        ev = Events.from_batch(batch)
        history = self._embed(ev.items, ev.actions, None, ev.position, ev.request, ev.timestamp, ev.prev_request_time)
        candidates = self._embed(ev.items, ev.actions, torch.ones_like(ev.valid), ev.request_start, ev.request,
                                 ev.timestamp, ev.prev_request_time)
        out = self._run(history, candidates, training_layout(ev))  # [B, N, D]
        return rows_at(out, ev.target, batch.num_targets)

    def score(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """History and candidates in one pass (softmax blocks keep no KV cache here)."""
        ev = Events.from_batch(history)
        b, m = candidates.shape
        n = ev.items.shape[1]
        hist = self._embed(ev.items, ev.actions, None, ev.position, ev.request, ev.timestamp, ev.prev_request_time)
        layout = append_candidates(event_layout(ev, "dual_flow"), ev, m, request_time, fake=True)
        last_time = ev.timestamp.gather(1, (history.lengths - 1)[:, None]).expand(b, m)  # the previous request
        ones = torch.ones_like(candidates, dtype=torch.bool)
        cand = self._embed(candidates, torch.zeros_like(candidates), ones, layout.position[:, n:],
                           layout.request[:, n:], layout.timestamp[:, n:], last_time)
        return self.heads.candidate_logits(self._run(hist, cand, layout))
