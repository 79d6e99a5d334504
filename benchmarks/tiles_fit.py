"""Does every tile table of the HSTU kernels fit a Hopper SM? Compiles the forward, dK/dV and dQ
kernels for each dtype x head dim (``KernelConfig.tiles``) with Triton's compiler for sm_90, on any
machine (no GPU needed: Triton ships ptxas), and reports the shared memory each asks, its compile
time and its cubin size.

Shared memory is decided by the compiler, not by a formula: float32 at head dim 128 once asked
262,676 bytes where an H100/H200 SM gives a block at most 232,448. Every kernel is compiled with the
bias on and the dual-flow rule, the variant with the most code. A fresh Triton cache is used, so the
compile times are those a first GPU run pays (float32's ``ieee`` matrix products compile to FMA
loops: minutes, not seconds).

    python benchmarks/tiles_fit.py      # -> results/tiles_fit_sm90.{json,md}
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import report

ROOT = Path(__file__).resolve().parent.parent
SHARED_LIMIT = {90: 232_448}  # bytes of shared memory one block may use (opt-in maximum)
_INTS = {"H", "LQ", "L", "Q_OFFSET", "NUM_POS", "NUM_TIME", "NUM_K"}  # upper-case kernel arguments, not pointers
_FLOATS = {"alpha", "scale"}
_FP32_POINTERS = {"DQ", "REL_POS", "REL_TIME", "D_REL_POS", "D_REL_TIME"}  # the rest: inputs' dtype or int32
_DATA_POINTERS = {"Q", "K", "V", "O", "DO", "DK", "DV"}


def signature(fn, dtype: str, constants: dict) -> dict[str, str]:
    """Triton's signature of a kernel: pointers by the tensors ``genrec.ops.triton.hstu`` passes."""
    def kind(name: str) -> str:
        if name in constants:
            return "constexpr"
        if name == "DQ_DESC":  # the dK/dV kernel's dQ buffer, [B*H, LQ, D] in blocks of one query tile
            return f"tensordesc<fp32[1, {constants['BLOCK_M']}, {constants['D']}]>"
        if name in _FLOATS:
            return "fp32"
        if name in _INTS or not name[0].isupper():
            return "i32"
        return "*fp32" if name in _FP32_POINTERS else f"*{dtype}" if name in _DATA_POINTERS else "*i32"
    return {name: kind(name) for name in fn.arg_names}


def compiled(fn, dtype: str, tile, constants: dict, capability: int, aligned: bool = False,
             odd_length: bool = False):
    """The kernel compiled for sm_``capability`` with ``tile`` and ``constants``. ``aligned``: as the
    JIT specialises a launch of genrec's tensors (pointers 16-byte aligned, strides and sizes
    multiples of 16), without which Triton emits narrow loads; ``odd_length``: but the layout's
    length (``L``, ``LQ``) not a multiple of 16, as a batch of sparse DFGR's layout (N + T tokens)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_m, block_n, warps, stages = tile
    constants = {**constants, "BLOCK_M": block_m, "BLOCK_N": block_n}
    sig = signature(fn, dtype, constants)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if aligned and name not in constants
             and (sig[name].startswith("*") or name.startswith("s_") or name == "NUM_TIME"
                  or (name in ("L", "LQ") and not odd_length))}
    return triton_compile(ASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def compile_kernel(fn, dtype: str, head_dim: int, tile, extra: dict, capability: int) -> dict:
    from genrec.ops.layout import RULE_IDS

    constants = dict(RULE=RULE_IDS["dual_flow"], PRECISION="ieee" if dtype == "fp32" else "tf32", D=head_dim,
                     **extra)
    if "HAS_BIAS" in fn.arg_names:  # the bias-gradient kernel always has it
        constants["HAS_BIAS"] = True
    start = time.perf_counter()
    kernel = compiled(fn, dtype, tile, constants, capability)
    seconds = time.perf_counter() - start
    return {"shared_bytes": kernel.metadata.shared, "compile_s": seconds, "cubin_bytes": len(kernel.asm["cubin"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capability", type=int, default=90, choices=sorted(SHARED_LIMIT))
    p.add_argument("--head-dims", default="32,64,128")
    p.add_argument("--note", default=None, help="appended to meta.device (e.g. a shared machine: compile times)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="genrec-tiles-fit-")  # read by Triton when it compiles
    import triton

    from genrec.ops.triton import hstu

    config, limit = hstu.KernelConfig(), SHARED_LIMIT[args.capability]
    rows = []
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for head_dim in (int(d) for d in args.head_dims.split(",")):
            fwd, bwd, dq = config.tiles(head_dim, torch_dtype)
            separate = config.separates_dq(head_dim)
            kernels = (("forward", hstu._hstu_fwd, fwd, {}),
                       ("dk_dv", hstu._hstu_bwd, bwd, {"DQ_ATOMIC": not separate,
                                                        **({"DQ_DESC": None} if separate else {})}),
                       ("bias_grad", hstu._hstu_bwd_rab, bwd, {"TIME_SLOTS": 32}),
                       *((("dq", hstu._hstu_bwd_dq, dq, {"BIAS_GRADS": True, "TIME_SLOTS": 32}),) if separate else ()),
                       *((("bias_grad_bands", hstu._hstu_bwd_rab_bands, bwd, {"TIME_SLOTS": 32}),)
                         if head_dim <= hstu.BAND_MAX_DIM else ()))
            for name, fn, tile, extra in kernels:
                row = {"dtype": dtype, "head_dim": head_dim, "kernel": name, "tile": list(tile),
                       **compile_kernel(fn, dtype, head_dim, tile, extra, args.capability)}
                row["fits"] = row["shared_bytes"] <= limit
                rows.append(row)
                print(row, flush=True)
    worst = max(rows, key=lambda r: r["shared_bytes"])
    targets = [{"name": "shared_bytes_max", "value": worst["shared_bytes"], "op": "<=", "target": limit,
                "met": worst["shared_bytes"] <= limit,
                "rows": f"every kernel x dtype x head dim (largest: {worst['kernel']} {worst['dtype']} "
                        f"d{worst['head_dim']})"}]
    text = report.markdown_table(rows, ["dtype", "head_dim", "kernel", "tile", "shared_bytes", "fits", "compile_s",
                                        "cubin_bytes"])
    text += f"\nShared memory per block on sm_{args.capability}: at most {limit:,} bytes.\n"
    note = f"; {args.note}" if args.note else ""
    meta = report.meta(device=f"Triton {triton.__version__} compiler for sm_{args.capability} on the CPU "
                              f"(no GPU{note})")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"tiles_fit_sm{args.capability}"
    report.write(out, rows, text, meta, targets=targets)
    print(f"shared_bytes_max {worst['shared_bytes']} <= {limit}: {'met' if targets[0]['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
