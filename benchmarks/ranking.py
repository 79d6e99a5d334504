"""A grid of runs: models x protocols x seeds from one config, same width/depth/steps for all.

Writes ``benchmarks/results/<dataset>_<name>.{json,md}``: one row per (model, protocol, seed) with
the test metrics the model reports (ranking: AUC, GAUC, LogLoss; retrieval: HR@K, NDCG@K, MRR, per
event and per request, ``genrec.eval.evaluate``),
wall-clock, training events/s and, for the generative rankers, the analytic training FLOPs per
event, plus a mean ± std table. Runs wherever the dataset is (ML-1M / ML-20M when present).

    python benchmarks/ranking.py [--dataset ml-latest-small] [--seeds 0,1,2] [--jobs 4] [--device auto]
    python benchmarks/ranking.py --name ctr --config configs/ctr.yaml --models din,dien,dcnv2,deepfm,gdcn
    python benchmarks/ranking.py --name retrieval --config configs/retrieval.yaml \
        --models sasrec,gru4rec,narm,bprmf --protocols loo
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import report
from genrec.config import load
from genrec.flops import LINEAR_PER_TOKEN, flops
from grid import add_grid_arguments, train_run

ROOT = Path(__file__).resolve().parent.parent


def run_one(model: str, protocol: str, seed: int, args) -> dict:
    out = Path(args.runs) / args.dataset / args.name / f"{model}-{protocol}-{seed}"
    overrides = [f"model={model}", f"data.dataset={args.dataset}", f"data.split.protocol={protocol}",
                 f"train.seed={seed}", f"train.device={args.device}", "train.tensorboard=false", *args.set]
    cfg = load(args.config, overrides)
    d, n = cfg.model_args["d_model"], cfg.data.max_len

    def row_of(metrics: dict, extras: dict) -> dict:
        row = {"model": model, "dataset": args.dataset, "protocol": protocol, "seed": seed} | metrics["test"] | {
            "best_epoch": metrics["best_epoch"], "steps": metrics["steps"]} | extras | {"d": d, "n": n}
        if model in LINEAR_PER_TOKEN:
            layers = cfg.model_args["num_layers"]
            row |= {"layers": layers, "train_flops_per_event": flops(model, n, d, layers)["per_unit"]}
        return row

    row = train_run(args.config, overrides, out, f"{model}/{protocol}/{seed}", args.reuse, row_of)
    main_metric = "auc" if "auc" in row else "ndcg@10"
    print(f"[{args.name}] {model} {protocol} seed {seed}: {main_metric} {row[main_metric]:.4f} in "
          f"{row['wall_s']:.0f}s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_grid_arguments(parser, runs="runs/ranking", out=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="ranking", help="result file: <dataset>_<name>.{json,md}")
    parser.add_argument("--config", default=str(ROOT / "configs" / "ranking.yaml"))
    parser.add_argument("--models", default="hstu,genrank,dfgr,sfgr")
    parser.add_argument("--protocols", default="loo,temporal")
    args = parser.parse_args(argv)
    grid = [(m, p, int(s)) for m in args.models.split(",") for p in args.protocols.split(",")
            for s in args.seeds.split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args), grid))
    candidates = ["auc", "gauc", "logloss", "hr@10", "hr@50", "ndcg@10", "ndcg@50", "mrr", "hr@10/request",
                  "ndcg@10/request", "mrr/request", "wall_s", "train_events_per_s", "train_flops_per_event"]
    metrics = [m for m in candidates if any(m in r for r in rows)]
    summary = report.summary(rows, ["model", "protocol"], metrics)
    table = report.markdown_table(summary, ["model", "protocol", "runs", *metrics], std=True)
    argv_used = argv if argv is not None else sys.argv[1:]
    meta = report.meta(["python", "benchmarks/ranking.py", *argv_used])
    report.write(Path(args.out) / f"{args.dataset}_{args.name}", rows, table, meta)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
