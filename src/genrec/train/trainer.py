"""One trainer for every model: AdamW, warm-up + cosine, clipping, bf16 autocast on GPU, early
stopping on a validation metric, CSV + TensorBoard logs, and exact resume from the last checkpoint.

Resume is exact because nothing random depends on history: the batch order of an epoch is a pure
function of (seed, epoch) and the global RNG is re-seeded from (seed, step) before every step
(dropout, negative sampling). A run killed mid-epoch reloads weights, optimizer moments and counters
from its last checkpoint, skips the batches it already did, and continues bit for bit.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from genrec.config import RunConfig
from genrec.data.batching import WindowDataset, make_loader
from genrec.data.info import dataset_info
from genrec.data.preprocess import PrepConfig, prepare
from genrec.data.splits import SPLITS, SplitConfig, windows
from genrec.models import build_model
from genrec.models.base import RecModel
from genrec.train import checkpoint
from genrec.train.strategy import Strategy
from genrec.train.throughput import EpochMeter


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` down to ``base * min_ratio``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class CsvLog:
    """Append-only CSV whose rows past a step can be cut, so a resumed run never logs a step twice."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if int(r["step"]) <= step]
        self.path.unlink()
        for r in kept:
            self.write(r)

    def write(self, row: dict) -> None:
        new = not self.path.exists()
        if not new:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != list(row):
                raise ValueError(f"{self.path}: row columns {list(row)} differ from the header {header}")
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


