"""Test helpers shared across test modules."""

from __future__ import annotations

import torch


def loss_before_and_after_fitting(trainer, steps: int = 30) -> tuple[float, float]:
    """Fit one real training batch for ``steps`` steps; its loss before and after, measured the same
    way (eval mode, fixed seed: same negatives, no dropout) so only the weights differ."""
    batch = next(iter(trainer.loader("train")))

    def loss() -> float:
        trainer.model.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            value = float(trainer.model(batch)["loss"])
        trainer.model.train()
        return value

    first = loss()
    for _ in range(steps):
        trainer.optimizer.zero_grad()
        trainer.model(batch)["loss"].backward()
        trainer.optimizer.step()
    return first, loss()
