"""Pick the tile shapes of the fused HSTU attention kernels on this GPU.

Times the forward kernel and forward+backward for a set of (BLOCK_M, BLOCK_N, warps, stages) and
the dQ strategies, bf16, at each N; keeps the configuration with the least summed time over every
case (N x layout x bias). Two shape families, one per field family of ``KernelConfig``:

* ``--head-dim 128`` (default): the ``*_large`` tiles, on the kernel rows' shapes of
  benchmarks/speed.py (4 heads, 131,072 tokens per batch, equal-length causal sequences);
* ``--head-dim 64 --heads 8 --tokens 32768 --layouts hstu,dfgr,dfgr_sparse --bias 0,1``: the small
  tiles (head dims below 128), on what a training step of speed.py's train part runs (d 512,
  8 heads; the token layouts of HSTU, DFGR and DFGR with the targets' fake flow, targets the last
  10 % of events, with and without the models' relative bias: ``N + 1`` position slots, 32 time
  buckets).

Each family sweeps both dQ strategies (dQ in the dK/dV kernel by TMA bulk reductions, or a separate
dQ kernel: its flag, ``dq_separate`` or ``dq_separate_small``).

Writes ``benchmarks/results/hstu_tiles[_d<dim>][_graphs]_<device>.json`` (read by ``speed.py
--tiles``) and ``hstu_tuning[_fwd][_d<dim>][_graphs]_<device>.{json,md}``, and prints the table; the
row of the current ``DEFAULT_CONFIG`` is among the candidates, so the table is its A/B. Calls are
timed back to back (``triton.testing.do_bench``): a call shorter than the host's work to issue it
(the training shapes at N = 1024) then times the host; ``--graphs`` replays them from a CUDA graph.

    python benchmarks/tune_hstu_kernel.py [--ns 1024,8192] [--parts fwd]   # fwd: forward tiles only
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

import report

ROOT = Path(__file__).resolve().parent.parent
FWD = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
       (64, 128, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 64, 8, 3), (128, 128, 8, 4), (64, 32, 4, 3)]
BWD = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 1)]  # square, >= 64: the
# position-bias gradient's reduction needs them
DQ = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3)]
KERNEL_LAYOUTS = ("causal", "dual_flow")  # speed.py's kernel rows: equal-length, one event per request


def _cases(args) -> list[tuple[str, list, torch.Tensor, object, tuple | None]]:
    """``(name, [q, k, v], dO, layout, (rel_pos, rel_time) or None)`` per N x layout x bias."""
    from genrec.nn.events import Events
    from speed import TRAIN_LAYOUTS, _kernel_layout, synthetic_batch

    cases = []
    for n in (int(x) for x in args.ns.split(",")):
        batch = max(args.tokens // n, 1)
        for name in args.layouts.split(","):
            if name in KERNEL_LAYOUTS:
                layout = _kernel_layout(batch, n, name)[0]
            elif name in TRAIN_LAYOUTS:
                layout = TRAIN_LAYOUTS[name](Events.from_batch(synthetic_batch(batch, n, 0, target_share=0.1)))
            else:
                raise SystemExit(f"--layouts: unknown layout {name!r} (one of {KERNEL_LAYOUTS + tuple(TRAIN_LAYOUTS)})")
            length = layout.valid.shape[1]
            q, k, v, do = (torch.randn(batch, length, args.heads, args.head_dim, device="cuda",
                                       dtype=torch.bfloat16).transpose(1, 2) for _ in range(4))
            for bias in (int(b) for b in args.bias.split(",")):
                tables = tuple((torch.randn(args.heads, slots, device="cuda") * 0.1).requires_grad_()
                               for slots in (n + 1, 32)) if bias else None
                cases.append((f"{name}{'_rab' if bias else ''}_n{n}", [t.requires_grad_() for t in (q, k, v)], do,
                              layout, tables))
    return cases


def main(argv: list[str] | None = None) -> int:
    from genrec.ops.triton import hstu
    from speed import bench_ms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", default="1024,8192")
    parser.add_argument("--parts", default="fwd,bwd", help="fwd: forward tiles only; bwd: also the backward's")
    parser.add_argument("--head-dim", type=int, default=128, choices=(32, 64, 128))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=131_072, help="events per batch (a layout may hold more tokens)")
    parser.add_argument("--layouts", default="causal",
                        help="comma list: causal, dual_flow (kernel rows) or hstu, dfgr, dfgr_sparse (training)")
    parser.add_argument("--bias", default="0", help="0, 1 or 0,1: without / with the relative bias tables")
    parser.add_argument("--graphs", action="store_true",
                        help="time each call replayed from a CUDA graph (triton.testing.do_bench_cudagraph): "
                        "the kernels alone, where a call is shorter than the host's work to issue it")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    large = args.head_dim >= 128
    field = (lambda part: f"{part}_large") if large else (lambda part: part)  # the KernelConfig fields tuned
    default = hstu.DEFAULT_CONFIG
    cases = _cases(args)
    columns = [f"{c[0]}_ms" for c in cases]

    def timed(fn) -> float:
        try:
            if args.graphs:
                return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            return bench_ms(fn, 50, 200)
        except triton.runtime.errors.OutOfResources:  # tiles too large for shared memory: not a candidate
            return float("inf")

    def case_fn(config, backward: bool, leaves: list, do: torch.Tensor, layout, tables: tuple | None):
        """One case's call: the forward, or forward + backward (the bias tables' gradients too)."""
        def forward():
            return hstu.hstu_attention(*leaves, layout, *(tables or (None, None)), 1.0 / layout.valid.shape[1],
                                       config=config)
        return (lambda: torch.autograd.grad(forward(), [*leaves, *(tables or ())], do)) if backward else forward

    def row(part: str, tiles, dq: str, config, backward: bool) -> dict:
        out = {"part": part, "tiles": str(tiles), "dq": dq}
        for name, *case in cases:
            out[f"{name}_ms"] = timed(case_fn(config, backward, *case))
        print(out, flush=True)
        return out

    total = lambda r: sum(r[c] for c in columns)  # noqa: E731
    rows = [row("fwd", tiles, "", dataclasses.replace(default, **{field("fwd"): tiles}), False) for tiles in FWD]
    fwd = ast.literal_eval(min(rows, key=total)["tiles"])
    choice = {"fwd": fwd, "bwd": getattr(default, field("bwd")),
              "dq": getattr(default, field("dq")) if default.separates_dq(args.head_dim) else None}
    if "bwd" in args.parts.split(","):
        for separate in (False, True):
            for tiles in BWD:
                for dq in DQ if separate else [None]:
                    config = dataclasses.replace(default.with_dq_separate(args.head_dim, separate), **{
                        field("fwd"): fwd, field("bwd"): tiles, field("dq"): dq or getattr(default, field("dq"))})
                    rows.append(row("fwd+bwd", tiles, str(dq) if dq else "atomic", config, True))
        best = min((r for r in rows if r["part"] == "fwd+bwd"), key=total)
        choice |= {"bwd": ast.literal_eval(best["tiles"]),
                   "dq": None if best["dq"] == "atomic" else ast.literal_eval(best["dq"])}
    device = torch.cuda.get_device_name().replace(" ", "_")
    suffix = ("" if args.head_dim == 128 else f"_d{args.head_dim}") + ("_graphs" if args.graphs else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hstu_tiles{suffix}_{device}.json").write_text(json.dumps(choice | {"head_dim": args.head_dim}) + "\n")
    for r in rows:
        r["total_ms"] = total(r)
    table = report.markdown_table(rows, ["part", "tiles", "dq", *columns, "total_ms"])
    meta = report.meta(["python", "benchmarks/tune_hstu_kernel.py", *(argv if argv is not None else sys.argv[1:])])
    meta["default"] = {part: getattr(default, field(part)) for part in ("fwd", "bwd", "dq")} | {
        "dq_separate": default.separates_dq(args.head_dim)}
    name = "hstu_tuning" if "bwd" in args.parts.split(",") else "hstu_tuning_fwd"
    report.write(out / f"{name}{suffix}_{device}", rows, table, meta, targets=[])  # no issue names one
    print(table, "\nchosen:", choice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
