"""What the HSTU kernels' hot loops execute, from their sm_90 machine code compiled on the CPU (no GPU).

Each of the four kernels (forward, dK/dV, bias gradients, dQ) is compiled with the relative bias,
bf16, head dim 128 and the causal rule, as the JIT compiles it at run time (pointers 16-byte
aligned, strides and sizes multiples of 16: without that specialisation Triton emits 2-byte
loads, and the counts mislead). Its SASS, dumped with the ``cuobjdump`` Triton ships, is cut into
loops at its backward branches, and each loop's instruction mix is counted: barriers and
shared-memory stores and loads (a tensor whose layout Triton converts inside the loop goes
through shared memory), global loads, matrix instructions, conversions, register spills. The
kernels with the bias run two loops per program, the simple tile pairs' and the others'
(:func:`genrec.ops.triton.tiles.tile_lists`); a nested loop (the bias-gradient kernel's over time
buckets) is a row of its own and counted in its outer loop too. Static counts: a loop's branches
are all counted, whichever runs. They depend on the Triton version: the GPU machines run 3.6
(``pip install --target DIR triton==3.6.0`` and ``PYTHONPATH=DIR`` to match). No target: a tool to
look before spending device time.

    python benchmarks/kernel_loops.py     # -> results/kernel_loops_sm90.{json,md}
    python benchmarks/kernel_loops.py --head-dim 64 --no-bias --rules request_causal,dual_flow --odd-length
    # -> results/kernel_loops_d64_nobias_sm90.{json,md}: training's head dim, HSTU's and DFGR's rules,
    #    each also with a layout length that is not a multiple of 16 (sparse DFGR's N + T tokens)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import report
import tiles_fit

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("BAR", "STS", "LDS", "LDG", "HGMMA", "MUFU", "I2FP", "FADD", "LEA", "IMAD", "VIMNMX", "STL", "LDL")
_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"BRA\s+(?:\S+,\s*)?0x([0-9a-f]+)")


def sass(cubin: bytes) -> tuple[str, str]:
    """The machine code and resource usage (registers, stack) of a cubin, by Triton's cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return tuple(subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout
                     for flag in ("-sass", "-res-usage"))


def loops(code: str) -> list[Counter]:
    """Each loop's instructions by opcode (its first name before a dot), in address order."""
    rows = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, code.splitlines()) if m]
    out = []
    for address, text in rows:
        branch = _BRANCH.search(text)
        if branch and int(branch.group(1), 16) < address:
            start = int(branch.group(1), 16)
            out.append(Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                               for a, t in rows if start <= a <= address))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--head-dim", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--no-bias", action="store_true", help="the kernels without the relative bias")
    p.add_argument("--rules", default="causal", help="comma list of mask rules")
    p.add_argument("--odd-length", action="store_true",
                   help="also each kernel with the layout length (L, LQ) not a multiple of 16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="genrec-kernel-loops-")
    from genrec.ops.layout import RULE_IDS
    from genrec.ops.triton import hstu

    bias = not args.no_bias
    fwd, bwd, dq = hstu.KernelConfig().tiles(args.head_dim)
    kernels = (("forward", hstu._hstu_fwd, fwd, {"HAS_BIAS": bias}),
               ("dk_dv", hstu._hstu_bwd, bwd, {"HAS_BIAS": bias, "DQ_ATOMIC": False, "DQ_DESC": None}),
               *([("bias_grad", hstu._hstu_bwd_rab, bwd, {"TIME_SLOTS": 32})] if bias else []),
               ("dq", hstu._hstu_bwd_dq, dq, {"HAS_BIAS": bias, "BIAS_GRADS": bias, "TIME_SLOTS": 32}))
    rows = []
    for rule in args.rules.split(","):
        for odd in (False, True) if args.odd_length else (False,):
            for name, fn, tile, extra in kernels:
                constants = dict(RULE=RULE_IDS[rule], PRECISION="tf32", D=args.head_dim, **extra)
                kernel = tiles_fit.compiled(fn, "bf16", tile, constants, args.capability, aligned=True, odd_length=odd)
                code, usage = sass(kernel.asm["cubin"])
                registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
                for i, ops in enumerate(loops(code)):
                    rows.append({"kernel": name, "rule": rule, "length": "odd" if odd else "multiple of 16", "loop": i,
                                 "registers": registers, "stack_bytes": stack, "instructions": sum(ops.values()),
                                 **{op.lower(): ops[op] for op in COLUMNS}})
                    print(rows[-1], flush=True)
    import triton

    text = report.markdown_table(rows, ["kernel", "rule", "length", "loop", "registers", "stack_bytes", "instructions",
                                        *(op.lower() for op in COLUMNS)])
    text += (f"\nStatic counts per loop iteration and thread, every branch of the loop counted; bf16, head dim "
             f"{args.head_dim}, {'with' if bias else 'without'} the bias. `length`: whether the layout length "
             "(L, LQ) is specialised as a multiple of 16. `bar`: barriers, `sts`/`lds`: shared memory, "
             "`stl`/`ldl`: spills.\n")
    meta = report.meta(device=f"Triton {triton.__version__} compiler for sm_{args.capability} on the CPU (no GPU)")
    suffix = ("" if args.head_dim == 128 else f"_d{args.head_dim}") + ("_nobias" if args.no_bias else "")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"kernel_loops{suffix}_sm{args.capability}"
    report.write(out, rows, text, meta, targets=[])
    return 0


if __name__ == "__main__":
    sys.exit(main())
