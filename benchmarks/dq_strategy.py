"""The fused HSTU attention's two dQ strategies side by side on a GPU, forward + backward ms: dQ by its
own kernel (``separate``: seven matrix products per tile pair, no atomics) against dQ in the dK/dV
kernel (``tma``: five products, each pair's dQ tile added by one TMA bulk reduction), per head-dim
family (:meth:`genrec.ops.triton.hstu.KernelConfig.separates_dq` picks one for each).

Kernel rows (bf16, 4 heads x 128, 131,072 tokens, no bias; cuDNN SDPA beside the causal ones) and the
training steps' layouts at head dim 64 (8 heads, 32,768 events, targets the last 10 %), with and
without the relative bias. Each ``tma`` row's gradients are checked against the separate kernel's
(``max_rel_err``, the largest of dQ, dK, dV and the tables' over each tensor's largest value).

    python benchmarks/dq_strategy.py     # -> results/dq_strategy_<GPU>.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import report
import tune_hstu_kernel
from speed import bench_ms

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {  # head dim: (cases, dK/dV tiles the tma strategy is timed with)
    128: (dict(layouts="causal,dual_flow", heads=4, tokens=131_072, bias="0"), [(64, 128, 8, 2)]),
    64: (dict(layouts="hstu,dfgr_sparse", heads=8, tokens=32_768, bias="0,1"), [(64, 64, 4, 2)]),
}


def rows_of(head_dim: int, ns: str) -> list[dict]:
    from genrec.ops.triton import hstu

    case_args, tiles = FAMILIES[head_dim]
    args = types.SimpleNamespace(ns=ns, head_dim=head_dim, **case_args)
    separate = hstu.DEFAULT_CONFIG.with_dq_separate(head_dim, True)
    rows = []
    for name, leaves, do, layout, tables in tune_hstu_kernel._cases(args):
        def call(config, leaves=leaves, do=do, layout=layout, tables=tables):
            out = hstu.hstu_attention(*leaves, layout, *(tables or (None, None)), 1.0 / layout.valid.shape[1],
                                      config=config)
            return torch.autograd.grad(out, [*leaves, *(tables or ())], do)

        shape = {"case": name, "head_dim": head_dim, "bias": tables is not None, "n": int(name.rsplit("_n", 1)[1])}
        want = call(separate)
        bwd = separate.tiles(head_dim)[1]
        timed = bench_ms(lambda: call(separate), 50, 200)
        rows.append(shape | {"strategy": "separate", "bwd_tile": str(bwd), "fwd_bwd_ms": timed})
        for tile in tiles:
            config = dataclasses.replace(separate.with_dq_separate(head_dim, False),
                                         **{"bwd_large" if head_dim >= 128 else "bwd": tile})
            got = call(config)
            err = max(float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-12))
                      for g, w in zip(got, want, strict=True))
            rows.append(shape | {"strategy": "tma", "bwd_tile": str(tile), "max_rel_err": err,
                                 "fwd_bwd_ms": bench_ms(lambda config=config: call(config), 50, 200)})
        if name.startswith("causal_n"):
            b, h, n, d = leaves[0].shape
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            grad = torch.randn_like(q)

            def sdpa(q=q, k=k, v=v, grad=grad):
                return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], grad)

            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                rows.append(shape | {"strategy": "sdpa_cudnn", "bwd_tile": "", "fwd_bwd_ms": bench_ms(sdpa, 50, 200)})
        for r in rows[-(len(tiles) + 1 + name.startswith("causal_n")):]:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per case: each strategy's ms and the fastest tma over separate."""
    cases: dict[str, dict] = {}
    for r in rows:
        line = cases.setdefault(r["case"] + f"_d{r['head_dim']}", {"case": r["case"], "head_dim": r["head_dim"]})
        line[f"{r['strategy']} {r['bwd_tile']}".strip()] = r["fwd_bwd_ms"]
    for line in cases.values():
        tma = [v for k, v in line.items() if k.startswith("tma")]
        line["best_tma_over_separate"] = min(tma) / line[next(k for k in line if k.startswith("separate"))]
    names = list(dict.fromkeys(k for line in cases.values() for k in line))
    columns = [*(c for c in names if c != "best_tma_over_separate"), "best_tma_over_separate"]
    return ("Forward + backward ms (bf16). `tma`: dQ in the dK/dV kernel by TMA bulk reductions, with that dK/dV "
            "tile; `separate`: the dQ kernel, with the default tiles.\n\n"
            + report.markdown_table(list(cases.values()), columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--ns", default="1024,4096,8192")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = [r for d in (int(x) for x in args.head_dims.split(",")) for r in rows_of(d, args.ns)]
    device = torch.cuda.get_device_name()
    report.write(Path(args.out) / f"dq_strategy_{device.replace(' ', '_')}", rows, markdown(rows), report.meta(),
                 targets=[])  # no issue names a target for it
    return 0


if __name__ == "__main__":
    sys.exit(main())
