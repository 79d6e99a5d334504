"""The README's first result in a few minutes on 2 CPU cores: DFGR vs HSTU, same data, same budget.

Both generative rankers of ``configs/ranking.yaml`` (temporal split of ml-latest-small, label =
rating > 3) train on a short schedule (:data:`SHORT`): one epoch over windows of 50 events that do
not overlap (each event read once), d = 32, 64 windows per step, 10 warm-up steps; the paper
schedule is 10 epochs of overlapping 200-event windows at d = 64. They print progress while they
run and their test metrics side by side at the end.
Everything goes into one new run folder, ``runs/quickstart-<UTC time>/`` (ignored by git): the two
runs and ``quickstart.{json,md}``. Nothing tracked is written; the full comparison (3 seeds, the
paper schedule, all four rankers) is ``benchmarks/ranking.py``.

    python benchmarks/quickstart.py [--dataset NAME] [--models hstu,dfgr] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from genrec import strict_json
from genrec.cli import run_command
from genrec.config import load
from genrec.train.run_folder import default_path
from genrec.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["model", "auc", "gauc", "logloss", "best_epoch", "wall_s"]
SHORT = ["train.epochs=1", "data.max_len=50", "data.stride=50", "data.batch_size=64", "model_args.d_model=32",
         "train.warmup_steps=10"]


def table(rows: list[dict]) -> str:
    def cell(v) -> str:
        return "–" if v is None else f"{v:.4f}" if isinstance(v, float) and abs(v) < 100 else \
            f"{v:.0f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]) + "\n"


def quickstart(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_path("quickstart")
    print(f"[quickstart] {', '.join(args.models.split(','))} on {args.dataset}; runs and results in {out}",
          flush=True)
    start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        cfg = load(ROOT / "configs" / "ranking.yaml",
                   [f"model={name}", f"data.dataset={args.dataset}", *SHORT, f"train.out_dir={out / name}",
                    "train.tensorboard=false", f"train.progress_every_s={args.progress_every_s}", *args.set])
        t0 = time.perf_counter()
        result = Trainer(cfg).fit()
        rows.append({"model": name, "dataset": args.dataset, "protocol": cfg.data.split.protocol,
                     "max_len": cfg.data.max_len, "epochs": cfg.train.epochs, "seed": cfg.train.seed,
                     "best_epoch": result["best_epoch"], "wall_s": time.perf_counter() - t0} | result["test"])
    total = time.perf_counter() - start
    text = table(rows)
    meta = {"command": " ".join(["python", "benchmarks/quickstart.py", *sys.argv[1:]]), "total_wall_s": total}
    (out / "quickstart.json").write_text(strict_json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "quickstart.md").write_text(text)
    print(f"\nTest metrics on {args.dataset} ({rows[0]['protocol']} split; {' '.join(SHORT + args.set)}), "
          f"{total / 60:.1f} min in all:\n\n{text}")
    print(f"Runs and results: {out}. The full comparison: python benchmarks/ranking.py")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--models", default="hstu,dfgr")
    parser.add_argument("--progress-every-s", type=float, default=10.0, help="plain progress lines off a terminal")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a new runs/quickstart-<time>)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for both runs, after the short "
                        "schedule (e.g. train.epochs=2)")
    args = parser.parse_args(argv)
    return run_command(quickstart, args)


if __name__ == "__main__":
    sys.exit(main())
