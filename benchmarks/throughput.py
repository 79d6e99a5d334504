"""Training throughput of the generative rankers on this machine: events/s over the same batches.

Each model trains ``--steps`` optimizer steps (after ``--warmup``) on the same first batches of the
temporal training split of configs/ranking.yaml; events/s = events in those batches / time.
Writes ``benchmarks/results/<dataset>_throughput_<device>.{json,md}``.

    python benchmarks/throughput.py [--dataset ml-latest-small] [--device cpu] [--steps 10]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

import report
from genrec.config import load
from genrec.flops import flops
from genrec.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


def measure(model: str, args) -> dict:
    cfg = load(ROOT / "configs" / "ranking.yaml", [f"model={model}", f"data.dataset={args.dataset}",
                                                  "data.split.protocol=temporal", f"train.device={args.device}"])
    trainer = Trainer(cfg, log=lambda *_: None)
    batches = [b.to(trainer.device) for b in itertools.islice(trainer.loader("train"), args.warmup + args.steps)]
    trainer.model.train()

    def step(batch) -> None:
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.autocast):
            loss = trainer.model(batch)["loss"]
        loss.backward()
        trainer.optimizer.step()

    for batch in batches[: args.warmup]:
        step(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[args.warmup:]:
        step(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    events = sum(b.num_events for b in batches[args.warmup:])
    d, layers = cfg.model_args["d_model"], cfg.model_args["num_layers"]
    return {"model": model, "dataset": args.dataset, "protocol": "temporal", "seed": cfg.train.seed,
            "batch": cfg.data.batch_size, "n": cfg.data.max_len, "d": d, "layers": layers, "steps": args.steps,
            "train_events_per_s": events / seconds, "seconds": seconds,
            "train_flops_per_event": flops(model, cfg.data.max_len, d, layers)["per_unit"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--models", default="hstu,genrank,dfgr,sfgr")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    rows = [measure(m, args) for m in args.models.split(",")]
    base = next((r["train_events_per_s"] for r in rows if r["model"] == "hstu"), None)
    for r in rows:
        r["speedup_vs_hstu"] = r["train_events_per_s"] / base if base else float("nan")
    table = report.markdown_table(rows, ["model", "batch", "n", "d", "layers", "train_events_per_s",
                                          "speedup_vs_hstu", "train_flops_per_event"])
    meta = report.meta(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])])
    report.write(Path(args.out) / f"{args.dataset}_throughput_{args.device}", rows, table, meta)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
