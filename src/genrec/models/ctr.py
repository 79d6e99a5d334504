"""The training and scoring the classic CTR rankers share: one logit per action signal, BCE per
signal (summed; the first signal is the dataset label), logits out.

A CTR ranker is its feature embedding (:class:`genrec.nn.ctr.CTRFeatureEmbedding`, the same for all)
and :meth:`CTRRanker.logits` on those features; offline targets and online candidates go through
the same two steps, so they get the same score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genrec.data.batching import JaggedBatch
from genrec.models.base import RecModel
from genrec.nn.ctr import CTRFeatureEmbedding, CTRInputs


class CTRRanker(RecModel):
    tasks = ("ranking",)
    reads_user_ids = True  # the user is one of the features

    def __init__(self, features: CTRFeatureEmbedding):
        super().__init__()
        self.features = features

    @property
    def signal_names(self) -> list[str]:
        return self.features.signal_names

    def logits(self, x: CTRInputs) -> torch.Tensor:  # [N, T]
        raise NotImplementedError

    def task_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [N, T], one logit per signal
        return self.logits(self.features(batch))

    def score(self, history: JaggedBatch, candidates: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        """``[B, M, T]``; the CTR features hold no time, so ``request_time`` is unused."""
        return self.logits(self.features.for_candidates(history, candidates)).view(*candidates.shape, -1)

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [N], the first signal (the label)
        return self.task_logits(batch)[:, 0]

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        logits = self.task_logits(batch)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # loss in at least fp32 under autocast
        targets = batch.at_targets(batch.signals).to(logits.dtype)  # [N, T]
        per_task = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(0)  # [T]
        loss = per_task.sum()
        out = {"loss": loss, "ranking_loss": loss.detach()}
        if len(per_task) > 1:
            out |= {f"loss/{name}": per_task[t].detach() for t, name in enumerate(self.signal_names)}
        return out
