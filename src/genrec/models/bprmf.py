"""BPR-MF (Rendle et al., UAI 2009): a user vector and item vectors, trained with the pairwise BPR
loss ``-log σ(uᵀe_pos − uᵀe_neg)`` on one uniform negative per positive. The user vector is the
query for every target of that user (no order, no actions). A retrieval baseline of the UniGRF paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genrec.data.batching import JaggedBatch
from genrec.data.info import DatasetInfo
from genrec.models.base import RecModel
from genrec.settings import Positive


@dataclass
class BPRMFConfig:
    d_model: Positive = 64


class BPRMF(RecModel):
    tasks = ("retrieval",)
    reads_user_ids = True  # the query is the user's embedding

    def __init__(self, cfg: BPRMFConfig, info: DatasetInfo):
        super().__init__()
        self.num_items = info.num_items
        self.user_emb = nn.Embedding(info.num_users, cfg.d_model)
        self.item_emb = nn.Embedding(info.num_items + 1, cfg.d_model, padding_idx=0)
        nn.init.normal_(self.user_emb.weight, std=0.02)
        nn.init.normal_(self.item_emb.weight, std=0.02)

    def retrieval_queries(self, batch: JaggedBatch) -> torch.Tensor:
        return self.user_emb(batch.at_targets(batch.users[batch.sequence_index()]))  # [N, D]

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    def forward(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        users = self.retrieval_queries(batch)
        positives = batch.at_targets(batch.items)
        negatives = torch.randint(1, self.num_items + 1, positives.shape, device=positives.device)
        margin = (users * (self.item_emb(positives) - self.item_emb(negatives))).sum(-1)
        loss = -F.logsigmoid(margin).mean()
        return {"loss": loss, "retrieval_loss": loss.detach()}
