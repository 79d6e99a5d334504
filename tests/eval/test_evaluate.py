"""The evaluation loop: what it scores and in what precision."""

from __future__ import annotations

import torch

from genrec.eval.evaluate import evaluate
from tests.helpers import make_batch


class FixedRetrieval(torch.nn.Module):
    """A retrieval model with a fixed item table and fixed queries (one per target)."""

    tasks = ("retrieval",)

    def __init__(self, num_items: int, dim: int, targets: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.items = torch.randn(num_items + 1, dim, generator=g)  # [I + 1, D]
        self.queries = torch.randn(targets, dim, generator=g)  # [N, D]

    def item_embeddings(self) -> torch.Tensor:
        return self.items

    def retrieval_queries(self, batch) -> torch.Tensor:
        return self.queries


def test_autocast_evaluation_ranks_the_catalogue_in_float32():
    """Each target is the 4th best item in float32; a bfloat16 catalogue product ties it with its
    neighbours (HR@10 fell to ~0.8), the float32 one keeps the exact ranks under autocast too."""
    batch = make_batch([30] * 10, 0)  # 300 targets
    model = FixedRetrieval(num_items=4000, dim=64, targets=int(batch.target_mask.sum()))
    scores = model.queries @ model.items.T  # [N, I + 1]
    scores[:, 0] = float("-inf")
    batch.items[batch.target_mask] = scores.argsort(1, descending=True)[:, 3]
    exact = evaluate(model, [batch], torch.device("cpu"), ks=(3, 4, 10))
    assert (exact["hr@3"], exact["hr@4"], exact["mrr"]) == (0.0, 1.0, 0.25)
    assert evaluate(model, [batch], torch.device("cpu"), ks=(3, 4, 10), autocast=True) == exact
