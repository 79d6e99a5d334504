"""One trainer for every model: AdamW, warm-up + cosine, clipping, bf16 autocast on GPU, early
stopping on a validation metric, CSV + TensorBoard logs, and exact resume from the last checkpoint.

Order of a run: everything is checked first (config, data, model, the stopping metric, the run
folder: :mod:`genrec.train.run_folder`), and only then is the folder written. ``fit`` is a loop of
two steps that subclasses or wrappers (distributed training) can extend: :meth:`Trainer.train_epoch`
(the optimizer steps of one epoch, with mid-epoch checkpoints) and :meth:`Trainer.validate` (the
validation metrics, best weights, early stopping and the end-of-epoch checkpoint).

Model selection: ``train.early_stop_metric`` names one metric (or a sum, ``auc+ndcg@10``) whose best
epoch gives ``best/`` and whose patience ends the run, or one per task (``ndcg@10,auc``). Per task,
each metric keeps its own best value, best epoch, patience count and best weights
(``best/<metric>/``); the run stops only when every task has gone ``patience`` epochs without gain,
so a task whose metric moves in the third decimal (AUC) cannot end the run while another (NDCG@10)
is still climbing, and no sum lets one metric's scale drown another's. ``best/`` holds the first
listed task's weights (what ``--checkpoint RUN`` loads); ``metrics.json`` reports every task's best
epoch and its valid/test metrics at its own best weights.

Resume is exact because nothing random depends on history: the batch order of an epoch is a pure
function of (seed, epoch) and the global RNG is re-seeded from (seed, step) before every step
(dropout, negative sampling). A run killed mid-epoch reloads weights, optimizer moments and counters
from its last checkpoint, skips the batches it already did, and continues bit for bit.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from genrec import config as config_lib
from genrec import strict_json
from genrec.config import RunConfig
from genrec.data.batching import WindowDataset, make_loader
from genrec.data.info import dataset_info
from genrec.data.sources import prepare_sequences
from genrec.data.splits import SPLITS, windows
from genrec.errors import ConfigError
from genrec.eval.evaluate import metric_names
from genrec.models import build_model
from genrec.models.base import RecModel
from genrec.ops.layout import host_checked
from genrec.train import checkpoint
from genrec.train.console import Console, Progress
from genrec.train.run_folder import Mode, RunFolder, default_path, record
from genrec.train.strategy import Strategy
from genrec.train.throughput import EpochMeter

# torch.compile's inductor options for the training step: torch 2.11's coalesced-tiling analysis fails
# an assertion on sparse DFGR's step at N = 2048 (pytorch/pytorch#197077); it only picks tile shapes
COMPILE_OPTIONS = {"triton.coalesce_tiling_analysis": False}


def compile_options(cuda_graphs: bool) -> dict:
    """The step's inductor options: :data:`COMPILE_OPTIONS`, with ``train.cuda_graphs`` inductor's
    CUDA graphs (its cudagraph trees) on."""
    return COMPILE_OPTIONS | ({"triton.cudagraphs": True} if cuda_graphs else {})


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` down to ``base * min_ratio``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's hyper-parameters (everything but its parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def restore_optimizer_settings(optimizer: torch.optim.Optimizer, settings: list[dict]) -> None:
    """Put back the groups' hyper-parameters after ``load_state_dict``, which restores the saved run's
    (weight decay, betas, the fused flag of the device it ran on) along with the moments: a run resumed
    under changed ``train.*`` settings must train with them, and only its state continues."""
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)


class CsvLog:
    """Append-only CSV whose rows past a step can be cut, so a resumed run never logs a step twice."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, step: int) -> None:
        """Keep the rows up to ``step`` (the training log: a checkpoint's own step is logged before it)."""
        self.keep([r for r in self.rows() if int(r["step"]) <= step])

    def keep_first(self, count: int) -> None:
        """Keep the first ``count`` rows. The validation log: a checkpoint knows how many validations it
        follows (its history), while a step does not say it: a mid-epoch checkpoint on the epoch's last
        step comes before that step's validation row, the end-of-epoch one after it."""
        self.keep(self.rows()[:count])

    def keep(self, rows: list[dict]) -> None:
        if self.path.exists():
            self.path.unlink()
        for r in rows:
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


