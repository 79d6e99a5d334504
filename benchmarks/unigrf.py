"""UniGRF's tables on our data: the unified models, the separate HSTU / Llama baselines, the ablations
and the fine-tuning variants (paper 003, Tables 2-4), leave-one-out, every row from configs/unigrf.yaml.

Writes ``benchmarks/results/<dataset>_unigrf.{json,md}`` (one row per variant and seed, a mean ± std
table, the paper-style table beside the paper's ML-1M figures, the enhancer's overhead) and
``<dataset>_unigrf_weighter.png``: both tasks' validation metrics per epoch with and without the
weighter, and the weights per step (the paper's Figure 3).

    python benchmarks/unigrf.py [--dataset ml-latest-small] [--seeds 0,1,2] [--jobs 4] [--device auto]
"""

from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import report
from grid import add_grid_arguments, tested, train_run

ROOT = Path(__file__).resolve().parent.parent
SINGLE = ["model_args.hard_negatives=0", "model_args.favourite_threshold=1.0", "model_args.weighter=false"]
RETRIEVAL = ["model_args.objective=retrieval", *SINGLE, "train.early_stop_metric=ndcg@10"]
RANKING = ["model_args.objective=ranking", *SINGLE, "train.early_stop_metric=auc", "train.epochs=20"]  # §5.4
LLAMA = ["model_args.backbone=llama"]
# variant -> (overrides, the stage-1 variant whose best weights it starts from)
VARIANTS: dict[str, tuple[list[str], str | None]] = {
    "unigrf-hstu": ([], None),
    "unigrf-llama": (LLAMA, None),
    "hstu-retrieval": (RETRIEVAL, None),
    "hstu-ranking": (RANKING, None),
    "llama-retrieval": (LLAMA + RETRIEVAL, None),
    "llama-ranking": (LLAMA + RANKING, None),
    "w/o enhancer": (["model_args.hard_negatives=0", "model_args.favourite_threshold=1.0"], None),
    "w/o weighter": (["model_args.weighter=false"], None),
    "w/o both": (SINGLE, None),
    "hstu-ft-a": (RANKING, "hstu-retrieval"),  # retrieval first, then ranking (ranking reported)
    "hstu-ft-b": (RETRIEVAL, "hstu-ranking"),  # ranking first, then retrieval (retrieval reported)
}
PAPER_ML1M = {  # Tables 2-4, ML-1M: (row, AUC, NDCG@10, NDCG@50, HR@10, HR@50, MRR)
    "UniGRF-HSTU": (0.7832, 0.1756, 0.2326, 0.3140, 0.5909, 0.1484),
    "UniGRF-Llama": (0.7932, 0.1765, 0.2368, 0.3219, 0.5921, 0.1478),
    "HSTU": (0.7621, 0.1708, 0.2314, 0.3132, 0.5862, 0.1431),
    "Llama": (0.7819, 0.1746, 0.2343, 0.3110, 0.5785, 0.1477),
    "w/o enhancer": (0.7815, 0.1717, 0.2318, 0.3117, 0.5824, 0.1446),
    "w/o weighter": (0.7582, 0.1734, 0.2317, 0.3199, 0.5824, 0.1441),
    "w/o both": (0.7293, 0.1681, 0.2276, 0.3113, 0.5824, 0.1392),
    "HSTU-FT-a": (0.7752, None, None, None, None, None),
    "HSTU-FT-b": (None, 0.1727, 0.2308, 0.3182, 0.5807, 0.1436),
}
METRICS = ["auc", "ndcg@10", "ndcg@50", "hr@10", "hr@50", "mrr"]
# paper row -> (variant giving its AUC, variant giving its retrieval metrics)
PAPER_ROWS = {"UniGRF-HSTU": ("unigrf-hstu",) * 2, "UniGRF-Llama": ("unigrf-llama",) * 2,
              "HSTU": ("hstu-ranking", "hstu-retrieval"), "Llama": ("llama-ranking", "llama-retrieval"),
              "w/o enhancer": ("w/o enhancer",) * 2, "w/o weighter": ("w/o weighter",) * 2,
              "w/o both": ("w/o both",) * 2, "HSTU-FT-a": ("hstu-ft-a", None), "HSTU-FT-b": (None, "hstu-ft-b")}


