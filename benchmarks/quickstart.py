"""The README's main job: prepare the default dataset, train and evaluate a model, print the metrics.

Default dataset: ML-1M when its files are under the data root, else ml-latest-small (the development
copy in ../shared/datasets). Writes ``benchmarks/results/quickstart_<dataset>.{json,md}``.

    python benchmarks/quickstart.py [--dataset NAME] [--models sasrec,hstu,dfgr] [--epochs N]

SASRec (retrieval + ranking, leave-one-out) and the generative rankers HSTU vs DFGR (temporal split,
configs/ranking.yaml, 5 epochs so that all three fit in about twelve minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import report
from genrec.config import load
from genrec.data import registry
from genrec.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"sasrec": (ROOT / "configs" / "sasrec.yaml", []),
           **{m: (ROOT / "configs" / "ranking.yaml", [f"model={m}", "train.epochs=5"])
              for m in ("hstu", "genrank", "dfgr", "sfgr")}}


def default_dataset() -> str:
    return "ml-1m" if registry.locate(registry.spec_for("ml-1m"), registry.data_root()) else "ml-latest-small"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--models", default="sasrec,hstu,dfgr")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    dataset = args.dataset or default_dataset()
    rows = []
    for name in args.models.split(","):
        path, preset = CONFIGS[name]
        overrides = [*preset, f"data.dataset={dataset}", f"train.out_dir=runs/quickstart/{dataset}/{name}"]
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        cfg = load(path, overrides)
        start = time.perf_counter()
        result = Trainer(cfg).fit(resume=False)
        test = result["test"]
        rows.append({"model": name, "dataset": dataset, "protocol": cfg.data.protocol, "seed": cfg.train.seed,
                     "wall_s": time.perf_counter() - start, "best_epoch": result["best_epoch"]} |
                    {k: v for k, v in test.items()})
    columns = ["model", "dataset", "protocol", "auc", "gauc", "logloss", "hr@10", "ndcg@10", "mrr", "wall_s"]
    table = report.markdown_table(rows, columns)
    report.write(Path(args.out) / f"quickstart_{dataset}", rows, table,
                  report.meta(["python", "benchmarks/quickstart.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"\nTest metrics on {dataset}:\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
