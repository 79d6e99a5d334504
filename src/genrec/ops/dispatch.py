"""Attention backends behind one interface, selected by name in the model config.

A backend provides ``hstu_attention`` and ``softmax_attention`` with the signatures of
:mod:`genrec.ops.reference.attention`. ``reference`` is dense PyTorch and runs anywhere; fused GPU
kernels register here under their own name and are tested against it. Asking for a backend that
cannot run here is an error, never a silent fallback.
"""

from __future__ import annotations

from types import ModuleType

from genrec.ops.reference import attention as reference

BACKENDS: dict[str, ModuleType] = {"reference": reference}


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available here; available: {sorted(BACKENDS)}")
    return BACKENDS[name]
