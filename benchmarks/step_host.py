"""Host time of a compiled training step on the fused backend, its Triton launches stubbed out (no GPU needed).

A short step (sparse DFGR at N = 1024 takes ~10 ms of GPU time on an H100) can be bound by the host
that queues it rather than by its kernels: then its wall time follows the host's speed and
whatever Python work the step does. This times, on the CPU, the step ``speed.py``'s train part
takes up to the optimizer (the batch's layout prepared by the model's plan, the ``torch.compile``'d
model's forward and backward; a GPU's fused AdamW is one launch, the CPU's a pass over every
weight that would swamp the rest) with the attention's Triton kernels replaced by no-ops, so two
trees' steps can be compared on one machine for host work alone. The model is small (d 32, 2 heads, 4
layers, 2 sequences) so the CPU's arithmetic stays a small, equal share of both; the CPU runs
inductor's C++ kernels synchronously, so a row is host work plus that arithmetic. On the CPU the
batch's sizes are read from host tensors (a GPU step reads the values its loader stored), so the
compiled graph breaks where a GPU step's does not: the same for every tree. Median over rounds of
each round's mean over 12 steps.

    python benchmarks/step_host.py     # -> results/step_host_cpu.{json,md}

Another tree (``PYTHONPATH=<tree>/src GENREC_COMMIT=<its commit> python benchmarks/step_host.py --out
DIR``) times the same steps for an A/B on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import report

ROOT = Path(__file__).resolve().parent.parent


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _steps(name: str, n: int, batch: int):
    """Forward and backward of ``name`` compiled, on three prepared host batches in turn, on the CPU."""
    from genrec.models import build_model
    from genrec.ops.triton.backend import triton_backend
    from speed import INFO, VARIANTS, prepared, synthetic_batch

    model_name, preset = VARIANTS.get(name, (name, {}))
    model_args = {"d_model": 32, "num_heads": 2, "num_layers": 4, "dropout": 0.0, "attention_backend": "reference",
                  "relative_bias": False, **preset}
    torch.manual_seed(0)
    model = build_model(model_name, model_args, INFO, n)
    for block in model.blocks:  # the fused backend, its launches stubbed (the CPU has no Triton driver)
        block.backend = triton_backend()
    data = [prepared(model, synthetic_batch(batch, n, seed, device="cpu", target_share=0.1))[0] for seed in range(3)]
    compiled = torch.compile(model)

    def step(i: int) -> None:
        model.zero_grad(set_to_none=True)
        compiled(data[i % 3])["loss"].backward()

    return step


def main(argv: list[str] | None = None) -> int:
    from genrec.ops.triton import hstu
    from speed import ATTENTION_KERNELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="hstu,dfgr_sparse")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=9, help="rounds of 12 steps; a row gives their median")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in ATTENTION_KERNELS:  # every Triton kernel of the fused attention
        setattr(hstu, name, _NoLaunch())
    steps = {name: _steps(name, args.n, batch=2) for name in args.models.split(",")}
    for step in steps.values():
        for i in range(6):  # compiles (a graph per batch shape) and warms up
            step(i)
    rounds = {name: [] for name in steps}
    for _ in range(args.rounds):  # the models in turn, so a burst of other load hits one round of each
        for name, step in steps.items():
            start = time.perf_counter()
            for i in range(12):
                step(i)
            rounds[name].append((time.perf_counter() - start) / 12 * 1e3)
    rows = [{"model": name, "n": args.n, "batch": 2, "step_ms": statistics.median(times), "step_ms_rounds": times}
            for name, times in rounds.items()]
    table = report.markdown_table(rows, ["model", "n", "batch", "step_ms"])
    meta = report.meta(["python", "benchmarks/step_host.py", *(argv if argv is not None else sys.argv[1:])])
    meta["device"] += ", Triton launches stubbed"
    report.write(Path(args.out) / "step_host_cpu", rows, table, meta, targets=[])  # no issue names one
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