@dataclasses.dataclass
class QueuedStep:
    """A training step queued on the device, its log row not yet read: the grad norm and the losses
    are device scalars, and reading them waits for the step's last kernel. The epoch loop reads a
    step's row once it has queued the next step, so the GPU does not run dry while the host queues a
    step (which, for small steps, takes about as long as the step's kernels)."""

    head: dict  # step, epoch, lr: known on the host
    values: dict[str, torch.Tensor]  # grad_norm, then the losses: device scalars
    events: int
    started: float  # perf_counter at the step's start

    def read(self, since: float = 0.0) -> dict:
        """The log row: ``events_per_s`` over the time from the step's start, or from ``since`` (the
        previous row's read) if later, until now: in a loop that reads each row a step late, the time
        between reads, which is the step's time on the device once the host runs ahead."""
        row = {k: float(v) for k, v in self.values.items()}  # the first waits; FSDP2's norm is a DTensor
        seconds = time.perf_counter() - max(self.started, since)
        return self.head | {"grad_norm": row.pop("grad_norm"), "events_per_s": self.events / seconds} | row


class Trainer:
    """Checks and builds everything a run needs on construction, writing nothing; :meth:`fit` trains.

    Trains ``cfg`` in this process, or as one rank of several when ``strategy`` says so
    (:mod:`genrec.distributed`): ``model`` is always the bare model, ``train_model`` what the
    training step calls (a DDP or FSDP2 wrapper of it). Only the main process logs and writes the run
    folder. ``log`` receives every message (a :class:`~genrec.train.console.Console` saves them in
    the run folder as ``console.log``).
    """

    def __init__(self, cfg: RunConfig, log=print, strategy: Strategy | None = None):
        self.strategy = strategy or Strategy()
        if not self.strategy.is_main:
            log = lambda *_: None  # noqa: E731
        self.console = log if isinstance(log, Console) else Console(log)
        self.log = self.console
        d, t = cfg.data, cfg.train
        if t.out_dir is None:  # a fresh folder per run, never a shared default
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, out_dir=str(default_path(cfg.model))))
            t = cfg.train
        self.cfg = cfg
        self.out = Path(t.out_dir)
        self.device = self.strategy.device(t.device)
        if t.cuda_graphs and not (t.compile and self.device.type == "cuda" and self.strategy.world_size == 1):
            raise ConfigError(f"train.cuda_graphs replays the compiled step on a CUDA device, in one process (its "
                              f"replay beside DDP's or FSDP2's collectives is untested): it needs train.compile=true, "
                              f"a CUDA device and no --nproc (here train.compile={str(t.compile).lower()}, device "
                              f"{self.device}, {self.strategy.world_size} process(es))")
        if t.deterministic and self.device.type == "cpu":
            # multithreaded CPU kernels (e.g. index accumulation) otherwise sum in scheduling order,
            # and two runs of one config drift apart in the last bits. GPU runs keep the fast kernels.
            torch.use_deterministic_algorithms(True)
        config_lib.model_args(cfg.model, cfg.model_args)  # a typo fails before any data is read
        self.seq = prepare_sequences(d.dataset, d.data_dir, d.prep, event_log=d.event_log, signals=tuple(d.signals),
                                     allow_download=d.allow_download, log=self.log)
        if self.seq.signal_labels is None:  # a rating dataset: its label comes from the threshold
            self._check_labels()
        self.info = dataset_info(self.seq)
        self.data = {s: WindowDataset(self.seq, windows(self.seq, s, d.split, d.max_len, d.stride)) for s in SPLITS}
        for s in SPLITS:
            if len(self.data[s]) == 0:
                raise ConfigError(f"data.split: split {s!r} of {d.dataset} under protocol {d.split.protocol!r} "
                                  "has no targets")
        torch.manual_seed(t.seed)
        self.model: RecModel = build_model(cfg.model, cfg.model_args, self.info, d.max_len)
        self._check_stop_metric()
        if t.init_from:
            _, weights = checkpoint.resolve(t.init_from)
            checkpoint.load_weights(self.model, weights)
        self.model.to(self.device)
        self.train_model = self.strategy.wrap(self.model, self.device)
        if t.compile:  # the step's module only: evaluation and checkpoints use the model itself
            self.train_model = torch.compile(self.train_model, options=compile_options(t.cuda_graphs))
        self.optimizer = self.strategy.optimizer(self.model, self.adamw)
        self.autocast = t.bf16 and self.device.type == "cuda"
        self.record = record(cfg, self.seq.source_digest)
        self.writer = None

    def adamw(self, named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.AdamW:
        """AdamW over ``named`` parameters: weight decay on the weight matrices, not on embeddings,
        norms or biases."""
        t = self.cfg.train
        decay = [p for n, p in named if p.ndim >= 2 and "emb" not in n]
        other = [p for n, p in named if not (p.ndim >= 2 and "emb" not in n)]
        # fused on a GPU: a few kernels per step, where the default (foreach) dispatches ~110 ops
        # for a 4-layer HSTU, each a host launch
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=t.lr, betas=t.betas, fused=self.device.type == "cuda")

    def _check_labels(self) -> None:
        """The binary label ``rating > threshold`` must have both classes, or AUC is undefined throughout."""
        threshold, values = self.cfg.data.prep.label_threshold, self.seq.rating_values
        if not values[0] <= threshold < values[-1]:
            side = "positive" if threshold >= values[-1] else "negative"
            raise ConfigError(f"data.prep.label_threshold = {threshold:g}: leaves no {side} labels in "
                              f"{self.cfg.data.dataset} (ratings {values[0]:g}..{values[-1]:g}); expected a value "
                              f"in [{values[0]:g}, {values[-1]:g})")

    @property
    def selection(self) -> list[str]:
        """The selected tasks' metrics (one, or one per task), in the order given; the first gives best/."""
        return self.cfg.train.early_stop_metric.split(",")

    def _check_stop_metric(self) -> None:
        t = self.cfg.train
        known = metric_names(self.model.tasks, signal_names=tuple(getattr(self.model, "signal_names", ())))
        missing = [n for task in self.selection for n in task.split("+") if n not in known]
        if missing:
            raise ConfigError(f"train.early_stop_metric = {t.early_stop_metric!r}: model {self.cfg.model} does not "
                              f"report {', '.join(missing)}; expected one of {', '.join(known)} "
                              "(or a sum with +, or one per task with ,)")

    def loader(self, split: str):
        d = self.cfg.data
        if split == "train":
            # with loader workers, each batch's layout (on the fused backend: its schedules) is built in
            # one while the step before runs; in the main process it would only move the work before the step
            plan = self.model.layout_plan(torch.bfloat16 if self.autocast else torch.float32) if d.num_workers else None
            return self.strategy.train_loader(self.data[split], d.batch_size, self.cfg.train.seed, d.num_workers,
                                              prepare=plan, pin_memory=self.pin_memory)
        return make_loader(self.data[split], d.eval_batch_size, shuffle=False, num_workers=d.num_workers,
                           pin_memory=self.pin_memory)

    @property
    def pin_memory(self) -> bool:
        """Loaders hand over page-locked batches when the steps run on a GPU (:meth:`JaggedBatch.pin_memory`)."""
        return self.device.type == "cuda"

    def history_loader(self):
        """Each user's latest training window, in order: the training history as it ends."""
        w = self.data["train"].windows  # grouped by user, in time order within a user
        last = np.flatnonzero(np.append(w[1:, 0] != w[:-1, 0], True))
        return make_loader(WindowDataset(self.seq, w[last]), self.cfg.data.eval_batch_size, shuffle=False,
                           num_workers=self.cfg.data.num_workers, pin_memory=self.pin_memory)

    def stop_value(self, metrics: dict, task: str | None = None) -> float:
        """A task's selection value (default: the first task's); ``"auc+ndcg@10"`` sums several."""
        names = (task or self.selection[0]).split("+")
        missing = [n for n in names if n not in metrics]
        if missing:
            raise ValueError(f"early_stop_metric {self.cfg.train.early_stop_metric!r}: {missing} not reported by "
                             f"model {self.cfg.model!r}; it reports {sorted(metrics)}")
        return sum(metrics[n] for n in names)

    def task_states(self, state: dict) -> dict[str, dict]:
        """Each selected task's ``best``, ``best_epoch`` and ``bad_epochs``. One task: the run state itself
        (the single-metric run, as it always was); several: ``state["tasks"]``, kept in checkpoints."""
        if len(self.selection) == 1:
            return {self.selection[0]: state}
        tasks = state.setdefault("tasks", {})
        return {name: tasks.setdefault(name, {"best": None, "best_epoch": -1, "bad_epochs": 0})
                for name in self.selection}

    def task_weights(self, task: str) -> Path:
        """Where a task's best weights are: ``best/`` for one task, ``best/<task>/`` (``/`` as ``_``) per task."""
        return self.out / "best" if len(self.selection) == 1 else self.out / "best" / task.replace("/", "_")

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

    def finished(self, state: dict) -> bool:
        """Whether the run is over under *this* config: ``max_steps`` reached, or every task out of
        patience (the epochs are the loop's own condition). A resumed run re-derives it rather than
        keep the checkpoint's ``done``, so ``--resume`` with a larger ``max_steps``, ``patience`` or
        ``epochs`` trains on."""
        t = self.cfg.train
        if t.max_steps and state["global_step"] >= t.max_steps:
            return True
        return all(task["bad_epochs"] >= t.patience for task in self.task_states(state).values())

    def evaluate(self, split: str) -> dict:
        return self.strategy.evaluate(self.model, self.loader(split), self.device, self.autocast)

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return not math.isnan(value)
        return value > best if self.cfg.train.early_stop_mode == "max" else value < best

    def fit(self, mode: Mode = "auto") -> dict:
        """Train until the epochs run out, ``max_steps`` is reached or validation stops improving.

        ``mode`` says what to do with a run folder that already holds a run (see
        :mod:`genrec.train.run_folder`): ``"auto"`` resumes the same run and refuses any other,
        ``"resume"`` continues it under changed ``train.*`` settings, ``"overwrite"`` replaces it.
        """
        state = self.start(mode)
        while not state["done"] and state["epoch"] < self.cfg.train.epochs:
            self.train_epoch(state)
            self.validate(state)
        return self.finish(state)

    def start(self, mode: Mode) -> dict:
        """Claim the run folder (after checking it holds no other run) and load the newest checkpoint."""
        t = self.cfg.train
        main = self.strategy.is_main
        folder = RunFolder(self.out)
        plan = folder.plan(self.record, mode)
        resume_from = checkpoint.resumable(self.out, self.log) if plan.action == "resume" else None
        self.strategy.barrier()  # every rank has read the folder before rank 0 changes it
        if main:
            folder.claim(self.record, plan, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            self.console.attach(self.out / "console.log")
        self.strategy.barrier()  # the folder is claimed (overwritten files gone) before any rank writes
        self.log(f"[run] {self.out} ({'resuming' if resume_from else 'new run'}, {self.cfg.model} on "
                 f"{self.cfg.data.dataset}, fingerprint {self.record['fingerprint']})")
        if plan.changed:
            self.log("[run] continuing with changed settings: " + ", ".join(plan.changed))
        state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "best": None, "best_epoch": -1,
                 "bad_epochs": 0, "done": False, "history": [], "epoch_stats": {}}
        if resume_from is not None:
            settings = optimizer_settings(self.optimizer)
            state = self.strategy.load_checkpoint(resume_from, self.model, self.optimizer)
            restore_optimizer_settings(self.optimizer, settings)
            state.setdefault("epoch_stats", {})
            state["done"] = self.finished(state)
            self.log(f"[train] resumed from {resume_from} (epoch {state['epoch']}, step {state['global_step']})")
        self.step_log, self.val_log = CsvLog(self.out / "train_log.csv"), CsvLog(self.out / "val_log.csv")
        if main:
            self.step_log.truncate_after(state["global_step"])
            self.val_log.keep_first(len(state["history"]))
        if t.tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter

            # events past the checkpoint's step go: the resumed run writes them again. The step's own
            # training values were logged before the checkpoint and are not written again.
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=state["global_step"] + 1
                                        if state["global_step"] else None)
        self.train_loader = self.loader("train")
        self.steps_per_epoch = len(self.train_loader.batch_sampler.batches())
        self.total_steps = t.max_steps or self.steps_per_epoch * t.epochs
        self.meter = EpochMeter(self.cfg.model, getattr(self.model, "cfg", None), self.device)
        return state

    def train_step(self, batch, state: dict) -> dict:
        """One optimizer step on ``batch``; returns its log row (step, lr, grad norm, events/s, losses),
        waiting for the step to finish (the epoch loop uses :meth:`queue_step` and reads rows late)."""
        return self.queue_step(batch, state).read()

    def queue_step(self, batch, state: dict) -> QueuedStep:
        """One optimizer step on ``batch`` (a host batch), queued without reading anything back."""
        t = self.cfg.train
        t0 = time.perf_counter()
        torch.manual_seed(t.seed * 1_000_003 + state["global_step"])
        lr = lr_at(state["global_step"], t.lr, t.warmup_steps, self.total_steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:  # lr_scale: sharded tables' own peak (train.table_lr)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # before the forward: TorchRec's fused table optimizers take their learning rate here, and
        # their update (in the backward) uses the one set when the forward ran
        self.optimizer.zero_grad(set_to_none=True)
        # times checked here on the host batch, so the fused kernels' layout does not read the span
        # back from the device in every forward
        times_checked = host_checked(batch.timestamps)
        host_batch, batch = batch, batch.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast), times_checked:
            try:
                if t.cuda_graphs:  # a new step: the graphs' outputs of the last one may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                losses = self.train_model(batch)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                if not t.compile:
                    raise
                inner = getattr(e, "inner_exception", e)  # what the compiler raised, not dynamo's advice
                cause = (str(inner).strip().splitlines() or ["-"])[0]
                raise ConfigError(f"train.compile: torch {torch.__version__} failed to compile {self.cfg.model}'s "
                                  f"step on a batch of {batch.batch_size} x {batch.max_len} events "
                                  f"({type(inner).__name__}: {cause}); set train.compile=false") from e
        if t.cuda_graphs:  # copies out of the graphs' memory, which the next step's replay overwrites
            losses = {k: v.clone() for k, v in losses.items()}  # before this step's row is read
        (losses["loss"] * self.strategy.loss_scale(batch)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        state["global_step"] += 1
        state["batch_in_epoch"] += 1
        self.meter.add(host_batch)
        return QueuedStep({"step": state["global_step"], "epoch": state["epoch"], "lr": lr},
                          {"grad_norm": grad_norm} | self.strategy.reduce_losses(losses, batch),
                          batch.num_events, t0)  # this process's events

    def train_epoch(self, state: dict) -> None:
        """The rest of the current epoch's steps (all of them unless resuming mid-epoch)."""
        t = self.cfg.train
        self.model.train()
        self.before_epoch(state)
        self.train_loader.batch_sampler.set_epoch(state["epoch"], state["batch_in_epoch"])
        main = self.strategy.is_main
        progress = Progress(self.console, f"epoch {state['epoch']}", state["batch_in_epoch"], self.steps_per_epoch,
                            enabled=t.progress and main, every_s=t.progress_every_s)
        self.meter.start()
        queued: QueuedStep | None = None  # the step before, its row read once this one is queued
        read_at = 0.0

        def log_queued() -> None:
            nonlocal queued, read_at
            row, events = queued.read(read_at), queued.events
            queued, read_at = None, time.perf_counter()
            if main:
                self.step_log.write(row)
            if self.writer is not None:
                for k, v in row.items():
                    if k not in ("step", "epoch"):
                        self.writer.add_scalar(f"train/{k}", v, row["step"])
            progress.step(events, row["loss"])

        try:
            for batch in self.train_loader:
                step = self.queue_step(batch, state)
                if queued is not None:
                    log_queued()
                queued = step
                checkpoint_due = t.checkpoint_every_steps and state["global_step"] % t.checkpoint_every_steps == 0
                last = t.max_steps and state["global_step"] >= t.max_steps
                if checkpoint_due or last:
                    log_queued()  # a checkpoint's step is logged: a resumed run logs from the step after
                if checkpoint_due:
                    self.strategy.save_checkpoint(self.out, self.model, self.optimizer, state, t.keep_checkpoints)
                if last:
                    state["done"] = True
                    break
            if queued is not None:
                log_queued()
        finally:
            progress.close()

    def validate(self, state: dict) -> dict:
        """Validation metrics of the epoch just trained: best weights, logs, early stopping, checkpoint."""
        t = self.cfg.train
        speed = self.meter.row(self.strategy)
        metrics = self.evaluate("valid")
        tasks = self.task_states(state)
        for name, task in tasks.items():
            value = self.stop_value(metrics, name)
            if self._better(value, task["best"]):
                task.update(best=value, best_epoch=state["epoch"], bad_epochs=0)
                self.strategy.save_weights(self.model, self.task_weights(name))
            else:
                task["bad_epochs"] += 1
        if len(tasks) > 1:  # the first task's selection is the run's: best/, best_epoch
            first = tasks[self.selection[0]]
            if first["best_epoch"] == state["epoch"]:
                self.strategy.save_weights(self.model, self.out / "best")
            state.update(best=first["best"], best_epoch=first["best_epoch"], bad_epochs=first["bad_epochs"])
        metrics |= state["epoch_stats"] | speed
        if self.strategy.is_main:
            self.val_log.write({"step": state["global_step"], "epoch": state["epoch"]} | metrics)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"valid/{k}", v, state["global_step"])
        state["history"].append({"epoch": state["epoch"]} | metrics)
        self.log(f"[train] epoch {state['epoch']} step {state['global_step']} valid "
                 + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        if all(task["bad_epochs"] >= t.patience for task in tasks.values()):
            if len(tasks) == 1:
                self.log(f"[train] early stop: no {t.early_stop_metric} gain for {t.patience} epochs")
            else:
                self.log(f"[train] early stop: no task gained for {t.patience} epochs (best epochs: "
                         + ", ".join(f"{n} {task['best_epoch']}" for n, task in tasks.items()) + ")")
            state["done"] = True
        self.strategy.save_checkpoint(self.out, self.model, self.optimizer, state, t.keep_checkpoints)
        return metrics

    def _tested(self, weights: Path) -> dict:
        """Valid and test metrics of ``weights`` (of the model as it is when there are none)."""
        if (weights / checkpoint.WEIGHTS).is_file():
            self.strategy.load_weights(self.model, weights)
        return {"valid": self.evaluate("valid"), "test": self.evaluate("test")}

    def finish(self, state: dict) -> dict:
        """Test (and re-validate) the best weights, each task's at its own with several;
        ``metrics.json`` (strict JSON: null where undefined)."""
        if self.writer is not None:
            self.writer.close()
        self.strategy.barrier()  # rank 0 wrote best/
        tasks = {}
        if len(self.selection) > 1:  # each task tested at its own best weights
            for name, task in self.task_states(state).items():
                if (self.task_weights(name) / checkpoint.WEIGHTS).is_file():
                    tasks[name] = {"best_epoch": task["best_epoch"], "best_value": task["best"],
                                   "weights": str(self.task_weights(name).relative_to(self.out))
                                   } | self._tested(self.task_weights(name))
        first = tasks.get(self.selection[0])
        if first:  # best/ holds the first task's weights: the model ends with them, as with one task
            self.strategy.load_weights(self.model, self.out / "best")
        tested = {"valid": first["valid"], "test": first["test"]} if first else self._tested(self.out / "best")
        result = tested | {"best_epoch": state["best_epoch"], "steps": state["global_step"],
                           "history": state["history"], "config": self.cfg.to_dict()}
        if tasks:
            result |= {"best_epochs": {n: task["best_epoch"] for n, task in tasks.items()}, "tasks": tasks}
        if self.strategy.is_main:
            (self.out / "metrics.json").write_text(strict_json.dumps(result, indent=1))
        self.log(f"[run] finished: {self.out / 'metrics.json'}")
        return result
