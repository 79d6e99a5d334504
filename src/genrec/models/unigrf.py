"""UniGRF (Zhang et al. 2025, paper 003; DESIGN §2.4): one generative model for retrieval and ranking.

Tokens interleave items and binary feedback, ``[x0 b0 x1 b1 ...]``, under the ``request_causal``
rule (:func:`genrec.nn.events.item_action_layout`):

* the output at item token ``x_k`` feeds a small MLP: P(b_k = 1), the ranking task (BCE);
* the output at feedback token ``b_{k-1}`` (a learned start vector for a window's first event) is
  the query for item ``x_k``, the retrieval task: sampled softmax by dot product against the item
  table, with uniform catalogue negatives, optional in-batch negatives and optional logQ correction.

``x_k`` never reads ``b_k`` nor any other event of its own request, so neither task sees a label or
an item it predicts (tested). Backbones: HSTU blocks or Llama blocks (``backbone``).

Two modules couple the tasks (unified objective only):

* the ranking-driven enhancer (:meth:`UniGRF.before_epoch`): once per epoch, for every user, score
  ``enhancer_pool`` random unseen items with both heads from the end of the user's training window;
  the top ``hard_negatives`` by :func:`relative_score` become that user's hard negatives for the
  next epoch (inside a fixed total of ``num_negatives``), and items whose ranking probability
  exceeds ``favourite_threshold`` (τ) are relabelled as positives of the window's last query and
  never used as that user's negatives;
* the gradient-guided adaptive weighter (:class:`AdaptiveWeighter`).

``objective: retrieval`` / ``ranking`` trains one task on the same code path: the paper's separate
HSTU / Llama baselines and, chained through ``train.init_from``, its fine-tuning variants HSTU-FT-a/b.
Mined negatives, favourites, loss history and item counts are buffers, so checkpoints resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genrec.data.batching import JaggedBatch, rows_at
from genrec.data.info import DatasetInfo
from genrec.models.base import RecModel, states_before
from genrec.nn.ctr import mlp
from genrec.nn.embeddings import ActionEmbedding
from genrec.nn.events import Events, append_candidates, interleave, item_action_layout
from genrec.nn.hstu import HSTUBlock, attention_scale
from genrec.nn.llama import LlamaBlock
from genrec.nn.ranks import gather_over_ranks, mean_over_ranks, rows_weight, sum_over_ranks
from genrec.ops.dispatch import BackendName, get_backend
from genrec.settings import DropoutRate, Invalid, NonNegative, Positive, check_heads

OBJECTIVES = {"unified": ("ranking", "retrieval"), "retrieval": ("retrieval",), "ranking": ("ranking",)}


def last_outputs_from(batch: JaggedBatch, end_queries: bool = False) -> int:
    """The first token of ``[x0 b0 x1 b1 ...]`` that a pass at ``batch``'s targets reads (its last
    block's ``outputs_from``): the feedback token before the first target event, its retrieval query
    (the item token when that event opens a sequence: its query is the start vector). With
    ``end_queries`` (favourites: the query after each row's last event) no later than the shortest
    row's last feedback token; its length is read from the batch's offsets (on a GPU, a sync, paid
    only where favourites exist)."""
    first = 2 * batch.first_target - 1 if batch.first_target else 0
    if end_queries:
        first = min(first, 2 * int(batch.offsets.diff().min()) - 1)
    return max(first, 0)


@dataclass
class UniGRFConfig:
    backbone: Literal["hstu", "llama"] = "hstu"  # "hstu" | "llama"
    objective: Literal["unified", "retrieval", "ranking"] = "unified"  # "unified" | "retrieval" | "ranking"
    d_model: Positive = 64
    num_layers: Positive = 2
    num_heads: Positive = 2
    dropout: DropoutRate = 0.2
    max_len: int = 200
    attention_backend: BackendName = "reference"
    num_negatives: Positive = 128  # per query, hard negatives included (paper §5.4: 128 on ML-1M)
    in_batch_negatives: bool = False
    logq_correction: bool = False  # subtract log(expected count under the samplers) from sampled logits
    hard_negatives: NonNegative = 10  # m of the enhancer (paper Fig. 2: ~10 on ML-1M); 0 turns mining off
    favourite_threshold: float = 0.95  # τ; >= 1 turns relabelling off
    max_favourites: int = 10  # per user and epoch, the highest ranking probabilities first
    enhancer_pool: int = 128  # distinct random items scored per user per epoch (at most the catalogue)
    weighter: bool = True
    weighter_temperature: float = 0.05  # T: smaller is more aggressive (the paper gives no value)
    weighter_smoothing: float = 0.9  # μ of the loss moving average; 0 = the paper's raw L(t) / L(t-1)
    alpha: float = 1.0  # retrieval loss scale
    beta: float = 1.0  # ranking loss scale
    relative_bias: bool = True  # the hstu backbone's relative position + time bias (genrec.nn.hstu.HSTUBlock)
    # several signals: the ranking head gives one logit per signal (BCE each, summed); the feedback
    # token reads the label b ("label", the paper) or the action vector ("sum" of per-signal embeddings)
    feedback_encoding: str = "label"

    def check(self) -> None:
        check_heads(self.d_model, self.num_heads, even_head_size=self.backbone == "llama")
        if self.hard_negatives >= self.num_negatives:
            raise Invalid("hard_negatives", f"expected fewer than num_negatives ({self.num_negatives}): "
                          "the hard negatives are part of each query's negatives")


def relative_score(s_ret: torch.Tensor, s_rank: torch.Tensor) -> torch.Tensor:
    """Hard-to-detect disliked items (paper eq. 8): large when retrieval likes an item (σ(q·e) high)
    that ranking dislikes (σ(MLP) low): ``s_ret · log(1 + s_ret / s_rank)``."""
    return s_ret * torch.log1p(s_ret / s_rank.clamp(min=1e-6))


def adaptive_weights(current: torch.Tensor, previous: torch.Tensor, temperature: float) -> torch.Tensor:
    """Paper eqs. 9-11: ``r = L(t) / L(t-1)`` per task, ``w = 2 · softmax(r / T)``.

    The task whose loss falls slower (larger r) gets the larger weight. Before a previous value
    exists r = 1 for both, so w = (1, 1).
    """
    ratio = torch.where(torch.isnan(previous), torch.ones_like(current), current / previous)
    return 2 * torch.softmax(ratio / temperature, dim=0)


class AdaptiveWeighter(nn.Module):
    """Per step, ``L(t)`` is an exponential moving average of each task's batch loss (``smoothing``
    μ; μ = 0 is the paper's raw step-to-step ratio, which on small batches is mostly batch-to-batch
    noise). The average is a buffer, so a resumed run continues the same sequence."""

    def __init__(self, temperature: float, smoothing: float):
        super().__init__()
        if not 0 <= smoothing < 1:
            raise ValueError(f"weighter_smoothing={smoothing} must lie in [0, 1)")
        self.temperature = temperature
        self.smoothing = smoothing
        self.register_buffer("smoothed", torch.full((2,), float("nan")))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:  # [2] (retrieval, ranking) -> weights [2]
        current = losses.detach().float()
        previous = self.smoothed.clone()
        if self.training:
            first = torch.isnan(previous)
            self.smoothed.copy_(torch.where(first, current, self.smoothing * previous + (1 - self.smoothing) * current))
        return adaptive_weights(self.smoothed, previous, self.temperature)


class UniGRF(RecModel):
    def __init__(self, cfg: UniGRFConfig, info: DatasetInfo):
        super().__init__()
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"model_args.objective {cfg.objective!r}: expected one of {sorted(OBJECTIVES)}")
        if cfg.objective != "unified" and (cfg.hard_negatives or cfg.favourite_threshold < 1 or cfg.weighter):
            raise ValueError("the enhancer and weighter couple both tasks: with objective "
                             f"{cfg.objective!r} set hard_negatives=0, favourite_threshold=1 and weighter=false")
        if not 0 <= cfg.hard_negatives < cfg.num_negatives:
            raise ValueError(f"hard_negatives={cfg.hard_negatives} must lie in [0, num_negatives={cfg.num_negatives})")
        self.pool_size = min(cfg.enhancer_pool, info.num_items)  # a small catalogue is scored whole
        if self.pool_size < max(cfg.hard_negatives, cfg.max_favourites):
            raise ValueError(f"enhancer_pool={cfg.enhancer_pool} ({info.num_items} items) must cover "
                             f"hard_negatives={cfg.hard_negatives} and max_favourites={cfg.max_favourites}")
        self.cfg = cfg
        self.tasks = OBJECTIVES[cfg.objective]
        self.num_items = info.num_items
        backend = get_backend(cfg.attention_backend)
        d = cfg.d_model
        self.item_emb = nn.Embedding(info.num_items + 1, d, padding_idx=0)
        self.signal_names = list(info.signal_names)
        if cfg.feedback_encoding == "label":
            self.feedback_emb = nn.Embedding(2, d)
        elif cfg.feedback_encoding == "sum":
            self.feedback_emb = ActionEmbedding(info.num_actions, d, len(self.signal_names), "sum")
        else:
            raise ValueError(f"model_args.feedback_encoding {cfg.feedback_encoding!r}: expected 'label' or 'sum'")
        nn.init.normal_(self.item_emb.weight, std=0.02)
        if cfg.feedback_encoding == "label":
            nn.init.normal_(self.feedback_emb.weight, std=0.02)
        if cfg.backbone == "hstu":
            scale = attention_scale(cfg.max_len, tokens_per_event=2)
            self.blocks = nn.ModuleList(HSTUBlock(d, cfg.num_heads, cfg.dropout, scale, backend,
                                                  num_position_buckets=cfg.max_len + 1,
                                                  relative_bias=cfg.relative_bias)
                                        for _ in range(cfg.num_layers))
            self.norm = nn.LayerNorm(d)
        elif cfg.backbone == "llama":
            self.blocks = nn.ModuleList(LlamaBlock(d, cfg.num_heads, cfg.dropout, backend)
                                        for _ in range(cfg.num_layers))
            self.norm = nn.RMSNorm(d)
        else:
            raise ValueError(f"model_args.backbone {cfg.backbone!r}: expected 'hstu' or 'llama'")
        self.start = nn.Parameter(torch.zeros(d))  # retrieval query before a window's first event
        self.rank_head = mlp([d, d, len(self.signal_names)], cfg.dropout)  # a logit per signal
        self.weighter = AdaptiveWeighter(cfg.weighter_temperature, cfg.weighter_smoothing) if cfg.weighter else None
        users = info.num_users + 1
        self.register_buffer("hard", torch.zeros(users, cfg.hard_negatives, dtype=torch.long))  # 0 = none yet
        self.register_buffer("favourites", torch.zeros(users, cfg.max_favourites, dtype=torch.long))  # 0 = none
        self.register_buffer("item_counts", torch.zeros(info.num_items + 1))  # training positives seen

    # ----------------------------------------------------------------------------------- encoder
    def _encode(self, ev: Events, candidates: torch.Tensor | None = None,
                request_time: torch.Tensor | None = None, outputs_from: int = 0) -> torch.Tensor:
        """Hidden states ``[B, 2N + M, D]`` of ``[x0 b0 ... x_{N-1} b_{N-1}]`` followed by ``M``
        candidate item tokens, all in one new request after each row's last event (each reads the
        history and itself only: the M-FALCON candidate mask). ``outputs_from`` (no candidates): the
        last block computes the tokens from there on only (:func:`last_outputs_from`); the states
        before it are zeros, which no loss or query reads."""
        feedback = ev.labels.long() if self.cfg.feedback_encoding == "label" else ev.actions
        x = interleave(self.item_emb(ev.items), self.feedback_emb(feedback))  # [B, 2N, D]
        layout = item_action_layout(ev)
        if candidates is not None:
            x = torch.cat([x, self.item_emb(candidates)], dim=1)
            layout = append_candidates(layout, ev, candidates.shape[1], request_time)
        for block in self.blocks[:-1]:
            x = block(x, layout)
        x = self.norm(self.blocks[-1](x, layout, outputs_from=outputs_from))  # [B, 2N + M - outputs_from, D]
        return F.pad(x, (0, 0, outputs_from, 0)) if outputs_from else x

    def _rank(self, ev: Events, h: torch.Tensor, num_targets: int) -> torch.Tensor:
        """Ranking logits ``[N_t, T]`` (one per signal) at the target item tokens."""
        return self.rank_head(rows_at(h[:, 0::2], ev.target, num_targets))

    def _queries(self, batch: JaggedBatch, ev: Events, h: torch.Tensor) -> torch.Tensor:
        """Retrieval queries ``[N_t, D]``: the feedback token's output before each target."""
        return batch.at_targets(states_before(h[:, 1::2], self.start, ev.valid, batch.num_events))

    @staticmethod
    def _end_query(ev: Events, h: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: the query for the item after each row's last event (its feedback token)."""
        last = ev.valid.sum(1) - 1
        return h[:, 1::2][torch.arange(len(last), device=h.device), last]

    # ----------------------------------------------------------------------------------- scoring
    def task_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [N_t, T]
        ev = Events.from_batch(batch)
        return self._rank(ev, self._encode(ev, outputs_from=last_outputs_from(batch)), batch.num_targets)

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [N_t], the first signal (the label)
        return self.task_logits(batch)[:, 0]

    def retrieval_queries(self, batch: JaggedBatch) -> torch.Tensor:
        ev = Events.from_batch(batch)
        return self._queries(batch, ev, self._encode(ev, outputs_from=last_outputs_from(batch)))

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    def retrieve_and_rank(self, batch: JaggedBatch, candidates: torch.Tensor,
                          request_time: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tasks in one pass after each whole sequence of ``batch`` (the enhancer's mining): the
        next-item query ``[B, D]`` and the ranking logits ``[B, M]`` of ``candidates [B, M]`` shown
        together in one new request at ``request_time`` ``[B]`` (default: the last event's time)."""
        ev = Events.from_batch(batch)
        h = self._encode(ev, candidates, request_time)  # [B, 2N + M, D]
        return self._end_query(ev, h), self.rank_head(h[:, 2 * ev.items.shape[1]:])[..., 0]

    def score(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        ev = Events.from_batch(history)
        h = self._encode(ev, candidates, request_time)  # [B, 2N + M, D]
        return self.rank_head(h[:, 2 * ev.items.shape[1]:])  # [B, M, T], one logit per signal

    # ----------------------------------------------------------------------------------- training
    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        ev = Events.from_batch(batch)
        favourites = self.favourites[batch.users] if "retrieval" in self.tasks else None  # [B, F]
        with_favourites = favourites is not None and bool((favourites > 0).any())
        h = self._encode(ev, outputs_from=last_outputs_from(batch, end_queries=with_favourites))
        # first: its dropout draws precede the negatives'
        rank = self._rank(ev, h, batch.num_targets) if "ranking" in self.tasks else None
        out: dict[str, torch.Tensor] = {}
        parts = []
        if "retrieval" in self.tasks:
            users = batch.at_targets(batch.users[batch.sequence_index()])
            positives = batch.at_targets(batch.items)
            queries = self._queries(batch, ev, h)
            if with_favourites:
                queries, positives, users = self._with_favourites(batch, ev, h, favourites, queries, positives, users)
            if self.training:  # every rank counts the whole global batch's positives
                self.item_counts += sum_over_ranks(torch.bincount(positives, minlength=self.num_items + 1)
                                                   .to(self.item_counts))
            retrieval = self.retrieval_loss(queries, positives, users)
            out["retrieval_loss"] = retrieval.detach()
            # a mean over the targets and the favourite rows: under DDP weighted by its share of those rows
            parts.append(self.cfg.alpha * retrieval * rows_weight(len(positives), batch.num_targets, h.device))
        if rank is not None:
            per_task = F.binary_cross_entropy_with_logits(rank.float(), batch.at_targets(batch.signals),
                                                          reduction="none").mean(0)  # [T]
            ranking = per_task.sum()
            out["ranking_loss"] = ranking.detach()
            if len(per_task) > 1:
                out |= {f"loss/{n}": per_task[t].detach() for t, n in enumerate(self.signal_names)}
            parts.append(self.cfg.beta * ranking)
        if self.weighter is not None:
            losses = torch.stack([out["retrieval_loss"], out["ranking_loss"]])  # [2], this process's batch
            if self.training:  # under DDP: the global batch's, so every rank weighs the tasks alike
                losses = mean_over_ranks(losses, (len(positives), batch.target_mask.sum()))
            weights = self.weighter(losses)
            out |= {"w_retrieval": weights[0], "w_ranking": weights[1]}
            parts = [w * p for w, p in zip(weights, parts, strict=True)]
        out["loss"] = sum(parts)
        return out

    def _with_favourites(self, batch: JaggedBatch, ev: Events, h: torch.Tensor, fav: torch.Tensor,
                         queries: torch.Tensor, positives: torch.Tensor, users: torch.Tensor):
        """Append one retrieval row per potential favourite (``fav`` ``[B, F]``, the batch users'; 0:
        none) of a window with targets: the query after the window's last event, the favourite as its
        positive. (Every training window has targets; a DDP rank's ghost window has none and so adds
        no rows, as it adds no targets.)"""
        row, slot = torch.nonzero((fav > 0) & ev.target.any(1, keepdim=True), as_tuple=True)
        return (torch.cat([queries, self._end_query(ev, h)[row]]), torch.cat([positives, fav[row, slot]]),
                torch.cat([users, batch.users[row]]))

    def retrieval_loss(self, queries: torch.Tensor, positives: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """Sampled softmax of each query ``[N, D]`` over its positive and ``num_negatives`` negatives:
        ``num_negatives - m`` uniform catalogue items shared by the batch plus the user's ``m`` mined
        hard negatives (uniform draws until mined), plus the batch's other positives if
        ``in_batch_negatives`` (under DDP the global batch's, every rank's, as in one process).
        Negatives equal to the row's positive or to one of the user's favourites are masked out."""
        cfg, table = self.cfg, self.item_emb.weight
        n, device = len(queries), queries.device
        m = cfg.hard_negatives
        uniform = torch.randint(1, self.num_items + 1, (cfg.num_negatives - m,), device=device)  # [K - m]
        hard = self.hard[users]  # [N, m]
        hard = torch.where(hard > 0, hard, torch.randint_like(hard, 1, self.num_items + 1))
        pos_logit = (queries * table[positives]).sum(-1, keepdim=True)  # [N, 1]
        logits = [queries @ table[uniform].T, torch.einsum("nd,nmd->nm", queries, table[hard])]  # [N, K-m], [N, m]
        ids = [uniform.expand(n, -1), hard]
        if cfg.in_batch_negatives:
            in_batch = gather_over_ranks(positives)  # [N_global], this rank's rows among them
            logits.append(queries @ table[in_batch].T)  # [N, N_global]
            ids.append(in_batch.expand(n, -1))
        if cfg.logq_correction:
            log_q = self._log_expected_count(len(in_batch) if cfg.in_batch_negatives else n, len(uniform))
            pos_logit = pos_logit - log_q[positives][:, None]
            logits[0] = logits[0] - log_q[uniform]
            if cfg.in_batch_negatives:
                logits[2] = logits[2] - log_q[in_batch][None, :]
        neg_logit, neg_ids = torch.cat(logits, dim=1), torch.cat(ids, dim=1)  # [N, C]
        drop = neg_ids == positives[:, None]
        fav = self.favourites[users]  # [N, F]
        drop |= ((neg_ids[:, :, None] == fav[:, None, :]) & (fav[:, None, :] > 0)).any(-1)
        neg_logit = neg_logit.masked_fill(drop, float("-inf"))
        logits_all = torch.cat([pos_logit, neg_logit], dim=1).float()
        return F.cross_entropy(logits_all, torch.zeros(n, dtype=torch.long, device=device))

    def _log_expected_count(self, batch_rows: int, uniform: int) -> torch.Tensor:
        """``[I + 1]`` log of each item's expected count among the sampled candidates: ``uniform / I``
        from the catalogue sampler plus ``batch_rows · p(item)`` from the batch (popularity estimated
        from the training positives seen so far, add-one smoothed)."""
        count = uniform / self.num_items
        if self.cfg.in_batch_negatives:
            p = (self.item_counts + 1) / (self.item_counts.sum() + self.num_items)
            count = count + batch_rows * p
        return torch.log(torch.as_tensor(count, device=self.item_counts.device).expand(self.num_items + 1))

    # ----------------------------------------------------------------------------------- enhancer
    @property
    def enhancer_on(self) -> bool:
        return self.cfg.hard_negatives > 0 or self.cfg.favourite_threshold < 1

    @torch.no_grad()
    def before_epoch(self, epoch: int, history_loader, device: torch.device) -> dict[str, float]:
        """Ranking-driven enhancer: mine hard negatives and potential favourites for the next epoch
        from the model as it stands (no mining before the first epoch: an untrained ranker says nothing)."""
        if not self.enhancer_on:
            return {}
        if epoch == 0:
            return {"mined_users": 0.0, "favourites": 0.0}
        was_training = self.training
        self.eval()
        pool_size = self.pool_size
        mined = torch.zeros(len(self.hard), dtype=torch.bool, device=device)
        for batch in history_loader:
            batch = batch.to(device)
            # [B, P] distinct random items per row
            pool = torch.rand(batch.batch_size, self.num_items, device=device).topk(pool_size, dim=1).indices + 1
            query, rank = self.retrieve_and_rank(batch, pool)  # [B, D], [B, P]
            s_ret = torch.sigmoid((query[:, None, :] * self.item_emb(pool)).sum(-1).float())
            s_rank = torch.sigmoid(rank.float())
            ev = Events.from_batch(batch)
            seen = ((pool[:, :, None] == ev.items[:, None, :]) & ev.valid[:, None, :]).any(-1)  # [B, P]
            if self.cfg.hard_negatives:
                score = relative_score(s_ret, s_rank).masked_fill(seen, float("-inf"))
                top = score.topk(self.cfg.hard_negatives, dim=1)
                self.hard[batch.users] = torch.where(top.values > float("-inf"), pool.gather(1, top.indices), 0)
            liked = s_rank.masked_fill(seen, 0.0)
            top = liked.topk(min(self.cfg.max_favourites, pool_size), dim=1)
            fav = torch.where(top.values > self.cfg.favourite_threshold, pool.gather(1, top.indices), 0)
            self.favourites[batch.users] = F.pad(fav, (0, self.cfg.max_favourites - fav.shape[1]))
            mined[batch.users] = True
        self.train(was_training)
        return {"mined_users": float(mined.sum()), "favourites": float((self.favourites > 0).sum())}

