"""Action heads on a target's hidden state: one logit per action signal (click, like, ..., or the
dataset label, e.g. rating > 3, when there is one signal), optional extra binary tasks
(rating > threshold_i) and an optional multi-class head over the rating classes.

Each signal is a binary task with its own BCE, summed with configurable ``task_weights``. The task
logits come from one shared MLP (``task_head: mlp``, the shared-bottom design) or from an MMoE
(``task_head: mmoe``, Ma et al. KDD 2018: shared experts, one softmax gate and one tower per task).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TASK_HEADS = ("mlp", "mmoe")


class MMoE(nn.Module):
    """``[N, D]`` -> ``[N, T]``: ``num_experts`` SiLU experts shared by all tasks, mixed per task by a
    softmax gate over the input, then one linear tower per task."""

    def __init__(self, dim: int, num_tasks: int, num_experts: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.experts = nn.Linear(dim, num_experts * dim)
        self.gates = nn.Linear(dim, num_tasks * num_experts)
        self.towers = nn.Parameter(torch.randn(num_tasks, dim) * dim ** -0.5)
        self.bias = nn.Parameter(torch.zeros(num_tasks))
        self.num_tasks, self.num_experts = num_tasks, num_experts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden)
        experts = F.silu(self.experts(x)).view(len(x), self.num_experts, -1)  # [N, E, D]
        gates = self.gates(x).view(len(x), self.num_tasks, self.num_experts).softmax(-1)  # [N, T, E]
        mixed = gates @ experts  # [N, T, D]
        return (mixed * self.towers).sum(-1) + self.bias  # [N, T]


class ActionHeads(nn.Module):
    def __init__(self, dim: int, rating_values: list[float], extra_thresholds: tuple[float, ...] = (),
                 multiclass_weight: float = 0.0, signal_names: list[str] | None = None,
                 task_weights: tuple[float, ...] = (), task_head: str = "mlp", num_experts: int = 4):
        super().__init__()
        self.signal_names = list(signal_names or ["like"])
        self.num_tasks = len(self.signal_names)
        if task_head not in TASK_HEADS:
            raise ValueError(f"task_head must be one of {TASK_HEADS}, got {task_head!r}")
        if task_weights and len(task_weights) != self.num_tasks:
            raise ValueError(f"task_weights {list(task_weights)} needs one weight per signal {self.signal_names}")
        self.register_buffer("task_weights", torch.tensor(list(task_weights or [1.0] * self.num_tasks),
                                                          dtype=torch.float32), persistent=False)
        self.num_binary = self.num_tasks + len(extra_thresholds)
        self.multiclass_weight = multiclass_weight
        self.register_buffer("ratings", torch.tensor(rating_values, dtype=torch.float32), persistent=False)
        self.register_buffer("thresholds", torch.tensor(list(extra_thresholds), dtype=torch.float32),
                             persistent=False)
        self.mmoe = MMoE(dim, self.num_tasks, num_experts) if task_head == "mmoe" else None
        num_out = self.num_binary + (len(rating_values) if multiclass_weight > 0 else 0)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, num_out))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, outputs]; tasks first
        out = self.mlp(hidden)
        if self.mmoe is not None:
            out = torch.cat([self.mmoe(hidden), out[:, self.num_tasks:]], dim=1)
        return out

    def task_logits(self, outputs: torch.Tensor) -> torch.Tensor:  # [N, T], one per signal
        return outputs[:, : self.num_tasks]

    def main_logit(self, outputs: torch.Tensor) -> torch.Tensor:  # [N], the first signal (the label)
        return outputs[:, 0]

    def candidate_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of candidates ``[B, M, D]`` -> one logit per candidate and signal ``[B, M, T]``
        (``T = len(signal_names)``): what :meth:`genrec.models.base.RecModel.score` returns."""
        b, m, _ = hidden.shape
        return self.task_logits(self(hidden.reshape(b * m, -1))).view(b, m, self.num_tasks)

    def loss(self, outputs: torch.Tensor, signals: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """``signals`` ``[N, T]`` binary targets (or ``[N]`` with one signal), ``actions`` ``[N]``."""
        if outputs.dtype in (torch.float16, torch.bfloat16):
            outputs = outputs.float()  # losses in at least fp32 under autocast
        targets = (signals if signals.ndim == 2 else signals[:, None]).to(outputs.dtype)
        per_task = F.binary_cross_entropy_with_logits(self.task_logits(outputs), targets,
                                                      reduction="none").mean(0)  # [T]
        losses = {"ranking_loss": (per_task * self.task_weights).sum()}
        if self.num_tasks > 1:
            losses |= {f"loss/{name}": per_task[t] for t, name in enumerate(self.signal_names)}
        total = losses["ranking_loss"]
        if len(self.thresholds):
            extra = (self.ratings[actions][:, None] > self.thresholds[None, :]).to(outputs.dtype)
            losses["extra_binary_loss"] = F.binary_cross_entropy_with_logits(
                outputs[:, self.num_tasks: self.num_binary], extra)
            total = total + losses["extra_binary_loss"]
        if self.multiclass_weight > 0:
            losses["multiclass_loss"] = F.cross_entropy(outputs[:, self.num_binary:], actions)
            total = total + self.multiclass_weight * losses["multiclass_loss"]
        return {"loss": total} | {k: v.detach() for k, v in losses.items()}
