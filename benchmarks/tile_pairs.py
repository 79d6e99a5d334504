"""The fused attention's time per tile pair in the speed file's profiled training rows (no GPU needed).

A training row of ``benchmarks/speed.py --train-profile`` holds the attention kernels' times per step
(``attention_fwd_ms``, ``attention_dkdv_ms``, ``attention_dq_ms``, ``bias_grad_ms``); this counts, on
the CPU, the tile pairs those kernels visit on the same synthetic batches (the same seeded
``synthetic_batch``, the same token layout and the tiles of the row's head dim) and divides. If the
sparse fake flow of DFGR took HSTU's time per pair, its attention would be HSTU's times its share
of the pairs; where it takes longer, that, not the pair count, holds its training ratio down
(docs/gpu-performance-log.md: the sparse target at N = 1024 and 2048).

Per row: the pairs the forward and dQ kernels visit (query tiles against the key tiles their
schedule lists) and the dK/dV kernel's (the transpose), over all sequences, heads and layers; the
share of them that are *partial* (the rule forbids some of their element pairs, so the kernel
evaluates the mask per element); ``fill``, the element pairs the rule allows over those the visited
tiles hold; the programs (tiles with at least one pair) and pairs per program; nanoseconds per tile
pair per kernel, over HSTU's at the same N, target share and mode, and over what HSTU's rows give
at the row's pairs per program (``*_per_pair_over_fit``, :func:`program_fits`); the row's training
throughput over HSTU's (``train_ratio``, as speed.py's ratio rows) and what it would be had its
forward, dK/dV and dQ kernels taken HSTU's time per pair (``train_ratio_at_hstu_per_pair``).

    python benchmarks/tile_pairs.py [--speed results/speed_NVIDIA_H100_80GB_HBM3.json]
    # -> results/tile_pairs_<device of the speed file>.{json,md}
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

import report

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"fwd": "attention_fwd_ms", "dkdv": "attention_dkdv_ms", "dq": "attention_dq_ms"}  # kernel -> row field


@functools.cache  # the speed file's modes (eager, compiled, with and without the bias) share each layout
def count(model: str, n: int, share: float, batch: int, head_dim: int, config) -> dict:
    """Tile pairs of one training row's layout, over its batch, for one head of one layer: the batch of
    seed 0 (the train part cycles seeds 0-2; at N = 1024 their layouts have the same pairs, and
    partial ones differ by under 3 %)."""
    from genrec.flops import layout_flops
    from genrec.nn.events import Events
    from genrec.ops.triton.hstu import _pairs_and_full
    from speed import TRAIN_LAYOUTS, synthetic_batch

    layout = TRAIN_LAYOUTS[model](Events.from_batch(synthetic_batch(batch, n, 0, device="cpu", target_share=share)))
    fwd_tile, bwd_tile, dq_tile = config.tiles(head_dim, torch.bfloat16)
    out = {"tokens": int(layout.valid.shape[1])}
    allowed = layout_flops(layout, 1, 1)[1] / 4  # element pairs the rule allows, summed over the batch (one head)
    for kernel, tile in (("fwd", fwd_tile), ("dkdv", bwd_tile), ("dq", dq_tile)):
        pairs, full = _pairs_and_full(layout, tile, 0)  # [B, nQ, nK]
        lead = pairs.any(-1) if kernel != "dkdv" else pairs.any(-2)  # the programs with work: query or key tiles
        out[f"{kernel}_pairs"] = int(pairs.sum())
        out[f"{kernel}_partial_share"] = float((pairs & ~full).sum() / pairs.sum())
        out[f"{kernel}_programs"] = int(lead.sum())
        out[f"{kernel}_fill"] = allowed / (int(pairs.sum()) * tile[0] * tile[1])
    return out


def rows_of(speed: dict, config) -> tuple[list[dict], dict]:
    """The speed file's profiled train rows read per tile pair, and HSTU's per-program fits
    (:func:`program_fits`) they are read over."""
    rows = []
    for r in speed["rows"]:
        if r.get("bench") != "train" or "attention_fwd_ms" not in r:
            continue
        c = count(r["model"], r["n"], r["target_share"], r["batch"], r["d"] // r["heads"], config)
        copies = r["heads"] * r["layers"]  # every head of every layer visits the same pairs
        row = {"model": r["model"], "n": r["n"], "target_share": r["target_share"], "mode": r.get("mode", "eager"),
               "batch": r["batch"], "tokens": c["tokens"],
               "partial_share": c["fwd_partial_share"], "fill": c["fwd_fill"],
               "step_ms": r["step_ms"],
               "attention_ms": r["attention_ms"]}
        for kernel, field in KERNELS.items():
            row[f"{kernel}_pairs"] = c[f"{kernel}_pairs"] * copies
            row[f"{kernel}_pairs_per_program"] = c[f"{kernel}_pairs"] / c[f"{kernel}_programs"]
            row[f"{kernel}_ms"] = r[field]
            row[f"{kernel}_ns_per_pair"] = r[field] * 1e6 / (c[f"{kernel}_pairs"] * copies)
        if "bias_grad_ms" in r and r["bias_grad_ms"]:
            row["bias_grad_ms"] = r["bias_grad_ms"]
        rows.append(row)
    for row in rows:  # per pair over HSTU's on the same shape, target share and mode
        hstu = [h for h in rows if h["model"] == "hstu" and all(h[k] == row[k] for k in ("n", "target_share", "mode"))]
        if hstu:
            h = hstu[0]
            for kernel in KERNELS:
                row[f"{kernel}_per_pair_over_hstu"] = row[f"{kernel}_ns_per_pair"] / h[f"{kernel}_ns_per_pair"]
            row["pairs_over_hstu"] = row["fwd_pairs"] / h["fwd_pairs"]
            row["attention_over_hstu"] = row["attention_ms"] / h["attention_ms"]
            row["train_ratio"] = h["step_ms"] / row["step_ms"] * row["batch"] / h["batch"]  # events/s over HSTU's
            # the same step had its three kernels taken HSTU's time per pair (the bias gradients as they are)
            at_hstu = row["step_ms"] - sum(row[f"{k}_ms"] - h[f"{k}_ns_per_pair"] * row[f"{k}_pairs"] / 1e6
                                           for k in KERNELS)
            row["train_ratio_at_hstu_per_pair"] = h["step_ms"] / at_hstu * row["batch"] / h["batch"]
    fits = program_fits(rows)
    for row in (row for row in rows if row["mode"] in fits):  # over HSTU's fit at the row's pairs per program
        for kernel in KERNELS:
            fixed, per_program = fits[row["mode"]][kernel]
            row[f"{kernel}_per_pair_over_fit"] = row[f"{kernel}_ns_per_pair"] / (
                fixed + per_program / row[f"{kernel}_pairs_per_program"])
    return sorted(rows, key=lambda r: (r["mode"], r["target_share"], r["n"], r["model"])), fits


def program_fits(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per mode (where HSTU has rows) and kernel, HSTU's nanoseconds per pair fitted (least squares
    over its rows, every N and target share) as ``a + b / pairs_per_program``: ``a`` per pair, ``b``
    per program (loading its own tile, writing its result, filling the pipeline). Short sequences
    and sparse fake flows give a program fewer pairs to spread ``b`` over; a row's time per pair
    over this fit is what is left once that is accounted for (its partial pairs, its loads)."""
    import numpy as np

    fits: dict[str, dict[str, tuple[float, float]]] = {}
    for mode in sorted({r["mode"] for r in rows}):
        hstu = [r for r in rows if r["model"] == "hstu" and r["mode"] == mode]
        if not hstu:  # no fit for a mode HSTU was not timed in
            continue
        fits[mode] = {}
        for kernel in KERNELS:
            basis = np.array([[1.0, 1.0 / r[f"{kernel}_pairs_per_program"]] for r in hstu])
            times = np.array([r[f"{kernel}_ns_per_pair"] for r in hstu])
            fixed, per_program = np.linalg.lstsq(basis, times, rcond=None)[0]
            fits[mode][kernel] = (float(fixed), float(per_program))
    return fits


