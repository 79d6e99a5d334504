"""``genrec export``: a trained ranker's candidate scoring as an AOTInductor package (``model.pt2``).

``torch.export`` traces :class:`CandidateScoring` — padded histories and candidates in, one
probability per candidate out — and ``torch._inductor.aoti_compile_and_package`` compiles it to a
shared library inside the ``.pt2`` archive, which C++ (``AOTIModelPackageLoader``) or Python
(``torch._inductor.aoti_load_package``) runs without the model's Python code. Triton Inference
Server's PyTorch backend loads such packages under ``platform: "torch_aoti"``; :func:`triton_config`
writes the ``config.pbtxt`` that describes the inputs and outputs.

History length, candidates per request and batch size are dynamic dimensions, within the bounds
given at export time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from genrec.models.base import RecModel
from genrec.nn.events import Events

INPUTS = ("items", "actions", "timestamps", "request_ids", "lengths", "candidates", "request_time")


class CandidateScoring(nn.Module):
    """P(label) ``[B, M]`` of ``candidates`` ``[B, M]`` as the next request at ``request_time``
    ``[B]`` after right-padded histories ``items, actions, timestamps, request_ids`` ``[B, N]`` of
    ``lengths`` ``[B]`` events (all int64; request ids from 0 per row, as the dataset numbers them)."""

    def __init__(self, model: RecModel):
        super().__init__()
        if model.kv_serving is None:
            raise ValueError(f"export covers the KV-cache rankers (HSTU, DFGR), not {type(model).__name__}")
        self.model = model.eval()

    def forward(self, items, actions, timestamps, request_ids, lengths, candidates, request_time):
        valid = torch.arange(items.shape[1], device=items.device)[None, :] < lengths[:, None]  # [B, N]
        ev = Events.from_padded(items, actions, torch.zeros_like(items, dtype=torch.float32), request_ids,
                                timestamps, valid)
        serving = self.model.kv_serving
        cache = serving.encode_events(ev, candidates.shape[1])
        return torch.sigmoid(serving.score_cached(cache, candidates, request_time)[..., 0].float())  # main label


@dataclass
class ExportShapes:
    """Example and bounds of the dynamic dimensions."""

    batch: int = 2
    history: int = 8
    candidates: int = 4
    max_batch: int = 256
    max_history: int = 200
    max_candidates: int = 1024


def example_inputs(shapes: ExportShapes, num_items: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    b, n, m = shapes.batch, shapes.history, shapes.candidates
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, num_items + 1, (b, n), generator=g)
    timestamps = torch.arange(n).repeat(b, 1) * 60 + 1_000_000
    request_ids = torch.arange(n).repeat(b, 1)
    lengths = torch.full((b,), n)
    lengths[0] = n - 1  # one padded row: padding must not be special-cased by the trace
    candidates = torch.randint(1, num_items + 1, (b, m), generator=g)
    out = (items, torch.zeros_like(items), timestamps, request_ids, lengths, candidates, timestamps[:, -1] + 60)
    return tuple(t.to(device) for t in out)


def export(model: RecModel, out: Path, num_items: int, shapes: ExportShapes | None = None,
           device: torch.device | None = None) -> Path:
    """Trace, compile and package the model's candidate scoring to ``out`` (a ``.pt2`` file)."""
    shapes, device = shapes or ExportShapes(), device or torch.device("cpu")
    module = CandidateScoring(model).to(device)
    batch = torch.export.Dim("batch", min=1, max=shapes.max_batch)
    history = torch.export.Dim("history", min=3, max=shapes.max_history)  # 0-2 specialise in tracing
    candidates = torch.export.Dim("candidates", min=1, max=shapes.max_candidates)
    per_event = {0: batch, 1: history}
    dynamic = {"items": per_event, "actions": per_event, "timestamps": per_event, "request_ids": per_event,
               "lengths": {0: batch}, "candidates": {0: batch, 1: candidates}, "request_time": {0: batch}}
    with torch.no_grad():
        program = torch.export.export(module, example_inputs(shapes, num_items, device), dynamic_shapes=dynamic)
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(out)))


def triton_config(name: str, device: torch.device) -> str:
    """The Triton Inference Server model configuration of an exported package."""
    dims = {"lengths": "[ -1 ]", "request_time": "[ -1 ]"}
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: TYPE_INT64 dims: {dims.get(n, "[ -1, -1 ]")} }}' for n in INPUTS)
    kind = "KIND_GPU" if device.type == "cuda" else "KIND_CPU"
    return (f'name: "{name}"\nplatform: "torch_aoti"\nmax_batch_size: 0\ninput [\n{inputs}\n]\n'
            f'output [\n  {{ name: "probabilities" data_type: TYPE_FP32 dims: [ -1, -1 ] }}\n]\n'
            f"instance_group [ {{ kind: {kind} }} ]\n")
