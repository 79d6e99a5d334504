"""How many tensor ops a training step dispatches to build its layout, counted on the CPU (no GPU).

A step's layout work is host-bound on the GPU: each op is a launch (or, for a view, a dispatch)
costing the host microseconds whatever its size, and the speed file's layout rows
(``results/speed_*.json``: ``layout_in_step_ms``) measure what that costs a step. This counts the
ops themselves, per stage of the build that a step of each model runs on its batch: its events, the
token layout, the kernels' int32 metadata, and the tile schedules, without the bias (the three
schedules ``speed.py``'s ``layout_ms`` builds) and with the bias and its gradients (what
``genrec.ops.triton.hstu.hstu_attention`` builds once per layout in training: the models' table of
a slot per distance, 32 time buckets). The batch is the speed file's training batch (32 sequences of
1,024 events, synthetic) and its times are checked on the host, as a training step's are
(``genrec.ops.layout.host_checked``). Every aten op is counted through a ``TorchDispatchMode``;
``views`` (no kernel) are counted apart. The counts depend on the torch version (decompositions),
not on the device: the same code dispatches the same ops on the GPU. No target: the speed file's
layout share is the target; this is where its host time goes, and what the step is left with when
the training loader builds the metadata and schedules on the host (``prepared_copy``).

    python benchmarks/layout_ops.py     # -> results/layout_ops_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import report
import speed
from genrec.data.batching import to_device
from genrec.nn.events import Events
from genrec.ops.layout import host_checked
from genrec.ops.triton import hstu

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("events", "layout", "kernel_meta", "schedules_no_bias", "schedules_bias_grads", "prepared_copy")


class _Counting(TorchDispatchMode):
    """Counts the aten ops dispatched under it: all, views apart, and by the genrec function that
    called them (the innermost frame under ``genrec/``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.views = 0
        self.callers: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += bool(func.is_view)
        frame = sys._getframe(1)
        while frame is not None and "/genrec/" not in frame.f_code.co_filename.replace("\\", "/"):
            frame = frame.f_back
        if frame is not None:
            module = frame.f_code.co_filename.replace("\\", "/").split("/genrec/")[-1].removesuffix(".py")
            self.callers[f"{module.replace('/', '.')}.{frame.f_code.co_name}"] += 1
        return func(*args, **(kwargs or {}))


def count(name: str, n: int, batch: int, head_dim: int) -> tuple[list[dict], Counter]:
    """Per-stage op counts of one model's layout build, and the bias schedules' ops by caller."""
    data = speed.synthetic_batch(batch, n, 0, device="cpu", target_share=0.1 if name == "dfgr_sparse" else 1.0)
    tiles = hstu.DEFAULT_CONFIG.tiles(head_dim, torch.bfloat16)
    counts, by_caller = {}, Counter()
    with host_checked(data.timestamps):
        stages = iter(STAGES)
        with _Counting() as mode:
            ev = Events.from_batch(data)
            counts[next(stages)] = (mode.ops, mode.views)
            layout = speed.TRAIN_LAYOUTS[name](ev)
            counts[next(stages)] = (mode.ops, mode.views)
            hstu._kernel_meta(layout)
            counts[next(stages)] = (mode.ops, mode.views)
            for tile, transpose in zip(tiles, (False, True, False), strict=True):
                hstu._schedule(layout, tile, 0, transpose)
            counts[next(stages)] = (mode.ops, mode.views)
        with _Counting() as mode:  # on a fresh layout: nothing of the no-bias schedules cached
            layout = speed.TRAIN_LAYOUTS[name](Events.from_batch(data))
            hstu._kernel_meta(layout)  # counted above: the schedules' stage starts from it
            before = (mode.ops, mode.views)
            by_caller_before = Counter(mode.callers)
            hstu.prepare_attention(layout, head_dim, torch.bfloat16, n + 1, 32, grads=True)  # as a step reads them
            counts[next(stages)] = (mode.ops - before[0], mode.views - before[1])
            by_caller = mode.callers - by_caller_before
        host = speed.TRAIN_LAYOUTS[name](Events.from_batch(data))  # the loader's build, then the step's copy
        prepared = host.prepared(hstu.prepare_attention(host, head_dim, torch.bfloat16, n + 1, 32, grads=True))
        with _Counting() as mode:
            to_device(prepared, "meta")
            counts[next(stages)] = (mode.ops, mode.views)
    rows, previous = [], (0, 0)
    for stage in STAGES:
        ops, views = counts[stage]
        if stage not in ("schedules_bias_grads", "prepared_copy"):
            ops, views, previous = ops - previous[0], views - previous[1], (ops, views)
        rows.append({"model": name, "n": n, "batch": batch, "stage": stage, "ops": ops, "views": views,
                     "launching": ops - views})
    return rows, by_caller


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--models", default="hstu,dfgr,dfgr_sparse")
    p.add_argument("--head-dim", type=int, default=64, help="speed.py's training rows: d 512, 8 heads")
    p.add_argument("--train-events", type=int, default=32_768, help="events per batch, as speed.py's")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    batch = args.train_events // args.n
    rows, callers = [], {}
    for name in args.models.split(","):
        model_rows, callers[name] = count(name, args.n, batch, args.head_dim)
        rows += model_rows
        print(*(f"{r['model']} {r['stage']}: {r['ops']} ({r['views']} views)" for r in model_rows), sep="\n")
    text = report.markdown_table(rows, ["model", "n", "batch", "stage", "ops", "views", "launching"])
    text += ("\nOps dispatched per layout build, counted on the CPU; `launching` = ops less views. "
             "`schedules_bias_grads`: what the fused attention builds with the bias in training "
             "(`prepare_attention`: the schedules and the per-token rows padded to a multiple of 16; "
             "after the layout and metadata, which it shares). `prepared_copy`: what the step runs instead of "
             "`kernel_meta` and `schedules_bias_grads` when the training loader built them on the host "
             "(`genrec.nn.prepared`, the trainer's path): one host-to-device copy per tensor of the plan.\n")
    first = args.models.split(",")[0]
    text += f"\n### {first}: the schedules with the bias by caller\n\n"
    text += report.markdown_table([{"caller": c, "ops": k} for c, k in callers[first].most_common()],
                                  ["caller", "ops"])
    meta = report.meta(device="CPU (op counts)")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "layout_ops_cpu"
    report.write(out, rows, text, meta, targets=[])
    return 0


if __name__ == "__main__":
    sys.exit(main())
