"""Several GPUs (issue 17): data-parallel scaling, FSDP2 vs DDP memory, and quality on 1 vs 2 GPUs.

Made for the two-H200 host; it has NOT been run there yet (no result file is committed until it is).
Every part launches its ranks through torchrun (``torch.distributed.run``), one launch per measured
setting, so each starts from an empty GPU:

* ``scaling``: HSTU and DFGR (d=512, 8 heads, 4 layers, backend ``triton``), N = 1024 and 4096,
  the same global batch (``--global-events`` / N sequences) on 1 and on 2 GPUs under DDP; AdamW steps
  on synthetic equal-length sequences (benchmarks/speed.py's), median step time over ``--steps``
  after 3 warm-up steps. ``train_events_per_s`` counts all GPUs; ``scaling`` = 2-GPU / 1-GPU.
* ``memory``: DDP and FSDP2 on 2 GPUs over ``--mem-layers`` HSTU layers at ``--mem-d``, a small
  global batch (``--mem-global-events``): peak memory per GPU and events/s, or ``oom`` where a rank
  ran out of memory: the largest model DDP fits and those only FSDP2 fits.
* ``quality``: ``genrec train`` of configs/ranking.yaml (temporal split of ml-latest-small) for HSTU
  and DFGR: seeds ``--seeds`` on 1 GPU (the seed spread) and the first seed on 2 GPUs; final
  validation AUC. ``auc_gap`` = |2-GPU AUC - 1-GPU AUC| at the same seed.
* ``resume``: the same 2-GPU run uninterrupted and with rank 1 killed (SIGKILL) mid-epoch then
  restarted from its DCP checkpoint; the largest difference of the final metrics.

Targets (shared/RESULTS.md): ``scaling_2gpu_min`` >= 1.9 (lowest ratio over models and N) and
``auc_gap_vs_single_gpu_max`` <= 0.005.

    python benchmarks/distributed.py [--parts scaling,memory,quality,resume] [--device cuda]

Writes ``benchmarks/results/distributed_<device>.{json,md}``. A CPU smoke run of the plumbing
(gloo, reference attention, tiny shapes, into another folder):

    python benchmarks/distributed.py --device cpu --backend reference --d 16 --heads 2 --layers 1 \
        --ns 16,32 --global-events 256 --steps 2 --mem-d 16 --mem-layers 1,2 --out /tmp/dist \
        --quality-set data.max_len=20 train.epochs=1 model_args.d_model=8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import report

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()


# ------------------------------------------------------------------------------------ one rank
def _share(batch, rank: int, world_size: int):
    """Sequences ``rank, rank + K, ...`` of a batch of equal-length sequences (the trainer's sampler)."""
    from genrec.data.batching import JaggedBatch

    n = int(batch.offsets[1])
    seqs = torch.arange(rank, batch.batch_size, world_size, device=batch.offsets.device)
    flat = (seqs[:, None] * n + torch.arange(n, device=seqs.device)).reshape(-1)
    per_event = {k: getattr(batch, k)[flat] for k in ("items", "actions", "labels", "timestamps", "request_ids",
                                                        "target_mask")}
    return JaggedBatch(offsets=torch.arange(len(seqs) + 1, device=seqs.device) * n, users=batch.users[seqs],
                       **per_event)


def _step_seconds(wrapped, model, strategy, batches, steps: int, device: torch.device) -> float:
    """Median time of one AdamW step (bf16 autocast on GPU) after 3 warm-up steps, slowest rank."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = wrapped(batch)["loss"]
        (loss * strategy.loss_scale(batch)).backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(3):
        step(batches[i % len(batches)])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(batches[i % len(batches)])
        sync()
        times.append(time.perf_counter() - start)
    return strategy.max(statistics.median(times))


def worker(args) -> None:
    """One rank of a torchrun launch: measure each (model, N) and append rows to ``--rows-out`` (rank 0)."""
    from genrec.distributed import launch
    from genrec.distributed.strategy import DataParallel
    from genrec.models import build_model
    from speed import INFO, synthetic_batch

    group = launch.init(args.device)
    strategy = DataParallel(group, args.strategy)
    rows = []
    for name in args.models.split(","):
        for n in (int(x) for x in args.ns.split(",")):
            global_batch = max(args.global_events // n, group.world_size)
            batches = [_share(synthetic_batch(global_batch, n, seed, device=str(group.device)), group.rank,
                              group.world_size) for seed in range(2)]
            torch.manual_seed(0)
            model = build_model(name, {"d_model": args.d, "num_heads": args.heads, "num_layers": args.layers,
                                       "dropout": 0.0, "attention_backend": args.backend}, INFO, n)
            row = {"bench": args.part, "model": name, "strategy": args.strategy, "gpus": group.world_size,
                   "n": n, "batch": global_batch, "d": args.d, "layers": args.layers, "heads": args.heads,
                   "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
            wrapped = None
            try:
                model.to(group.device)
                wrapped = strategy.wrap(model, group.device)
                seconds = _step_seconds(wrapped, model, strategy, batches, args.steps, group.device)
                ok = 1.0
            except torch.OutOfMemoryError:
                ok = 0.0
            if strategy.sum(ok) < group.world_size:  # every rank reports, so none waits on a dead peer
                row["oom"] = True
            else:
                row |= {"oom": False, "step_ms": seconds * 1e3, "train_events_per_s": global_batch * n / seconds,
                        "train_events_per_s_per_gpu": global_batch * n / seconds / group.world_size,
                        "peak_mem_gb": strategy.max(torch.cuda.max_memory_allocated() / 2**30
                                                    if group.device.type == "cuda" else float("nan"))}
            rows.append(row)
            if group.rank == 0:
                print(json.dumps(row), flush=True)
            del wrapped, model
            if group.device.type == "cuda":
                torch.cuda.empty_cache()
    if group.rank == 0:
        with open(args.rows_out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    launch.shutdown()


# ------------------------------------------------------------------------------------ launches
def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                PYTHONUNBUFFERED="1")


def _torchrun(nproc: int, worker_args: list[str], rows_out: Path) -> list[dict]:
    before = len(rows_out.read_text().splitlines()) if rows_out.exists() else 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(SCRIPT), "--worker", "--rows-out", str(rows_out), *worker_args]
    subprocess.run(cmd, check=True, env=_env())
    return [json.loads(line) for line in rows_out.read_text().splitlines()[before:]]


def _shape_args(args, **override) -> list[str]:
    # "--dim", not "--d": torchrun's parser reads abbreviations even after the script's path
    values = {"models": args.models, "ns": args.ns, "dim": args.d, "heads": args.heads, "layers": args.layers,
              "global-events": args.global_events, "steps": args.steps, "backend": args.backend,
              "device": args.device} | override
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def scaling_rows(args, rows_out: Path) -> list[dict]:
    rows = []
    for gpus in (1, 2):
        rows += _torchrun(gpus, _shape_args(args, part="scaling", strategy="ddp"), rows_out)
    for r in rows:
        if r["gpus"] == 2 and not r["oom"]:
            one = next(o for o in rows if o["gpus"] == 1 and (o["model"], o["n"]) == (r["model"], r["n"]))
            r["scaling"] = r["train_events_per_s"] / one["train_events_per_s"] if not one["oom"] else None
    return rows


def memory_rows(args, rows_out: Path) -> list[dict]:
    rows = []
    for strategy in ("ddp", "fsdp2"):
        for layers in (int(x) for x in args.mem_layers.split(",")):
            shape = {"models": "hstu", "ns": args.mem_n, "dim": args.mem_d, "layers": layers,
                     "global-events": args.mem_global_events}
            rows += _torchrun(2, _shape_args(args, part="memory", strategy=strategy, **shape), rows_out)
    return rows


def _train(out: Path, nproc: int, model: str, seed: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "genrec", "train", "--nproc", str(nproc), "--config",
           str(ROOT / "configs" / "ranking.yaml"), "--out-dir", str(out), "--set", f"model={model}",
           f"train.seed={seed}", "data.split.protocol=temporal", *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL)


def _final(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def quality_rows(args, tmp: Path) -> list[dict]:
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    for model in ("hstu", "dfgr"):
        for gpus, seed in [(1, s) for s in seeds] + [(2, seeds[0])]:
            out = tmp / f"quality-{model}-{gpus}-{seed}"
            if _train(out, gpus, model, seed, args.quality_set).wait() != 0:
                raise RuntimeError(f"genrec train failed in {out}")
            valid = _final(out)["valid"]
            rows.append({"bench": "quality", "model": model, "dataset": "ml-latest-small", "protocol": "temporal",
                         "gpus": gpus, "seed": seed, "auc": valid["auc"], "gauc": valid["gauc"],
                         "logloss": valid["logloss"]})
        single = [r["auc"] for r in rows if r["model"] == model and r["gpus"] == 1]
        two = next(r for r in rows if r["model"] == model and r["gpus"] == 2)
        two["auc_gap"] = abs(two["auc"] - next(r["auc"] for r in rows if r["model"] == model and r["gpus"] == 1
                                               and r["seed"] == seeds[0]))
        two["single_gpu_auc_std"] = statistics.stdev(single) if len(single) > 1 else None
    return rows


def resume_rows(args, tmp: Path) -> list[dict]:
    extra = [*args.quality_set, "train.checkpoint_every_steps=20"]
    straight, killed = tmp / "resume-straight", tmp / "resume-killed"
    if _train(straight, 2, "hstu", 0, extra).wait() != 0:
        raise RuntimeError("the uninterrupted 2-GPU run failed")
    proc = _train(killed, 2, "hstu", 0, extra)
    pointer = killed / "checkpoints" / "latest"
    rank_killed = False
    while proc.poll() is None and not rank_killed:  # rank 1 dies once a mid-epoch checkpoint of the second epoch exists
        state = killed / "checkpoints" / (pointer.read_text().strip() if pointer.is_file() else "-") / "state.json"
        if state.is_file() and (s := json.loads(state.read_text()))["epoch"] >= 1 and s["batch_in_epoch"] > 0:
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            for pid in children:
                if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
                    rank_killed = True
        time.sleep(0.05)
    killed_code = proc.wait()
    if _train(killed, 2, "hstu", 0, extra).wait() != 0:
        raise RuntimeError("the resumed 2-GPU run failed")
    a, b = _final(straight), _final(killed)
    diff = max(abs(a[s][k] - b[s][k]) for s in ("valid", "test") for k in ("auc", "gauc", "logloss"))
    return [{"bench": "resume", "model": "hstu", "gpus": 2, "rank_killed": rank_killed,
             "killed_exit_code": killed_code,
             "steps": b["steps"], "steps_uninterrupted": a["steps"], "final_metric_max_abs_diff": diff}]


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, from the rows of this run (None and unmet where a part did not run)."""
    ratios = [r["scaling"] for r in rows if r.get("bench") == "scaling" and r.get("scaling") is not None]
    gaps = [r["auc_gap"] for r in rows if r.get("bench") == "quality" and "auc_gap" in r]
    scaling = min(ratios) if ratios else None
    gap = max(gaps) if gaps else None
    return [
        {"name": "scaling_2gpu_min", "value": scaling, "op": ">=", "target": 1.9,
         "met": scaling is not None and scaling >= 1.9, "rows": "scaling rows, 2-GPU / 1-GPU events/s"},
        {"name": "auc_gap_vs_single_gpu_max", "value": gap, "op": "<=", "target": 0.005,
         "met": gap is not None and gap <= 0.005, "rows": "quality rows, 2 GPUs vs 1 GPU at the same seed"},
    ]


def tables(rows: list[dict], tg: list[dict]) -> str:
    parts = {
        "scaling": ["model", "n", "batch", "gpus", "step_ms", "train_events_per_s", "train_events_per_s_per_gpu",
                    "peak_mem_gb", "scaling"],
        "memory": ["strategy", "layers", "d", "n", "batch", "params_m", "oom", "peak_mem_gb", "train_events_per_s"],
        "quality": ["model", "gpus", "seed", "auc", "gauc", "logloss", "auc_gap", "single_gpu_auc_std"],
        "resume": ["model", "gpus", "rank_killed", "killed_exit_code", "steps", "steps_uninterrupted",
                   "final_metric_max_abs_diff"],
    }
    out = []
    for part, columns in parts.items():
        chosen = [r for r in rows if r.get("bench") == part]
        if chosen:
            out.append(f"### {part}\n\n" + report.markdown_table(chosen, columns))
    out.append("### targets\n\n" + report.markdown_table(tg, ["name", "value", "op", "target", "met", "rows"]))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="scaling,memory,quality,resume")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--models", default="hstu,dfgr")
    parser.add_argument("--ns", default="1024,4096")
    parser.add_argument("--d", "--dim", dest="d", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--global-events", type=int, default=262_144, help="events per global batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mem-d", type=int, default=4096)
    parser.add_argument("--mem-n", default="1024")
    # fp32 weights + gradients + AdamW moments: 16 B per parameter, ~1.3 GB per HSTU layer at d = 4096,
    # so DDP (a full copy per GPU) runs out within this sweep on a 141 GB H200 and FSDP2 (half each) later
    parser.add_argument("--mem-layers", default="16,32,64,96,128")
    parser.add_argument("--mem-global-events", type=int, default=8192, help="events per global batch (memory)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quality-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of configs/ranking.yaml for the quality and resume runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", default="scaling", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"benchmarks/distributed.py needs 2 GPUs; {torch.cuda.device_count()} visible")
    parts = args.parts.split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="genrec-distributed-") as tmp:
        rows_out = Path(tmp) / "rows.jsonl"
        if "scaling" in parts:
            rows += scaling_rows(args, rows_out)
        if "memory" in parts:
            rows += memory_rows(args, rows_out)
        if "quality" in parts:
            rows += quality_rows(args, Path(tmp))
        if "resume" in parts:
            rows += resume_rows(args, Path(tmp))
    tg = targets(rows)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = report.meta(["python", "benchmarks/distributed.py", *(argv if argv is not None else sys.argv[1:])],
                       device=f"{device} x2" if args.device == "cuda" else None)
    stem = Path(args.out) / f"distributed_{device.replace(' ', '_')}"
    md = tables(rows, tg)
    report.write(stem, rows, md, meta, targets=tg)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
