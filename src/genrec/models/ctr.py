"""The training and scoring the classic CTR rankers share: BCE on the target label, logits out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genrec.data.batching import JaggedBatch
from genrec.models.base import RecModel
from genrec.nn.ctr import CTRInputs


class CTRRanker(RecModel):
    tasks = ("ranking",)

    def logits(self, x: CTRInputs) -> torch.Tensor:  # [N]
        raise NotImplementedError

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:
        return self.logits(self.features(batch))

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        logits = self.rank_logits(batch)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # loss in at least fp32 under autocast
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels[batch.target_mask].to(logits.dtype))
        return {"loss": loss, "ranking_loss": loss.detach()}
