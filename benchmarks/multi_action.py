"""Multi-action ranking: every model predicts every signal; per-task AUC / GAUC / LogLoss and their mean.

Generative rankers (HSTU, GenRank, DFGR, SFGR) read the action vector of each history event as a sum
of per-signal embeddings; the CTR baselines (DIN, DCN-v2 by default) embed the joint action code.
One row per (model, seed) with the test metrics (``auc/<signal>``, ``gauc/<signal>``,
``logloss/<signal>``, ``auc/mean`` ...), written to ``benchmarks/results/<dataset>_multi_action.{json,md}``.

    python benchmarks/multi_action.py                          # ml-latest-small: like, five_star, tagged
    python benchmarks/multi_action.py --dataset kuairand-pure  # the same runs on KuaiRand when present
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import report
from genrec.config import load
from genrec.data.public_logs import PUBLIC_LOGS
from grid import add_grid_arguments, train_run

ROOT = Path(__file__).resolve().parent.parent
GENERATIVE = ("hstu", "genrank", "dfgr", "sfgr")


def run_one(model: str, seed: int, args) -> dict:
    out = Path(args.runs) / args.dataset / f"{model}-{seed}"
    overrides = [f"model={model}", f"data.dataset={args.dataset}", f"data.signals={json.dumps(args.signal_list)}",
                 f"train.seed={seed}", f"train.device={args.device}"]
    if model not in GENERATIVE:  # the CTR baselines take their own arguments
        overrides.append(f"model_args={json.dumps({'d_model': args.ctr_d_model, 'history': args.ctr_history})}")
    overrides += args.set
    cfg = load(args.config, overrides)

    def row_of(metrics: dict, extras: dict) -> dict:
        return {"model": model, "dataset": args.dataset, "protocol": cfg.data.split.protocol, "seed": seed,
                "signals": args.signal_list} | metrics["test"] | {
            "best_epoch": metrics["best_epoch"], "steps": metrics["steps"], "epochs": cfg.train.epochs,
            "max_len": cfg.data.max_len, "d": cfg.model_args.get("d_model")} | extras

    row = train_run(args.config, overrides, out, f"{model}/{seed}", args.reuse, row_of)
    print(f"[multi_action] {model} seed {seed}: auc/mean {row.get('auc/mean', float('nan')):.4f} "
          f"in {row['wall_s']:.0f}s", flush=True)
    return row


def write_results(args, rows: list[dict], argv: list[str] | None) -> str:
    names = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("auc/") and "mean" not in k})
    metrics = [f"{m}/{s}" for s in names for m in ("auc", "gauc")] + ["auc/mean", "gauc/mean", "logloss/mean",
                                                                       "wall_s"]
    summary = report.summary(rows, ["model"], metrics)
    table = report.markdown_table(summary, ["model", "runs", *metrics], std=True)
    argv_used = argv if argv is not None else sys.argv[1:]
    cpu = f"cpu ({os.cpu_count()} cores, shared with other jobs)"
    meta = report.meta(["python", "benchmarks/multi_action.py", *argv_used],
                       device=None if args.device == "cuda" or torch.cuda.is_available() else cpu)
    cfg = load(args.config)
    meta["schedule"] = (f"{cfg.train.epochs} epoch(s), best epoch by {cfg.train.early_stop_metric}, "
                        f"d = {cfg.model_args.get('d_model')}, {cfg.model_args.get('num_layers')} layers, "
                        f"max_len {cfg.data.max_len}, batch {cfg.data.batch_size}, lr {cfg.train.lr}; "
                        f"CTR: d = {args.ctr_d_model}, history {args.ctr_history}")
    meta["grid"] = {"models": args.models.split(","), "seeds": args.seeds.split(","), "finished_runs": len(rows)}
    report.write(Path(args.out) / f"{args.dataset}_multi_action", rows, table, meta)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_grid_arguments(parser, runs="runs/multi_action", out=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "multi_action.yaml"))
    parser.add_argument("--models", default="hstu,genrank,dfgr,sfgr,din,dcnv2")
    parser.add_argument("--signals", default=None, help="comma-separated; default: the config's for MovieLens, "
                        "the reader's own for a public log")
    parser.add_argument("--ctr-d-model", type=int, default=32)
    parser.add_argument("--ctr-history", type=int, default=20)
    args = parser.parse_args(argv)
    if args.signals is not None:
        args.signal_list = [s for s in args.signals.split(",") if s]
    elif args.dataset in PUBLIC_LOGS:
        args.signal_list = []
    else:
        args.signal_list = list(load(args.config).data.signals)
    # seed-major, so that a grid cut short has every model at the first seeds; the file is rewritten
    # after every run
    grid = [(m, int(s)) for s in args.seeds.split(",") for m in args.models.split(",")]
    rows: list[dict] = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda job: run_one(*job, args), grid):
            rows.append(row)
            table = write_results(args, rows, argv)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
