"""Attention backends behind one interface, selected by name in the model config.

A backend provides ``hstu_attention`` and ``softmax_attention`` with the signatures of
:mod:`genrec.ops.reference.attention`. ``reference`` is dense PyTorch and runs anywhere; fused GPU
kernels register here under their own name and are tested against it. Asking for a backend that
cannot run here is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from genrec.ops.reference import attention as reference

BACKENDS: dict[str, ModuleType] = {"reference": reference}


def triton_available() -> str | None:
    """None if the ``triton`` backend can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


def get_backend(name: str) -> ModuleType:
    if name == "triton" and name not in BACKENDS:
        reason = triton_available()
        if reason:
            raise ValueError(f"attention backend 'triton' cannot run here: {reason}; use 'reference'")
        BACKENDS[name] = importlib.import_module("genrec.ops.triton.backend")
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available here; available: {sorted(BACKENDS)} "
                         "(and 'triton' on a CUDA device)")
    return BACKENDS[name]
