"""Attention backends behind one typed interface, chosen once by name in the model config.

An :class:`AttentionBackend` holds ``hstu_attention`` and ``softmax_attention`` with the signatures
of :mod:`genrec.ops.reference.attention`. A model resolves its backend once at construction and hands
it to its blocks, which keep it (as Hugging Face's attention layers keep their implementation); no
call threads a backend through. ``reference`` is dense PyTorch and runs anywhere; ``triton`` (fused
GPU kernels, tested against ``reference``) needs a CUDA device. Asking for a backend that cannot run
here is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch

from genrec.ops.layout import TokenLayout
from genrec.ops.reference import attention as reference

BackendName = Literal["reference", "triton"]
BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)


class HSTUAttention(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                 rel_pos: torch.Tensor | None, rel_time: torch.Tensor | None, scale: float,
                 q_offset: int = 0) -> torch.Tensor: ...


class SoftmaxAttention(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                 alibi: torch.Tensor | None = None, q_offset: int = 0) -> torch.Tensor: ...


class PrepareHSTU(Protocol):
    def __call__(self, layout: TokenLayout, head_dim: int, dtype: torch.dtype, num_pos: int | None,
                 num_time: int | None, grads: bool, q_offset: int = 0) -> tuple[tuple, ...]: ...


@dataclass(frozen=True)
class AttentionBackend:
    """The attention functions of one backend: q ``[B, H, L - q_offset, Dh]``, k, v ``[B, H, L, Dh]``
    -> ``[B, H, L - q_offset, Dh]`` (see :mod:`genrec.ops.reference.attention`).

    ``prepare_hstu`` (None: nothing worth it) builds into a layout's cache what ``hstu_attention``
    will read from it and returns those keys, so a data loader can build it on the host ahead of the
    step (:class:`genrec.nn.prepared.LayoutPlan`): the fused kernels' schedules, a few hundred small
    tensor ops per step otherwise. The reference backend has none: its cache is dense ``[B, L, L]``
    masks and distances, cheaper to build where they are used than to ship from a worker."""

    name: BackendName
    hstu_attention: HSTUAttention
    softmax_attention: SoftmaxAttention
    prepare_hstu: PrepareHSTU | None = None


REFERENCE = AttentionBackend("reference", reference.hstu_attention, reference.softmax_attention)


def triton_available() -> str | None:
    """None if the ``triton`` backend can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


def get_backend(name: BackendName) -> AttentionBackend:
    if name == "reference":
        return REFERENCE
    if name == "triton":
        reason = triton_available()
        if reason:
            raise ValueError(f"attention backend 'triton' cannot run here: {reason}; use 'reference'")
        from genrec.ops.triton.backend import TRITON

        return TRITON
    raise ValueError(f"unknown attention backend {name!r}; known: {BACKEND_NAMES}")