def replay(history: list[dict], metric: str, patience: int) -> tuple[int, int | None]:
    """(best epoch, stop epoch) had the run selected and stopped on ``metric`` (``+`` sums) alone, with
    the same patience; the stop is None if it would not have stopped within the logged epochs. Training
    does not depend on the selection rule, so up to that stop the logged validation history is exactly
    what that run would have seen."""
    best, best_epoch, bad = None, -1, 0
    for h in history:
        value = sum(h[m] for m in metric.split("+"))
        if best is None or value > best:
            best, best_epoch, bad = value, h["epoch"], 0
        else:
            bad += 1
        if bad >= patience:
            return best_epoch, h["epoch"]
    return best_epoch, None


def run_dir(args, variant: str, seed: int) -> Path:
    name = f"{variant.replace('/', '').replace(' ', '-')}-{seed}"
    return Path(args.runs) / args.dataset / f"unigrf-{args.protocol}{args.tag}" / name


def run_one(variant: str, seed: int, args) -> dict:
    overrides, stage1 = VARIANTS[variant]
    overrides = [f"data.dataset={args.dataset}", f"data.split.protocol={args.protocol}", f"train.seed={seed}",
                 f"train.device={args.device}", "train.tensorboard=false", *overrides, *args.set]
    if stage1:
        overrides.append(f"train.init_from={run_dir(args, stage1, seed) / 'best'}")

    def row_of(metrics: dict, extras: dict) -> dict:
        history = metrics["history"]
        enhancer_s = sum(h.get("before_epoch_s", 0.0) for h in history)
        key = {"model": "unigrf", "variant": variant, "dataset": args.dataset, "protocol": args.protocol, "seed": seed}
        return key | tested(metrics) | {"epochs": len(history), "steps": metrics["steps"]} | extras | {
            "enhancer_s": enhancer_s, "favourites_last_epoch": history[-1].get("favourites", 0.0),
            "history": history}

    row = train_run(ROOT / "configs" / "unigrf.yaml", overrides, run_dir(args, variant, seed), f"{variant}/{seed}",
                    args.reuse, row_of)
    shown = " ".join(f"{m} {row[m]:.4f}" for m in ("auc", "ndcg@10") if m in row)
    print(f"[unigrf] {variant} seed {seed}: {shown} ({row['epochs']} epochs, {row['wall_s']:.0f}s)", flush=True)
    if {"auc", "ndcg@10"} <= set(row["history"][0]):  # both tasks: where the old sum rule would have stopped
        patience = yaml.safe_load((run_dir(args, variant, seed) / "config.yaml").read_text())["train"]["patience"]
        best, last = replay(row["history"], "auc+ndcg@10", patience)
        row |= {"best_epoch/auc+ndcg@10 (replayed)": best} | (
            {} if last is None else {"stop_epoch/auc+ndcg@10 (replayed)": last})
    return row


