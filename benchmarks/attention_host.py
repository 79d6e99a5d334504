"""Host time of one call of the fused HSTU attention, its kernel launches stubbed out (no GPU needed).

What the Python side of :func:`genrec.ops.triton.hstu.hstu_attention` costs per call: the plan
lookups, the custom op's dispatch and, with gradients, its autograd wrapper and the backward op.
A step of a short sequence can take less time on the GPU than the host needs to issue it (eager
training of sparse DFGR at N = 1024: docs/gpu-performance-log.md), so this time is a floor of the eager
step. The Triton launches are replaced by no-ops, so the numbers leave out Triton's launcher; the
tensors are small (one head of dim 16) so that allocating the gradients costs little on the CPU.
Sparse DFGR's training layout at N = 1024, 32 sequences, targets the last 10 %, without and with
the relative bias; on one thread, the median over 7 rounds of each round's median of 100 calls
(the rounds interleave the cases, and each row keeps its rounds: ``*_rounds``).

    python benchmarks/attention_host.py     # -> results/attention_host_cpu.{json,md}

Another tree's op (``PYTHONPATH=<tree>/src GENREC_COMMIT=<its commit> python benchmarks/attention_host.py
--out DIR``) times the same calls for an A/B on one machine.
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


def stub_launches():
    """Replace every Triton kernel of the fused attention with a no-op (this process's genrec, on
    ``PYTHONPATH``); returns its module."""
    from genrec.ops.triton import hstu
    from speed import ATTENTION_KERNELS

    torch.set_num_threads(1)
    for name in ATTENTION_KERNELS:
        setattr(hstu, name, _NoLaunch())
    return hstu


def write_stubbed(script: str, stem: str, rows: list[dict], table: str, argv: list[str] | None, out: str) -> None:
    """``<out>/<stem>.{json,md}`` of ``benchmarks/<script>`` run with the launches stubbed (a
    diagnostic: no issue names a target for it)."""
    meta = report.meta(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])
    meta["device"] += ", Triton launches stubbed"
    report.write(Path(out) / stem, rows, table, meta, targets=[])
    print(table)


def _median_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _timings(hstu, layout, n: int, bias: bool) -> dict:
    """One case's three calls by column: a forward without and with gradients, a forward + backward."""
    shape = (32, 1, layout.valid.shape[1], 16)  # [B, H, L, Dh]: one small head
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    tables = tuple(torch.zeros(1, slots, requires_grad=True) for slots in (n + 1, 32)) if bias else (None, None)
    leaves = [q, k, v, *(tables if bias else ())]
    grad_out = torch.randn(shape)

    def call() -> torch.Tensor:
        return hstu.hstu_attention(q, k, v, layout, *tables, 0.01)

    def no_grad() -> torch.Tensor:
        with torch.no_grad():
            return call()

    call()  # the first call builds and caches the layout's plan
    return {"fwd_no_grad_us": no_grad, "fwd_with_grad_us": call,
            "fwd_bwd_us": lambda: torch.autograd.grad(call(), leaves, grad_out)}


def main(argv: list[str] | None = None) -> int:
    from genrec.nn.events import Events
    from speed import TRAIN_LAYOUTS, synthetic_batch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="calls per round: a round's time is their median")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; a row gives the median of its rounds")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    hstu = stub_launches()
    n = 1024
    layout = TRAIN_LAYOUTS["dfgr_sparse"](Events.from_batch(synthetic_batch(32, n, 0, device="cpu", target_share=0.1)))
    cases = {bias: _timings(hstu, layout, n, bias) for bias in (False, True)}
    rounds = {(bias, column): [] for bias, calls in cases.items() for column in calls}
    for _ in range(args.rounds):  # every case and call in turn, so a burst of other load hits one round of each
        for (bias, column), medians in rounds.items():
            medians.append(_median_us(cases[bias][column], args.calls))
    rows = [{"layout": "dfgr_sparse", "n": n, "bias": bias,
             **{column: statistics.median(rounds[bias, column]) for column in calls},
             **{f"{column}_rounds": rounds[bias, column] for column in calls}} for bias, calls in cases.items()]
    table = report.markdown_table(rows, ["layout", "n", "bias", "fwd_no_grad_us", "fwd_with_grad_us", "fwd_bwd_us"])
    write_stubbed("attention_host.py", "attention_host_cpu", rows, table, argv, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