class Trainer:
    """Trains ``cfg`` in this process, or as one rank of several when ``strategy`` says so
    (:mod:`genrec.distributed`): ``model`` is always the bare model, ``train_model`` what the
    training step calls (a DDP or FSDP2 wrapper of it)."""

    def __init__(self, cfg: RunConfig, log=print, strategy: Strategy | None = None):
        self.cfg = cfg
        self.strategy = strategy or Strategy()
        self.log = log if self.strategy.is_main else (lambda *_: None)
        d, t = cfg.data, cfg.train
        self.device = self.strategy.device(t.device)
        if t.deterministic and self.device.type == "cpu":
            # multithreaded CPU kernels (e.g. index accumulation) otherwise sum in scheduling order,
            # and two runs of one config drift apart in the last bits. GPU runs keep the fast kernels.
            torch.use_deterministic_algorithms(True)
        self.out = Path(t.out_dir)
        self.seq = prepare(d.dataset, d.data_dir, PrepConfig(d.label_threshold, d.request_window_s,
                           d.min_user_events, d.duplicates), allow_download=d.allow_download, log=log)
        self.info = dataset_info(self.seq)
        split = SplitConfig(d.protocol, d.val_quantile, d.test_quantile)
        self.data = {s: WindowDataset(self.seq, windows(self.seq, s, split, d.max_len, d.stride)) for s in SPLITS}
        for s in SPLITS:
            if len(self.data[s]) == 0:
                raise ValueError(f"split {s!r} of {d.dataset} under protocol {d.protocol!r} has no targets")
        torch.manual_seed(t.seed)
        self.model: RecModel = build_model(cfg.model, cfg.model_args, self.info, d.max_len)
        if t.init_from:
            if not (Path(t.init_from) / "model.safetensors").is_file():
                raise FileNotFoundError(f"train.init_from: no model.safetensors in {t.init_from}")
            checkpoint.load_weights(self.model, Path(t.init_from))
        self.model.to(self.device)
        self.train_model = self.strategy.wrap(self.model, self.device)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "emb" not in n]
        other = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=t.lr, betas=t.betas)
        self.autocast = t.bf16 and self.device.type == "cuda"

    def loader(self, split: str):
        d = self.cfg.data
        if split == "train":
            return self.strategy.train_loader(self.data[split], d.batch_size, self.cfg.train.seed, d.num_workers)
        return make_loader(self.data[split], d.eval_batch_size, shuffle=False, num_workers=d.num_workers)

    def history_loader(self):
        """Each user's latest training window, in order: the training history as it ends."""
        w = self.data["train"].windows  # grouped by user, in time order within a user
        last = np.flatnonzero(np.append(w[1:, 0] != w[:-1, 0], True))
        return make_loader(WindowDataset(self.seq, w[last]), self.cfg.data.eval_batch_size, shuffle=False,
                           num_workers=self.cfg.data.num_workers)

    def stop_value(self, metrics: dict) -> float:
        """The early-stopping metric; ``"auc+ndcg@10"`` sums several (a unified model has two tasks)."""
        names = self.cfg.train.early_stop_metric.split("+")
        missing = [n for n in names if n not in metrics]
        if missing:
            raise ValueError(f"early_stop_metric {self.cfg.train.early_stop_metric!r}: {missing} not reported by "
                             f"model {self.cfg.model!r}; it reports {sorted(metrics)}")
        return sum(metrics[n] for n in names)

    def before_epoch(self, state: dict) -> None:
        """The model's per-epoch hook, seeded by (seed, epoch) and timed; its stats go to the epoch's
        validation row. Skipped when resuming mid-epoch: the mined state came back with the weights."""
        if state["batch_in_epoch"]:
            return
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.train.seed * 1_000_003 - 1 - state["epoch"])
        stats = self.model.before_epoch(state["epoch"], self.history_loader(), self.device)
        state["epoch_stats"] = stats | ({"before_epoch_s": time.perf_counter() - t0} if stats else {})
        if stats:
            self.log(f"[train] epoch {state['epoch']} before_epoch " + " ".join(
                f"{k}={v:.4g}" for k, v in state["epoch_stats"].items()))

    def evaluate(self, split: str) -> dict:
        return self.strategy.evaluate(self.model, self.loader(split), self.device, self.autocast)

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return not math.isnan(value)
        return value > best if self.cfg.train.early_stop_mode == "max" else value < best

    def fit(self, resume: bool = True) -> dict:
        t = self.cfg.train
        main = self.strategy.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        loader = self.loader("train")
        sampler = loader.batch_sampler
        steps_per_epoch = len(sampler.batches())
        total = t.max_steps or steps_per_epoch * t.epochs
        state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "best": None, "best_epoch": -1,
                 "bad_epochs": 0, "done": False, "history": [], "epoch_stats": {}}
        last = checkpoint.latest(self.out) if resume else None
        if last is not None:
            state = self.strategy.load_checkpoint(last, self.model, self.optimizer)
            state.setdefault("epoch_stats", {})
            self.log(f"[train] resumed from {last} (epoch {state['epoch']}, step {state['global_step']})")
        step_log, val_log = CsvLog(self.out / "train_log.csv"), CsvLog(self.out / "val_log.csv")
        if main:
            step_log.truncate_after(state["global_step"])
            val_log.truncate_after(state["global_step"])
        writer = None
        if t.tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tb"), purge_step=state["global_step"] or None)

        meter = EpochMeter(self.cfg.model, getattr(self.model, "cfg", None), self.device)
        while not state["done"] and state["epoch"] < t.epochs:
            self.model.train()
            self.before_epoch(state)
            sampler.set_epoch(state["epoch"], state["batch_in_epoch"])
            bar = tqdm(loader, desc=f"epoch {state['epoch']}", disable=not (t.progress and main), leave=False,
                       initial=state["batch_in_epoch"], total=steps_per_epoch)
            meter.start()
            for batch in bar:
                t0 = time.perf_counter()
                torch.manual_seed(t.seed * 1_000_003 + state["global_step"])
                lr = lr_at(state["global_step"], t.lr, t.warmup_steps, total, t.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                batch = batch.to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    losses = self.train_model(batch)
                self.optimizer.zero_grad(set_to_none=True)
                (losses["loss"] * self.strategy.loss_scale(batch)).backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.optimizer.step()
                state["global_step"] += 1
                state["batch_in_epoch"] += 1
                meter.add(batch)
                speed = batch.num_events / (time.perf_counter() - t0)  # this process's
                row = {"step": state["global_step"], "epoch": state["epoch"], "lr": lr, "grad_norm": float(grad_norm),
                       "events_per_s": speed} | self.strategy.reduce_losses(losses, batch)
                if main:
                    step_log.write(row)
                if writer is not None:
                    for k, v in row.items():
                        if k not in ("step", "epoch"):
                            writer.add_scalar(f"train/{k}", v, state["global_step"])
                bar.set_postfix(loss=f"{row['loss']:.4f}", ev_s=f"{speed:,.0f}")
                if t.checkpoint_every_steps and state["global_step"] % t.checkpoint_every_steps == 0:
                    self.strategy.save_checkpoint(self.out, self.model, self.optimizer, state, t.keep_checkpoints)
                if t.max_steps and state["global_step"] >= t.max_steps:
                    state["done"] = True
                    break
            bar.close()
            speed = meter.row(self.strategy)
            metrics = self.evaluate("valid")
            value = self.stop_value(metrics)
            if self._better(value, state["best"]):
                state.update(best=value, best_epoch=state["epoch"], bad_epochs=0)
                self.strategy.save_weights(self.model, self.out / "best")
            else:
                state["bad_epochs"] += 1
            metrics |= state["epoch_stats"] | speed
            if main:
                val_log.write({"step": state["global_step"], "epoch": state["epoch"]} | metrics)
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"valid/{k}", v, state["global_step"])
            state["history"].append({"epoch": state["epoch"]} | metrics)
            self.log(f"[train] epoch {state['epoch']} step {state['global_step']} valid "
                     + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if state["bad_epochs"] >= t.patience:
                self.log(f"[train] early stop: no {t.early_stop_metric} gain for {t.patience} epochs")
                state["done"] = True
            self.strategy.save_checkpoint(self.out, self.model, self.optimizer, state, t.keep_checkpoints)
        if writer is not None:
            writer.close()
        self.strategy.barrier()  # rank 0 wrote best/
        if (self.out / "best" / "model.safetensors").is_file():
            self.strategy.load_weights(self.model, self.out / "best")
        result = {"valid": self.evaluate("valid"), "test": self.evaluate("test"),
                  "best_epoch": state["best_epoch"], "steps": state["global_step"],
                  "history": state["history"], "config": asdict(self.cfg)}
        if main:
            (self.out / "metrics.json").write_text(json.dumps(result, indent=1))
        return result