def paper_table(summary: dict[str, dict]) -> list[dict]:
    out = []
    for name, (rank_v, ret_v) in PAPER_ROWS.items():
        entry = {"row": name}
        for i, m in enumerate(METRICS):
            source = summary.get(rank_v if m == "auc" else ret_v)
            if source and m in source:
                entry[m] = source[m]
                entry[m + "_std"] = source[m + "_std"]
            paper = PAPER_ML1M[name][i]
            entry[f"paper {m}"] = "-" if paper is None else f"{paper:.4f}"
        out.append(entry)
    return out


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, variant in zip(axes[:2], ("w/o weighter", "unigrf-hstu"), strict=True):
        twin = ax.twinx()
        for r in (r for r in rows if r["variant"] == variant):
            epochs = [h["epoch"] for h in r["history"]]
            ax.plot(epochs, [h["auc"] for h in r["history"]], color="tab:blue", alpha=0.7)
            twin.plot(epochs, [h["ndcg@10"] for h in r["history"]], color="tab:red", alpha=0.7)
        ax.set(title=f"{variant}: validation per epoch (one line per seed)", xlabel="epoch")
        ax.set_ylabel("ranking AUC", color="tab:blue")
        twin.set_ylabel("retrieval NDCG@10", color="tab:red")
    log = run_dir(args, "unigrf-hstu", rows[0]["seed"]) / "train_log.csv"
    with open(log) as f:
        steps = list(csv.DictReader(f))
    for key, color in (("w_retrieval", "tab:red"), ("w_ranking", "tab:blue")):
        axes[2].plot([int(s["step"]) for s in steps], [float(s[key]) for s in steps], color=color, lw=0.5, label=key)
    axes[2].set(title=f"UniGRF-HSTU adaptive weights per step (seed {rows[0]['seed']})", xlabel="step")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_tasks(rows: list[dict], path: Path) -> None:
    """Per-task validation curves of each run (AUC left, NDCG@10 right), with each task's best epoch
    and, for the unified model, where selecting on the sum AUC + NDCG@10 would have stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        epochs = [h["epoch"] for h in r["history"]]
        twin = ax.twinx()
        if "auc" in r["history"][0]:
            ax.plot(epochs, [h["auc"] for h in r["history"]], "o-", color="tab:blue", ms=3)
        if "ndcg@10" in r["history"][0]:
            twin.plot(epochs, [h["ndcg@10"] for h in r["history"]], "s-", color="tab:red", ms=3)
        for key, color in (("best_epoch/auc", "tab:blue"), ("best_epoch/ndcg@10", "tab:red")):
            if key in r:
                ax.axvline(r[key], color=color, ls=":", label=f"{key.split('/')[1]} best (epoch {r[key]})")
        stop = r.get("stop_epoch/auc+ndcg@10 (replayed)")
        if stop is not None:
            ax.axvline(stop, color="black", ls="--", label=f"AUC + NDCG@10 rule would stop (epoch {stop})")
        if not any(k.startswith("best_epoch/") for k in r):
            ax.axvline(r["best_epoch"], color="gray", ls=":", label=f"best (epoch {r['best_epoch']})")
        ax.set(title=f"{r['variant']} seed {r['seed']}: validation per epoch", xlabel="epoch")
        ax.set_ylabel("ranking AUC", color="tab:blue")
        twin.set_ylabel("retrieval NDCG@10", color="tab:red")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_grid_arguments(parser, runs="runs", out=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--protocol", default="loo", choices=["loo", "temporal"],
                        help="loo is the paper's; temporal gives ~10k test targets instead of one per user")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tag", default="", help="suffix of the result file and run folder, e.g. _beta5")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    missing = {VARIANTS[v][1] for v in variants} - {None, *variants}
    if missing:
        parser.error(f"fine-tuning variants need their first stage too: add {sorted(missing)}")
    stages = [[v for v in variants if VARIANTS[v][1] is None], [v for v in variants if VARIANTS[v][1]]]
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for stage in stages:
            rows += pool.map(lambda job: run_one(*job, args), [(v, s) for v in stage for s in seeds])
    measured = METRICS + ["hr@10/request", "ndcg@10/request", "mrr/request", "logloss", "best_epoch",
                          "best_epoch/ndcg@10", "best_epoch/auc",
                          "stop_epoch/auc+ndcg@10 (replayed)", "epochs", "wall_s", "enhancer_s", "train_events_per_s"]
    summary = report.summary(rows, ["variant"], measured)
    table = report.markdown_table(summary, ["variant", "runs", *measured], std=True)
    by_variant = {s["variant"]: s for s in summary}
    paper = report.markdown_table(paper_table(by_variant), ["row", *[c for m in METRICS for c in (m, f"paper {m}")]],
                                   std=True)
    text = (f"{table}\nPaper-style rows (ours, {args.dataset}, {args.protocol}, mean ± std over seeds {args.seeds}) "
            f"beside the paper's ML-1M figures:\n\n{paper}")
    argv_used = argv if argv is not None else sys.argv[1:]
    out = Path(args.out) / f"{args.dataset}_unigrf{'' if args.protocol == 'loo' else '_' + args.protocol}{args.tag}"
    report.write(out, rows, text, report.meta(["python", "benchmarks/unigrf.py", *argv_used]))
    if {"unigrf-hstu", "w/o weighter"} <= set(variants):
        plot(rows, args, out.with_name(out.name + "_weighter.png"))
    curves = [r for r in rows if r["variant"] in ("unigrf-hstu", "hstu-retrieval", "hstu-ranking")]
    if curves:
        plot_tasks(curves, out.with_name(out.name + "_tasks.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
