"""Pick the tile shapes of the fused HSTU attention kernels on this GPU.

Times the forward kernel and forward+backward for a set of (BLOCK_M, BLOCK_N, warps, stages) and
both dQ strategies (fp32 atomics in the dK/dV kernel, or a separate dQ kernel), causal, bf16, 4 heads,
head dim 128, 131,072 tokens per batch, at each N; keeps the configuration with the least summed
time over the N. Writes ``benchmarks/results/hstu_tiles_<device>.json`` (read by
``benchmarks/speed.py --tiles``) and prints the table.

    python benchmarks/tune_hstu_kernel.py [--ns 1024,8192] [--parts fwd]   # fwd: hstu_tuning_fwd_<device>
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import torch
import triton

import report

ROOT = Path(__file__).resolve().parent.parent
FWD = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
       (64, 128, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 64, 8, 3), (128, 128, 8, 4), (64, 32, 4, 3)]
BWD = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 1)]  # square, >= 64: the
# position-bias gradient's reduction needs them
DQ = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3)]


def main(argv: list[str] | None = None) -> int:
    from genrec.ops.triton import hstu
    from speed import _kernel_layout, bench_ms

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ns", default="1024,8192")
    parser.add_argument("--parts", default="fwd,bwd", help="fwd: forward tiles only; bwd: also the backward's")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    heads, dim, tokens = 4, 128, 131_072
    cases = []
    for n in (int(x) for x in args.ns.split(",")):
        batch = tokens // n
        q, k, v, do = (torch.randn(batch, n, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                       for _ in range(4))
        cases.append((n, [t.requires_grad_() for t in (q, k, v)], do, _kernel_layout(batch, n, "causal")[0]))

    def timed(fn) -> float:
        try:
            return bench_ms(fn, 50, 200)
        except triton.runtime.errors.OutOfResources:  # tiles too large for shared memory: not a candidate
            return float("inf")

    def fwd_ms(config, n, leaves, do, layout):
        return timed(lambda: hstu.hstu_attention(*leaves, layout, None, None, 1.0 / n, config=config))

    def both_ms(config, n, leaves, do, layout):
        return timed(lambda: torch.autograd.grad(
            hstu.hstu_attention(*leaves, layout, None, None, 1.0 / n, config=config), leaves, do))

    rows = []
    for tiles in FWD:
        config = hstu.KernelConfig(fwd_large=tiles)
        rows.append({"part": "fwd", "tiles": str(tiles), "dq": "",
                     **{f"n{c[0]}_ms": fwd_ms(config, *c) for c in cases}})
        print(rows[-1], flush=True)
    best_fwd = min((r for r in rows if r["part"] == "fwd"), key=lambda r: sum(r[f"n{c[0]}_ms"] for c in cases))
    fwd_large = ast.literal_eval(best_fwd["tiles"])
    for separate in (False, True) if "bwd" in args.parts.split(",") else ():
        for tiles in BWD:
            for dq in DQ if separate else [None]:
                config = hstu.KernelConfig(fwd_large=fwd_large, bwd_large=tiles,
                                           dq_large=dq or hstu.DEFAULT_CONFIG.dq_large, dq_separate=separate)
                rows.append({"part": "fwd+bwd", "tiles": str(tiles), "dq": str(dq) if dq else "atomic",
                             **{f"n{c[0]}_ms": both_ms(config, *c) for c in cases}})
                print(rows[-1], flush=True)
    default = hstu.DEFAULT_CONFIG
    choice = {"fwd": fwd_large, "bwd": default.bwd_large, "dq": default.dq_large if default.dq_separate else None}
    if "bwd" in args.parts.split(","):
        best_bwd = min((r for r in rows if r["part"] == "fwd+bwd"), key=lambda r: sum(r[f"n{c[0]}_ms"] for c in cases))
        choice |= {"bwd": ast.literal_eval(best_bwd["tiles"]),
                   "dq": None if best_bwd["dq"] == "atomic" else ast.literal_eval(best_bwd["dq"])}
    device = torch.cuda.get_device_name().replace(" ", "_")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"hstu_tiles_{device}.json").write_text(json.dumps(choice) + "\n")
    table = report.markdown_table(rows, ["part", "tiles", "dq", *[f"n{c[0]}_ms" for c in cases]])
    meta = report.meta(["python", "benchmarks/tune_hstu_kernel.py", *(argv if argv is not None else sys.argv[1:])])
    name = "hstu_tuning" if "bwd" in args.parts.split(",") else "hstu_tuning_fwd"
    report.write(Path(args.out) / f"{name}_{device}", rows, table, meta)
    print(table, "\nchosen:", choice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