def main(argv: list[str] | None = None) -> int:
    import json

    from genrec.ops.triton.hstu import DEFAULT_CONFIG

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", default=str(ROOT / "benchmarks" / "results" / "speed_NVIDIA_H100_80GB_HBM3.json"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    speed = json.loads(Path(args.speed).read_text())
    rows, fits = rows_of(speed, DEFAULT_CONFIG)
    if not rows:
        raise SystemExit(f"{args.speed}: no profiled train rows (speed.py --train-profile)")
    columns = ["model", "n", "target_share", "mode", "tokens", "fwd_pairs", "partial_share", "fill",
               "fwd_pairs_per_program", "fwd_ns_per_pair", "dkdv_ns_per_pair", "dq_ns_per_pair", "pairs_over_hstu",
               "attention_over_hstu", "fwd_per_pair_over_hstu", "dkdv_per_pair_over_hstu", "dq_per_pair_over_hstu",
               "fwd_per_pair_over_fit", "dkdv_per_pair_over_fit", "dq_per_pair_over_fit", "train_ratio",
               "train_ratio_at_hstu_per_pair"]
    device = speed["meta"]["device"]
    meta = report.meta(["python", "benchmarks/tile_pairs.py", *(argv if argv is not None else sys.argv[1:])],
                       device=f"CPU counts; times from {Path(args.speed).name} ({device})")
    meta["speed_file"] = {"path": Path(args.speed).name,
                          "git_commit": speed["meta"].get("git_commit")}
    meta["tiles"] = {"fwd": DEFAULT_CONFIG.fwd, "bwd": DEFAULT_CONFIG.bwd, "dq": DEFAULT_CONFIG.dq}
    meta["program_fits_ns"] = {mode: {k: {"per_pair": a, "per_program": b} for k, (a, b) in f.items()}
                               for mode, f in fits.items()}
    table = report.markdown_table(rows, columns) + "\n" + report.markdown_table(
        [{"mode": mode, "kernel": k, "ns_per_pair": a, "ns_per_program": b} for mode, f in fits.items()
         for k, (a, b) in f.items()], ["mode", "kernel", "ns_per_pair", "ns_per_program"])
    # a diagnostic: issue 14 names no target for it (an empty block, as RESULTS.md's shape has one)
    report.write(Path(args.out) / f"tile_pairs_{device.replace(' ', '_')}", rows, table, meta, targets=[])
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
