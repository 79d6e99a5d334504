"""The planted-structure yardstick: genrec's models against the Bayes optimum of a SYNTHETIC log.

The log (:mod:`genrec.data.synth`, ``topics > 0``) hides a topic per user and item-to-item
transitions; :mod:`genrec.eval.planted` gives the exact Bayes-optimal expected HR@10 / NDCG@10
(retrieval) and AUC (ranking) on the very test targets the models are evaluated on. Each row is one
(model, seed) with its test metrics and their fraction of the optimum; two reference rows give the
Bayes predictor itself (realised on the same targets) and the oracle that knows each user's topic
(more than a history says). BPR-MF, which ignores order, is a reference and not in the targets.

Writes ``benchmarks/results/planted_<tag>.{json,md}``. It is synthetic data: it shows how much of a
known structure a model recovers at this size, never a quality claim about real data.

    python benchmarks/planted.py [--seeds 0] [--jobs 2] [--models sasrec,gru4rec,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

import report
from genrec.config import load
from genrec.data.sources import prepare_sequences
from genrec.data.splits import windows
from genrec.data.synth import LatentModel, SynthConfig, generate
from genrec.eval.planted import bayes_scores, optimum
from grid import add_grid_arguments, tested, train_run

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "planted.yaml"
LOG = SynthConfig(users=250, events=12_500, items=120, signals=("click",), topics=6, transition=0.5,
                  topic_affinity=20.0, seed=0)
SEQ = {"d_model": 32, "num_layers": 2, "num_heads": 2, "dropout": 0.1}
NEG = {"num_negatives": 64}
SINGLE = {"hard_negatives": 0, "favourite_threshold": 1.0, "weighter": False}
# model -> (name in genrec, model_args, early_stop_metric, tasks it is measured on)
MODELS: dict[str, tuple[str, dict, str, tuple[str, ...]]] = {
    "sasrec": ("sasrec", SEQ | NEG, "ndcg@10,auc", ("retrieval", "ranking")),
    "gru4rec": ("gru4rec", {"d_model": 32, "dropout": 0.1} | NEG, "ndcg@10", ("retrieval",)),
    "narm": ("narm", {"d_model": 32, "dropout": 0.1} | NEG, "ndcg@10", ("retrieval",)),
    "hstu-retrieval": ("unigrf", SEQ | NEG | SINGLE | {"objective": "retrieval"}, "ndcg@10", ("retrieval",)),
    "unigrf-hstu": ("unigrf", SEQ | NEG | {"beta": 5.0}, "ndcg@10,auc", ("retrieval", "ranking")),
    "hstu": ("hstu", SEQ, "auc", ("ranking",)),
    "dfgr": ("dfgr", SEQ, "auc", ("ranking",)),
    "genrank": ("genrank", SEQ, "auc", ("ranking",)),
    "din": ("din", {"d_model": 32, "history": 50}, "auc", ("ranking",)),
    "bprmf": ("bprmf", {"d_model": 32}, "ndcg@10", ("retrieval",)),  # ignores order: reference only
}
REFERENCE = {"bprmf"}
RETRIEVAL_METRICS = ("hr@10", "ndcg@10")


def planted_optimum(log_dir: Path, cfg, log_model: LatentModel) -> dict:
    """Bayes optimum and oracle on the test targets of the run config's split, computed on the
    sequences genrec itself builds from the log (the same events, order and catalogue)."""
    d = cfg.data
    seq = prepare_sequences(d.dataset, d.data_dir, d.prep, event_log=d.event_log, signals=tuple(d.signals),
                            log=lambda *_: None)
    if len(seq.items) != LOG.events:
        raise RuntimeError(f"genrec kept {len(seq.items)} of {LOG.events} events: the optimum would not be exact")
    raw_item = np.array([int(x) for x in seq.item_raw])  # dense id i -> raw id at [i - 1]
    items = raw_item[np.asarray(seq.items) - 1]
    catalogue = np.zeros(LOG.num_items, dtype=bool)
    catalogue[raw_item] = True  # genrec ranks the items it has seen; no other item can be ranked
    signals = np.asarray(seq.signal_labels)
    def split_targets(split: str) -> np.ndarray:
        return np.concatenate([np.arange(t0, end) for _, _, end, t0 in windows(seq, split, d.split, d.max_len,
                                                                              d.stride)])

    targets = split_targets("test")
    users = np.array([int(u) for u in seq.user_raw])
    bayes = bayes_scores(log_model, seq.user_offsets, items, signals, catalogue)
    oracle = bayes_scores(log_model, seq.user_offsets, items, signals, catalogue,
                          known_topics=log_model.user_topics[users])
    # popularity in the training events: what an order-blind, user-blind ranking reaches
    counts = np.bincount(items[split_targets("train")], minlength=LOG.num_items)
    rank = np.empty(LOG.num_items)
    rank[np.argsort(-counts, kind="stable")] = np.arange(1, LOG.num_items + 1)
    popular = rank[items[targets]]
    popularity = {"realised_hr@10": float((popular <= 10).mean()),
                  "realised_ndcg@10": float(np.where(popular <= 10, 1 / np.log2(1 + popular), 0).mean())}
    return {"bayes": optimum(bayes, targets, signals[targets, 0]), "popularity": popularity,
            "oracle": optimum(oracle, targets, signals[targets, 0]),
            "catalogue": int(catalogue.sum()), "test_targets": int(len(targets)),
            "test_positives": int(signals[targets, 0].sum())}


def run_one(name: str, seed: int, args, opt: dict) -> dict:
    model, model_args, stop, tasks = MODELS[name]
    overrides = [f"model={model}", f"model_args={json.dumps(model_args)}", f"train.early_stop_metric={stop}",
                 f"data.event_log.path={args.log}", f"train.seed={seed}", f"train.device={args.device}", *args.set]
    cfg = load(CONFIG, overrides)

    def row_of(metrics: dict, extras: dict) -> dict:
        test = tested(metrics)
        row = {"model": name, "dataset": "planted (SYNTHETIC)", "protocol": cfg.data.split.protocol, "seed": seed,
               "tasks": list(tasks), "reference": name in REFERENCE, "epochs": len(metrics["history"])}
        best = opt["bayes"]
        if "retrieval" in tasks:
            row |= {m: test[m] for m in RETRIEVAL_METRICS} | {
                f"{m}_fraction": test[m] / best[m] for m in RETRIEVAL_METRICS}
        if "ranking" in tasks:
            row |= {"auc": test["auc"], "auc_fraction": test["auc"] / best["auc"],
                    "auc_lift_fraction": (test["auc"] - 0.5) / (best["auc"] - 0.5)}
        best_epochs = {k.split("/", 1)[1]: v for k, v in test.items() if k.startswith("best_epoch/")}
        return row | {"best_epoch": best_epochs or test["best_epoch"]} | extras

    row = train_run(CONFIG, overrides, Path(args.runs) / f"{name}-{seed}", f"{name}/{seed}", args.reuse, row_of)
    shown = " ".join(f"{m} {row[m]:.4f} ({row[m + '_fraction']:.0%})" for m in ("ndcg@10", "auc") if m in row)
    print(f"[planted] {name} seed {seed}: {shown} in {row['wall_s']:.0f}s", flush=True)
    return row


def standard_error(metric: str, opt: dict) -> float:
    """Sampling error of a metric at the optimum on these test targets: binomial for HR@10 (an upper
    bound for NDCG@10, whose per-target values lie in [0, 1]), Hanley & McNeil (1982) for AUC."""
    best, n = opt["bayes"][metric], opt["test_targets"]
    if metric != "auc":
        return math.sqrt(best * (1 - best) / n)
    pos, neg = opt["test_positives"], n - opt["test_positives"]
    q1, q2 = best / (2 - best), 2 * best ** 2 / (1 + best)
    return math.sqrt((best * (1 - best) + (pos - 1) * (q1 - best ** 2) + (neg - 1) * (q2 - best ** 2)) / (pos * neg))


def targets_of(rows: list[dict], opt: dict) -> list[dict]:
    """The issue's two targets (the lowest fraction over the sequential models / the rankers, BPR-MF
    excluded) and a check that no model beats the optimum by more than 3 standard errors."""
    measured = [r for r in rows if not r["reference"]]
    retrieval = [(r[f"{m}_fraction"], f"{r['model']}/{r['seed']} {m}") for r in measured
                 for m in RETRIEVAL_METRICS if f"{m}_fraction" in r]
    ranking = [(r["auc_fraction"], f"{r['model']}/{r['seed']}") for r in measured if "auc_fraction" in r]
    excess = [((r[m] - opt["bayes"][m]) / standard_error(m, opt), f"{r['model']}/{r['seed']} {m}")
              for r in rows for m in (*RETRIEVAL_METRICS, "auc") if m in r]
    out = []
    for name, pairs, op, target in (
            ("retrieval_fraction_of_optimum_min", retrieval, ">=", 0.9),
            ("ranking_auc_fraction_of_optimum_min", ranking, ">=", 0.9),
            ("max_excess_over_optimum_in_standard_errors", excess, "<=", 3.0)):
        if not pairs:
            continue
        value, where = (min if op == ">=" else max)(pairs)
        out.append({"name": name, "value": value, "op": op, "target": target,
                    "met": value >= target if op == ">=" else value <= target,
                    "rows": f"{'lowest' if op == '>=' else 'highest'}: {where}; over "
                            f"{len(pairs)} (model, metric) pairs" + ("" if "excess" in name else ", BPR-MF excluded")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_grid_arguments(parser, runs="runs/planted", out=str(ROOT / "benchmarks" / "results"))
    parser.set_defaults(seeds="0", jobs=2, device="cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join(MODELS)}")
    args.log = str(Path(args.runs) / "log")
    if args.jobs > 1:  # parallel runs share the cores: one thread each instead of oversubscribing
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = generate(LOG, args.log, log=print)  # deterministic in its seed: rerunning writes the same log
    cfg = load(CONFIG, [f"data.event_log.path={args.log}"])
    opt = planted_optimum(Path(args.log), cfg, LatentModel.load(Path(args.log) / "latent.npz"))
    print(f"[planted] Bayes optimum on {opt['test_targets']} test targets: " + json.dumps(opt["bayes"]), flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args, opt), [(m, s) for m in names for s in seeds]))
    for r in rows:
        r.pop("history", None)
    references = [{"model": k, "dataset": "planted (SYNTHETIC)", "protocol": cfg.data.split.protocol,
                   "reference": True} | {m: v[f"realised_{m}"] for m in (*RETRIEVAL_METRICS, "auc")}
                  | {f"expected {m}": v[m] for m in (*RETRIEVAL_METRICS, "auc")}
                  for k, v in (("reference: Bayes-optimal predictor", opt["bayes"]),
                                 ("reference: oracle that knows the topic", opt["oracle"]))]
    references.append({"model": "reference: popularity (training counts)", "dataset": "planted (SYNTHETIC)",
                       "protocol": cfg.data.split.protocol, "reference": True,
                       **{m: opt["popularity"][f"realised_{m}"] for m in RETRIEVAL_METRICS}})
    targets = targets_of(rows, opt)
    columns = ["model", "seed", "hr@10", "hr@10_fraction", "ndcg@10", "ndcg@10_fraction", "auc", "auc_fraction",
               "auc_lift_fraction", "best_epoch", "epochs", "wall_s"]
    best = opt["bayes"]
    text = (f"SYNTHETIC data (genrec.data.synth, planted topics and transitions): how much of a known "
            f"structure each model recovers at this size; never a quality claim about real data.\n\n"
            f"Log: {LOG.users} users, {LOG.events:,} events, {LOG.num_items} items, {LOG.topics} topics, "
            f"transition {LOG.transition}; temporal split; {opt['test_targets']:,} test targets. Bayes optimum "
            f"(expected, exact): HR@10 {best['hr@10']:.4f}, NDCG@10 {best['ndcg@10']:.4f}, AUC {best['auc']:.4f}. "
            f"Fractions are of these; auc_lift_fraction = (AUC - 0.5) / (optimum - 0.5). Seeds {args.seeds}.\n\n"
            + report.markdown_table(rows, columns) + "\nReferences, on the same test targets (realised; "
            "the oracle knows each user's topic, which no history fully reveals):\n\n"
            + report.markdown_table(references, ["model", "hr@10", "ndcg@10", "auc", "expected hr@10",
                                                 "expected ndcg@10", "expected auc"])
            + "\nTargets:\n\n" + report.markdown_table(targets, ["name", "value", "op", "target", "met", "rows"]))
    argv_used = argv if argv is not None else sys.argv[1:]
    meta = report.meta(["python", "benchmarks/planted.py", *argv_used],
                       device=f"cpu ({os.cpu_count()} cores, shared with other jobs)")
    meta |= {"threads_per_run": os.environ.get("OMP_NUM_THREADS", "torch default"), "synthetic": True,
             "log": asdict(LOG) | {"summary_note": summary["note"]}, "optimum": opt}
    report.write(Path(args.out) / f"planted_{args.tag}", rows + references, text, meta, targets)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
