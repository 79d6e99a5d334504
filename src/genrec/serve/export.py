"""``genrec export``: a trained ranker's candidate scoring as an AOTInductor package (``model.pt2``).

``torch.export`` traces :class:`CandidateScoring` — padded histories and candidates in, one
probability per candidate out — and ``torch._inductor.aoti_compile_and_package`` compiles it to a
shared library inside the ``.pt2`` archive, which C++ (``AOTIModelPackageLoader``) or Python
(``torch._inductor.aoti_load_package``) runs without the model's Python code. Triton Inference
Server's PyTorch backend loads such packages under ``platform: "torch_aoti"``; :func:`triton_config`
writes the ``config.pbtxt`` that describes the inputs and outputs.

History length, candidates per request and batch size are dynamic dimensions, within the bounds
given at export time.

:func:`export` checks the package before it returns: a fresh Python process loads it and scores two
shapes other than the traced one, which must equal the eager model's scores (:func:`package_scores`).
A fresh process, not this one, because loading runs native code (the package's shared library,
AOTInductor's loader): a crash there becomes a :class:`PackageError` that names the signal and the
torch version instead of ending the caller, and the check sees the package as a serving process
(Triton, a C++ runner) does, without the exporting process's compiler state. (On the GPU machines'
torch 2.11 ``aoti_load_package`` dies with SIGSEGV on any CPU package, a bare ``nn.Linear``'s too, in
the compiling process and in a fresh one; there this check reports it and the exporter goes on.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
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


def check_shapes(shapes: ExportShapes) -> list[ExportShapes]:
    """Two shapes inside the bounds and unlike the traced example: a larger one and the smallest."""
    larger = ExportShapes(batch=min(shapes.max_batch, shapes.batch + 1),
                          history=min(shapes.max_history, 2 * shapes.history + 1),
                          candidates=min(shapes.max_candidates, shapes.candidates + 3))
    return [larger, ExportShapes(batch=1, history=3, candidates=1)]


class PackageError(RuntimeError):
    """A written package that does not load, or does not give the eager model's scores."""


# The fresh process of package_scores: torch only (no genrec import), inputs and scores through files.
_SCORE_IN_FRESH_PROCESS = """
import sys, torch
job = torch.load(sys.argv[1], weights_only=True)
device = torch.device(job["device"])
loaded = torch._inductor.aoti_load_package(job["package"])
with torch.no_grad():
    scores = [loaded(*[t.to(device) for t in case]).cpu() for case in job["cases"]]
torch.save(scores, sys.argv[2])
"""


def exit_reason(returncode: int) -> str:
    """``killed by SIGSEGV`` for a negative (signal) return code, else ``exit code N``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def package_scores(package: Path, cases: list[tuple[torch.Tensor, ...]], device: torch.device,
                   timeout_s: float = 600.0) -> list[torch.Tensor]:
    """P(label) ``[B, M]`` for each case (the :data:`INPUTS` tensors) from ``package``, loaded and run
    on ``device`` by a fresh Python process (see the module docstring for why)."""
    with tempfile.TemporaryDirectory(prefix="genrec-export-check-") as tmp:
        job, out = Path(tmp) / "job.pt", Path(tmp) / "scores.pt"
        torch.save({"package": str(package), "device": str(device),
                    "cases": [[t.cpu() for t in case] for case in cases]}, job)
        try:
            proc = subprocess.run([sys.executable, "-c", _SCORE_IN_FRESH_PROCESS, str(job), str(out)],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise PackageError(f"{package}: loading and scoring it in a fresh process took over {timeout_s:.0f} s "
                               f"(torch {torch.__version__})") from err
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            tail = lines[-1] if lines and proc.returncode > 0 else ""  # the exception; a signal says enough
            raise PackageError(f"{package}: loading and scoring it in a fresh process failed: "
                               f"{exit_reason(proc.returncode)}, torch {torch.__version__}"
                               f"{': ' + tail if tail else ''}")
        return torch.load(out, weights_only=True)


def check_package(package: Path, module: CandidateScoring, shapes: ExportShapes, num_items: int,
                  device: torch.device) -> float:
    """The largest score difference between ``package`` (in a fresh process) and ``module`` (eager)
    over :func:`check_shapes`; a :class:`PackageError` if it does not load or differs by more than
    1e-5 (2e-2 for a half-precision model)."""
    cases = [example_inputs(s, num_items, device) for s in check_shapes(shapes)]
    got = package_scores(package, cases, device)
    with torch.no_grad():
        want = [module(*case).cpu() for case in cases]
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
    low_precision = next(module.parameters()).dtype in (torch.float16, torch.bfloat16)
    if not diff <= (2e-2 if low_precision else 1e-5):
        raise PackageError(f"{package}: its scores differ from the eager model's by {diff:.3g} "
                           f"(torch {torch.__version__})")
    return diff


def export(model: RecModel, out: str | os.PathLike, num_items: int, shapes: ExportShapes | None = None,
           device: torch.device | None = None) -> Path:
    """Trace, compile and package the model's candidate scoring to ``out`` (a ``.pt2`` file), then
    :func:`check_package` it."""
    out, shapes, device = Path(out), shapes or ExportShapes(), device or torch.device("cpu")
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
        package = Path(torch._inductor.aoti_compile_and_package(program, package_path=str(out)))
    check_package(package, module, shapes, num_items, device)
    return package


def triton_config(name: str, device: torch.device) -> str:
    """The Triton Inference Server model configuration of an exported package."""
    dims = {"lengths": "[ -1 ]", "request_time": "[ -1 ]"}
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: TYPE_INT64 dims: {dims.get(n, "[ -1, -1 ]")} }}' for n in INPUTS)
    kind = "KIND_GPU" if device.type == "cuda" else "KIND_CPU"
    return (f'name: "{name}"\nplatform: "torch_aoti"\nmax_batch_size: 0\ninput [\n{inputs}\n]\n'
            f'output [\n  {{ name: "probabilities" data_type: TYPE_FP32 dims: [ -1, -1 ] }}\n]\n'
            f"instance_group [ {{ kind: {kind} }} ]\n")
