"""Run configuration: dataclasses with paper-faithful defaults, loadable from YAML, overridable from the CLI.

A YAML file mirrors :class:`RunConfig`::

    model: sasrec
    model_args: {d_model: 64, num_layers: 2}
    data: {dataset: ml-latest-small, split: {protocol: loo}, prep: {label_threshold: 3}}
    train: {epochs: 30, lr: 0.001}

and ``--set train.lr=3e-4 data.split.protocol=temporal`` overrides single fields (values parsed as
YAML). Everything is checked when the config is loaded, before any data is read: unknown keys (with a
suggestion), types, ranges and choices (:mod:`genrec.settings`), the model's name and its
``model_args`` against the model's own config class. Errors are :class:`~genrec.errors.ConfigError`
naming the YAML file or ``--set``, the field and the value. Checks that need the data or the built
model (the label threshold against the ratings, the stopping metric against the model's metrics)
run in the trainer, still before anything is written.

Floor: above ``models/`` (it checks ``model_args`` against the registry), below the rooms that train.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from genrec import settings
from genrec.data.preprocess import PrepConfig
from genrec.data.public_logs import PUBLIC_LOGS
from genrec.data.registry import DATASETS
from genrec.data.splits import SplitConfig
from genrec.errors import ConfigError
from genrec.models import MODELS
from genrec.settings import Invalid, NonNegative, Positive, Range

Decay = Annotated[float, Range(0, 1, high_open=True)]


@dataclass
class DataConfig:
    dataset: str = "ml-latest-small"  # a dataset genrec knows (genrec.data.registry) or a public log
    data_dir: str | None = None  # dataset root; default $GENREC_DATA, then ~/.cache/genrec/data
    allow_download: bool = True  # fetch a dataset that is not under the root from its publisher
    event_log: dict[str, Any] | None = None  # your own log: {path, user, item, timestamp, signals, ...}
    signals: tuple[str, ...] = ()  # action signals: MovieLens like/five_star/rated/tagged, a public log's subset
    prep: PrepConfig = field(default_factory=PrepConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    max_len: Positive = 200  # most recent events a model reads
    stride: Positive | None = None  # new targets per extra window of a long sequence (null: max_len // 2)
    batch_size: Positive = 64  # training windows per optimizer step
    eval_batch_size: Positive = 128  # windows per evaluation batch
    num_workers: NonNegative = 0  # data-loader worker processes; on the triton backend >= 1 also builds
    # each training batch's attention schedules in them, off the step (genrec.nn.prepared)

    def check(self) -> None:
        if self.event_log is None and self.dataset not in DATASETS and self.dataset not in PUBLIC_LOGS:
            raise Invalid("dataset", f"expected one of {', '.join(sorted([*DATASETS, *PUBLIC_LOGS]))}")
        if self.stride is not None and self.stride > self.max_len:
            raise Invalid("stride", f"expected at most max_len ({self.max_len})")


@dataclass
class TrainConfig:
    epochs: Positive = 30  # passes over the training windows (early stopping may end sooner)
    max_steps: Positive | None = None  # stop after this many optimizer steps (smoke runs); null: no limit
    lr: Annotated[float, Range(0, low_open=True)] = 1e-3  # peak learning rate (AdamW)
    weight_decay: Annotated[float, Range(0)] = 0.01  # AdamW decay of weight matrices (not embeddings)
    betas: tuple[Decay, Decay] = (0.9, 0.98)  # AdamW moment decay rates
    warmup_steps: NonNegative = 100  # linear warm-up steps before the cosine decay
    min_lr_ratio: Annotated[float, Range(0, 1)] = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: Annotated[float, Range(0, low_open=True)] = 1.0  # clip the gradient norm to this
    seed: NonNegative = 0  # weights, batch order, dropout and negatives derive from it
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    bf16: bool = True  # autocast to bf16 on GPU (ignored on CPU)
    # torch.compile the training forward (and through it the backward): fused elementwise work and
    # fewer launches; each new batch shape compiles first. A compile failure is a clear error naming
    # this setting (torch 2.11's inductor failed on sparse DFGR at N = 2048 until its coalesced-tiling
    # analysis was switched off: genrec.train.trainer.COMPILE_OPTIONS, pytorch/pytorch#197077)
    compile: bool = False
    # with train.compile, on a CUDA device: replay the compiled forward and backward as CUDA graphs
    # (inductor's cudagraph trees), so the step's hundreds of kernel launches cost the host one replay
    # each; a step that is short on the GPU (sparse DFGR) is otherwise bound by the host that queues it.
    # Each new batch shape records a graph of its own (fixed-shape batches suit it best). One process
    # only. Its trainer test passed on an H100 at 9f1dbcc (README, GPU section)
    cuda_graphs: bool = False
    deterministic: bool = True  # CPU: deterministic kernels, so repeated and resumed runs are bit-identical
    # validation metric to select and stop on; "auc+ndcg@10" sums several; "ndcg@10,auc" selects per task:
    # each has its own patience and best weights (best/<metric>/), training stops when every one has
    # stopped improving, and best/ holds the first one's
    early_stop_metric: str = "auc"
    early_stop_mode: Literal["max", "min"] = "max"  # whether larger or smaller values of the metric are better
    patience: Positive = 5  # epochs without improvement before stopping (per task with a comma list)
    checkpoint_every_steps: NonNegative = 0  # 0: checkpoint at the end of each epoch only
    keep_checkpoints: Positive = 2  # newest checkpoints kept (a damaged one falls back to the one before)
    out_dir: str | None = None  # run folder; null: a new runs/<model>-<UTC time>, printed at start
    init_from: str | None = None  # weights to start from: a run folder, a checkpoint folder or a .safetensors
    tensorboard: bool = True  # TensorBoard event files in the run folder
    progress: bool = True  # a progress bar on a terminal, a plain line every progress_every_s otherwise
    progress_every_s: Annotated[float, Range(0, low_open=True)] = 30.0  # seconds between plain progress lines
    # under torchrun: DDP, FSDP2 (fully_shard on the blocks) or "torchrec": the item and action tables
    # sharded over the ranks by TorchRec (the genrec[torchrec] extra), the rest in DDP; data.batch_size
    # is the global batch
    strategy: Literal["ddp", "fsdp2", "torchrec"] = "ddp"
    table_sharding: Literal["row_wise", "table_wise"] = "row_wise"  # train.strategy=torchrec: how tables split
    # train.strategy=torchrec: the tables' optimizer, fused into the backward pass by TorchRec (the ones
    # its CPU kernels have; no weight decay)
    table_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = "rowwise_adagrad"
    # train.strategy=torchrec: the tables' peak learning rate (null: train.lr), on train.lr's schedule
    table_lr: Annotated[float, Range(0, low_open=True)] | None = None

    def check(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise Invalid("device", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        metric = r"[a-z_]+(@\d+)?(/[\w\-]+)?"  # auc, ndcg@10, or a task's: auc/click, auc/mean
        task = rf"{metric}(\+{metric})*"
        if not re.fullmatch(rf"{task}(,{task})*", self.early_stop_metric):
            raise Invalid("early_stop_metric", "expected a metric name such as 'auc', 'ndcg@10', 'auc/click', "
                          "'auc/mean', a sum 'auc+ndcg@10' or one per task 'ndcg@10,auc'")
        tasks = self.early_stop_metric.split(",")
        if len(set(tasks)) != len(tasks):
            raise Invalid("early_stop_metric", "expected each task's metric once")
        directions = {name: metric_direction(name) for task in tasks for name in task.split("+")}
        if len(set(directions.values())) > 1:
            raise Invalid("early_stop_metric", f"{_listed(directions, 'min')} better when smaller and "
                          f"{_listed(directions, 'max')} better when larger: one early_stop_mode cannot select both; "
                          "expected metrics of one direction (e.g. auc instead of logloss)")
        if self.early_stop_mode not in directions.values():
            wanted = next(iter(directions.values()))
            raise Invalid("early_stop_mode", f"{_listed(directions, wanted)} better when "
                          f"{'smaller' if wanted == 'min' else 'larger'}: expected {wanted!r}")


LOWER_IS_BETTER = frozenset({"logloss"})  # the losses among the reported metrics; every other one is a gain


def metric_direction(name: str) -> Literal["max", "min"]:
    """Whether a larger ("max": auc, gauc, ndcg@10, hr@10, mrr) or a smaller ("min": logloss,
    logloss/click) value of a validation metric is better."""
    return "min" if re.split(r"[@/]", name)[0] in LOWER_IS_BETTER else "max"


def _listed(directions: dict[str, str], direction: str) -> str:
    names = [n for n, d in directions.items() if d == direction]
    return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'}"


@dataclass
class RunConfig:
    model: str = "sasrec"  # a model name (genrec config show lists them)
    model_args: dict[str, Any] = field(default_factory=dict)  # fields of the model's config class
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What the hyper-parameters several models share mean (``genrec config show`` prints them where a
# model's config field has no comment of its own).
SHARED_MODEL_FIELDS = {
    "d_model": "width of the embeddings and blocks",
    "num_layers": "number of blocks",
    "num_heads": "attention heads per block",
    "dropout": "dropout probability in the blocks",
    "max_len": "longest history (events) the position tables cover; default data.max_len",
    "attention_backend": "'reference' (dense PyTorch, any device) or 'triton' (fused kernels, CUDA only)",
    "hidden": "width of the MLP layers",
    "history": "most recent behaviours (of earlier requests) a target reads",
    "extra_thresholds": "extra binary tasks: rating > each threshold",
    "multiclass_weight": "weight of a multi-class loss over the rating classes (0: off)",
    "num_negatives": "uniform catalogue negatives per query in the sampled softmax",
    "in_batch_negatives": "also use the batch's other target items as negatives",
    "cross_layers": "feature-crossing layers",
    "retrieval_weight": "weight of the retrieval loss",
    "ranking_weight": "weight of the ranking loss",
    "alibi": "ALiBi distance bias on the attention scores (GenRank)",
    "weighter": "the gradient-guided adaptive task weighter (UniGRF)",
}


def from_dict(values: dict, where: settings.Where | str = "config") -> RunConfig:
    """A checked :class:`RunConfig` from a plain dict (the YAML's shape)."""
    if not callable(where):
        label = where
        where = lambda path: f"{label}: {path}"  # noqa: E731
    cfg: RunConfig = settings.build_dataclass(RunConfig, values, where)
    if cfg.model not in MODELS:
        raise ConfigError(f"{where('model')} = {cfg.model!r}: expected one of {', '.join(sorted(MODELS))}")
    model_args(cfg.model, cfg.model_args, where)
    return cfg


def model_args(model: str, args: dict, where: settings.Where | str = "config"):
    """``args`` checked and built as ``model``'s config dataclass (unknown keys, types and ranges)."""
    return settings.build_dataclass(MODELS[model][1], args, where, "model_args")


def apply_overrides(values: dict, overrides: list[str]) -> tuple[dict, set[str]]:
    """Apply ``section.key=value`` overrides (value parsed as YAML); also the set of paths they set."""
    values = _copy(values)
    paths: set[str] = set()
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path or not re.fullmatch(r"[A-Za-z_][\w@]*(\.[A-Za-z_][\w@]*)*", path):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({_yaml_problem(err)})") from None
        keys = path.split(".")
        node = values
        for depth, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(keys[:depth + 1])} is {node!r}, not a section")
        node[keys[-1]] = value
        paths.add(path)
    return values, paths


def _copy(values: Any) -> Any:
    return {k: _copy(v) for k, v in values.items()} if isinstance(values, dict) else values


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; a missing file or bad YAML is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping (model:, data:, train:) at the top level")
    return values


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The config in ``path`` (or the defaults) with ``overrides`` applied, fully checked."""
    values = read_yaml(path) if path is not None else {}
    values, overridden = apply_overrides(values, overrides or [])
    label = str(path) if path is not None else "defaults"

    def where(p: str) -> str:
        if any(p == o or p.startswith((o + ".", o + "[")) for o in overridden):
            return f"--set {p}"
        return f"{label}: {p}"

    return from_dict(values, where)
