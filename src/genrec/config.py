"""Run configuration: dataclasses with paper-faithful defaults, loadable from YAML, overridable from the CLI.

A YAML file mirrors :class:`RunConfig`::

    model: sasrec
    model_args: {d_model: 64, num_layers: 2}
    data: {dataset: ml-latest-small, protocol: loo}
    train: {epochs: 30, lr: 0.001}

and ``--set train.lr=3e-4 model_args.dropout=0.1`` overrides single fields (values parsed as YAML).
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genrec.settings import build_dataclass


@dataclass
class DataConfig:
    dataset: str = "ml-latest-small"
    data_dir: str | None = None  # default: $GENREC_DATA, then ~/.cache/genrec/data
    allow_download: bool = True
    label_threshold: float = 3.0  # binary label = rating > threshold (UniGRF: "rating > 3")
    request_window_s: int = 0  # events of one user within this gap form one request
    min_user_events: int = 3
    duplicates: str = "drop"  # or "error"
    protocol: str = "loo"  # "loo" or "temporal"
    val_quantile: float = 0.8
    test_quantile: float = 0.9
    max_len: int = 200  # most recent events a model reads
    stride: int | None = None  # new targets per extra window of a long sequence (default max_len // 2)
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 0


@dataclass
class TrainConfig:
    epochs: int = 30
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke runs)
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto" picks cuda when available
    bf16: bool = True  # autocast to bf16 on GPU (ignored on CPU)
    deterministic: bool = True  # CPU: deterministic kernels, so repeated and resumed runs are bit-identical
    early_stop_metric: str = "auc"  # validation metric to select and stop on; "a+b" sums metrics
    early_stop_mode: str = "max"
    patience: int = 5  # epochs without improvement before stopping
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of each epoch only
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    init_from: str | None = None  # folder with a model.safetensors to start from (fine-tuning)
    tensorboard: bool = True
    progress: bool = True
    strategy: str = "ddp"  # under torchrun: "ddp" or "fsdp2" (fully_shard on the blocks); data.batch_size is global


@dataclass
class RunConfig:
    model: str = "sasrec"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(values: dict, where: str = "config") -> RunConfig:
    values = dict(values or {})
    unknown = set(values) - {"model", "model_args", "data", "train"}
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {sorted(unknown)}")
    return RunConfig(
        model=values.get("model", "sasrec"),
        model_args=dict(values.get("model_args") or {}),
        data=build_dataclass(DataConfig, values.get("data") or {}, f"{where}: data"),
        train=build_dataclass(TrainConfig, values.get("train") or {}, f"{where}: train"),
    )


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to a config dict."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        keys = path.split(".")
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return values


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    values: dict = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    return from_dict(apply_overrides(values, overrides or []), str(path or "config"))
