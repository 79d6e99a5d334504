"""What the generative rankers (HSTU, GenRank, DFGR, SFGR) share: heads, losses and offline scoring.

Each model says how it turns a batch into hidden states at its target events
(:meth:`GenerativeRanker.target_hidden`) and how it scores candidates after a history
(:meth:`~genrec.models.base.RecModel.score`); losses are taken only at the targets, the predictions
read only there. Every target's hidden state depends on the actions of earlier requests only (tested).
"""

from __future__ import annotations

import torch

from genrec.data.batching import JaggedBatch
from genrec.data.info import DatasetInfo
from genrec.models.base import RecModel
from genrec.nn.heads import ActionHeads


class GenerativeRanker(RecModel):
    tasks = ("ranking",)

    def __init__(self, dim: int, info: DatasetInfo, cfg):
        """``cfg``: the model's config, read for its head settings (``extra_thresholds``,
        ``multiclass_weight``, ``task_weights``, ``task_head``, ``num_experts``)."""
        super().__init__()
        self.signal_names = list(info.signal_names)
        self.heads = ActionHeads(dim, info.rating_values, tuple(cfg.extra_thresholds), cfg.multiclass_weight,
                                 self.signal_names, tuple(cfg.task_weights), cfg.task_head, cfg.num_experts)

    def target_hidden(self, batch: JaggedBatch) -> torch.Tensor:  # [num_targets, D], flat target order
        raise NotImplementedError

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        outputs = self.heads(self.target_hidden(batch))
        return self.heads.loss(outputs, batch.at_targets(batch.signals), batch.at_targets(batch.actions))

    def rank_logits(self, batch: JaggedBatch) -> torch.Tensor:
        return self.heads.main_logit(self.heads(self.target_hidden(batch)))

    def task_logits(self, batch: JaggedBatch) -> torch.Tensor:  # [num_targets, T], one logit per signal
        return self.heads.task_logits(self.heads(self.target_hidden(batch)))
