"""What the generative rankers (HSTU, GenRank, DFGR, SFGR) share: heads, losses and scoring.

Each model only says how it turns a batch into hidden states at its target events
(:meth:`GenerativeRanker.target_hidden`); losses are taken only there, the predictions read only
there. Every target's hidden state depends on the actions of earlier requests only (tested).
"""

from __future__ import annotations

import torch

from genrec.data.batching import JaggedBatch
from genrec.models.base import DatasetInfo, RecModel
from genrec.nn.heads import ActionHeads


class GenerativeRanker(RecModel):
    tasks = ("ranking",)

    def __init__(self, dim: int, info: DatasetInfo, extra_thresholds, multiclass_weight: float):
        super().__init__()
        self.heads = ActionHeads(dim, info.rating_values, tuple(extra_thresholds), multiclass_weight)

    def target_hidden(self, batch: JaggedBatch) -> torch.Tensor:  # [num_targets, D], flat target order
        raise NotImplementedError

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        outputs = self.heads(self.target_hidden(batch))
        return self.heads.loss(outputs, batch.labels[batch.target_mask], batch.actions[batch.target_mask])

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:
        return self.heads.main_logit(self.heads(self.target_hidden(batch)))
