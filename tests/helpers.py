"""Test helpers shared across test modules."""

from __future__ import annotations

import numpy as np
import torch

from genrec.data.batching import JaggedBatch


def loss_before_and_after_fitting(trainer, steps: int = 30) -> tuple[float, float]:
    """Fit one real training batch for ``steps`` steps; its loss before and after, measured the same
    way (eval mode, fixed seed: same negatives, no dropout) so only the weights differ."""
    batch = next(iter(trainer.loader("train"))).to(trainer.device)

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


def make_batch(lengths: list[int], seed: int, all_targets: bool = True) -> JaggedBatch:
    """Random ragged sequences; requests of 1-3 events with equal timestamps."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    requests, times = [], []
    for n in lengths:
        r, t, left = [], [], 0
        req, now = -1, 1_000_000
        for _ in range(n):
            if left == 0:
                req, left = req + 1, int(rng.integers(1, 4))
                now += int(rng.integers(1, 100_000))
            r.append(req)
            t.append(now)
            left -= 1
        requests += r
        times += t
    total = int(offsets[-1])
    actions = rng.integers(0, 5, total)
    target = np.ones(total, bool)
    if not all_targets:
        for s, e in zip(offsets[:-1], offsets[1:], strict=True):
            target[s: s + (e - s) // 2] = False
    return JaggedBatch(
        offsets=torch.tensor(offsets), items=torch.tensor(rng.integers(1, 41, total)),
        actions=torch.tensor(actions), labels=torch.tensor((actions >= 3).astype(np.float32)),
        timestamps=torch.tensor(times), request_ids=torch.tensor(requests), target_mask=torch.tensor(target),
        users=torch.arange(len(lengths)))


def with_last_targets(batch: JaggedBatch, share: float) -> JaggedBatch:
    """``batch`` whose targets are the last ``ceil(share · n)`` events of each sequence of n events
    (the temporal setting: a few target requests after a long history; ``share = 1``: every event)."""
    lengths = batch.lengths[batch.sequence_index()]  # [T] length of each event's sequence
    last = batch.positions() >= lengths - torch.ceil(share * lengths.double()).long()
    return JaggedBatch(**batch.tensors() | {"target_mask": last})


def loss_and_grads(model: torch.nn.Module, batch: JaggedBatch, seed: int | None = None):
    """``batch``'s training loss and every parameter's gradient; ``seed`` re-seeds the draws first, so
    that two passes sample the same negatives."""
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad()
    loss = model(batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def record_outputs_from(monkeypatch, block_class: type) -> list[int]:
    """The ``outputs_from`` of every call of a ``block_class`` block from now on, in order (the blocks
    compute as before): which tokens a model asked its blocks for."""
    asked: list[int] = []
    full_forward = block_class.forward
    monkeypatch.setattr(block_class, "forward", lambda self, x, layout, *args, outputs_from=0: (
        asked.append(outputs_from) or full_forward(self, x, layout, *args, outputs_from=outputs_from)))
    return asked
