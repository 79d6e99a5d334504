"""The training and scoring the classic CTR rankers share: one logit per action signal, BCE per
signal (summed; the first signal is the dataset label), logits out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genrec.data.batching import JaggedBatch
from genrec.models.base import RecModel
from genrec.nn.ctr import CTRInputs


class CTRRanker(RecModel):
    tasks = ("ranking",)

    @property
    def signal_names(self) -> list[str]:
        return self.features.signal_names

    def logits(self, x: CTRInputs) -> torch.Tensor:  # [N, T]
        raise NotImplementedError

    def task_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [N, T], one logit per signal
        return self.logits(self.features(batch))

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [N], the first signal (the label)
        return self.task_logits(batch)[:, 0]

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        logits = self.task_logits(batch)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # loss in at least fp32 under autocast
        targets = batch.signals[batch.target_mask].to(logits.dtype)  # [N, T]
        per_task = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(0)  # [T]
        loss = per_task.sum()
        out = {"loss": loss, "ranking_loss": loss.detach()}
        if len(per_task) > 1:
            out |= {f"loss/{name}": per_task[t].detach() for t, name in enumerate(self.signal_names)}
        return out
