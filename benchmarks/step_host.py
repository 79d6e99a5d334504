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
    python benchmarks/step_host.py --trees before=/tmp/old/src,after=src --processes 4

``--trees`` times each tree's own ``genrec`` (its ``src`` on ``PYTHONPATH``) in turn, ``--processes``
fresh processes each, alternating: the same tree's step moves by a millisecond or two from one
process to the next (what each compiles and allocates), more than within one, so an A/B compares
the medians over processes (``step_ms``; ``step_ms_processes`` each process's median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import report
from attention_host import stub_launches, write_stubbed

ROOT = Path(__file__).resolve().parent.parent


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


def _measure(args) -> list[dict]:
    """This process's rows: per model, the median over ``args.rounds`` rounds of 12 steps."""
    stub_launches()
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
    return [{"model": name, "n": args.n, "batch": 2, "step_ms": statistics.median(times), "step_ms_rounds": times}
            for name, times in rounds.items()]


def _trees(args) -> list[dict]:
    """Each tree of ``--trees`` timed in ``--processes`` fresh processes, the trees alternating; per tree
    and model the median over its processes."""
    trees = dict(part.split("=", 1) for part in args.trees.split(","))
    runs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            for tree, path in trees.items():
                out = Path(tmp) / f"{tree}{i}"
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(path).resolve()),
                                                                     os.environ.get("PYTHONPATH", "")])}
                subprocess.run([sys.executable, __file__, "--models", args.models, "--n", str(args.n), "--rounds",
                                str(args.rounds), "--out", str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
                for row in json.loads((out / "step_host_cpu.json").read_text())["rows"]:
                    runs.setdefault((tree, row["model"]), []).append(row["step_ms"])
    return [{"tree": tree, "path": trees[tree], "model": model, "n": args.n, "batch": 2,
             "step_ms": statistics.median(times), "step_ms_processes": times} for (tree, model), times in runs.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="hstu,dfgr_sparse")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=9, help="rounds of 12 steps; a process's row: their median")
    parser.add_argument("--trees", help="name=path of a tree's src, comma-separated: an A/B of their genrec")
    parser.add_argument("--processes", type=int, default=4, help="with --trees: processes per tree")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    rows = _trees(args) if args.trees else _measure(args)
    columns = ["model", "n", "batch", "step_ms"]
    table = report.markdown_table(rows, ["tree", "path", *columns] if args.trees else columns)
    write_stubbed("step_host.py", "step_host_cpu", rows, table, argv, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
