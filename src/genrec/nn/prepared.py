"""A model's attention layout built ahead of its training step, in the data loader.

On the fused backend a step's forward builds its token layout's kernel metadata and tile schedules
before the first attention can run: ~180 small tensor ops, each a host launch (the layout rows of
benchmarks/results/speed_*.md time what they cost a step; issue 14 item 4). They depend on the
batch only, so a :class:`LayoutPlan` builds them on the host, in a loader worker, while the
previous step runs (the step then only copies them to the device); the batch
carries them (:attr:`genrec.data.batching.JaggedBatch.known_layout`) and the model seeds its layout
with them (:meth:`genrec.ops.layout.TokenLayout.seed`).

A plan holds no weights (a worker process gets a copy): the function that builds the model's layout
from a batch, and per distinct block the attention's sizes (:class:`AttentionSpec`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from genrec.data.batching import JaggedBatch
from genrec.ops.dispatch import AttentionBackend
from genrec.ops.layout import PreparedLayout, TokenLayout


@dataclass(frozen=True)
class AttentionSpec:
    """What one block's HSTU attention needs from a layout: its backend, head dim and bias tables'
    slots (None: no bias)."""

    backend: AttentionBackend
    head_dim: int
    num_pos: int | None
    num_time: int | None


@dataclass(frozen=True)
class LayoutPlan:
    """``plan(host_batch)``: the layout's cache entries the model's attention reads in a step of
    ``dtype`` queries (``grads``: with the backward's schedules), built on the host. ``last``: the
    last block's spec where that block computes the outputs of the tokens from ``outputs_from(batch)``
    on only (its kernels' schedules then cover those queries:
    :meth:`genrec.nn.hstu.HSTUBlock.forward`)."""

    batch_layout: Callable[[JaggedBatch], TokenLayout]  # picklable: a module's function or a partial of one
    attention: tuple[AttentionSpec, ...]  # the distinct specs of the blocks whose queries are every token
    dtype: torch.dtype
    grads: bool = True
    last: AttentionSpec | None = None
    outputs_from: Callable[[JaggedBatch], int] | None = None  # picklable, as batch_layout

    @classmethod
    def of(cls, batch_layout: Callable[[JaggedBatch], TokenLayout], specs: Iterable[AttentionSpec | None],
           dtype: torch.dtype, grads: bool = True,
           outputs_from: Callable[[JaggedBatch], int] | None = None) -> LayoutPlan | None:
        """The plan for blocks of these specs (None for a block whose backend prepares nothing), the
        last one's queries from ``outputs_from(batch)`` where given; None when no block's backend
        prepares anything."""
        specs = list(specs)
        last = specs.pop() if outputs_from is not None and specs else None
        distinct = tuple(dict.fromkeys(spec for spec in specs if spec is not None))
        if not distinct and last is None:
            return None
        return cls(batch_layout, distinct, dtype, grads, last, outputs_from if last is not None else None)

    def __call__(self, batch: JaggedBatch) -> PreparedLayout:
        if batch.offsets.device.type != "cpu":
            raise ValueError(f"a LayoutPlan builds on the host, in the data loader: the batch is on "
                             f"{batch.offsets.device}")
        layout = self.batch_layout(batch)
        keys: dict[tuple, None] = {}
        queried = [(spec, 0) for spec in self.attention]
        if self.last is not None:
            queried.append((self.last, self.outputs_from(batch)))
        for spec, q_offset in queried:
            keys.update(dict.fromkeys(spec.backend.prepare_hstu(layout, spec.head_dim, self.dtype, spec.num_pos,
                                                                spec.num_time, self.grads, q_offset)))
        return layout.prepared(keys)
