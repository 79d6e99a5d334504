"""Evaluation loop: scores every target of a split with the model's ranking and/or retrieval heads.

Retrieval ranks the *full* catalogue (items 1..num_items) for each target; nothing is excluded,
not even items already in the user's history (the UniGRF paper's protocol, §5.1.2: "the entire item
set is used as the candidate set"). Only the padding id 0 is never a candidate.
"""

from __future__ import annotations

import torch

from genrec.eval.metrics import RankingAccumulator, RetrievalAccumulator, target_ranks
from genrec.models.base import RecModel


@torch.no_grad()
def evaluate(model: RecModel, loader, device: torch.device, ks: tuple[int, ...] = (10, 50),
             autocast: bool = False) -> dict[str, float]:
    model.eval()
    ranking = RankingAccumulator()
    retrieval = RetrievalAccumulator(ks)
    items = None
    if "retrieval" in model.tasks:
        items = model.item_embeddings().float()  # [I + 1, D]
    for batch in loader:
        batch = batch.to(device)
        users = batch.users[batch.sequence_index()][batch.target_mask]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if "ranking" in model.tasks:
                ranking.update(users, batch.labels[batch.target_mask], model.rank_logits(batch).float())
            if items is not None:
                queries = model.retrieval_queries(batch).float()  # [N, D]
                for chunk in range(0, len(queries), 1024):  # bounds memory at 1024 x num_items scores
                    scores = queries[chunk: chunk + 1024] @ items.T  # [n, I + 1]
                    scores[:, 0] = float("-inf")
                    targets = batch.items[batch.target_mask][chunk: chunk + 1024]
                    retrieval.update_ranks(target_ranks(scores, targets))
    return ranking.compute() | retrieval.compute()
