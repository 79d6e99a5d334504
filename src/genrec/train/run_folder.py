"""Run folders that never mix two runs: a fingerprint of what defines a run, checked before writing.

A run folder's ``run.json`` records the run's settings (the config flattened to dotted keys, plus the
identity of the prepared data) and their fingerprint. Training into a folder is decided *before*
anything is written there (:meth:`RunFolder.plan`):

==============================  ================================================================
folder                          what happens
==============================  ================================================================
absent or empty                 a new run
same fingerprint, unfinished    resumes from its newest undamaged checkpoint (``kill -9`` safe)
same fingerprint, finished      error: it is done (``--overwrite`` trains it again)
other ``train.*`` settings      error naming the keys, unless ``--resume`` (continue with them)
other model, data or seed       error naming the keys, unless ``--overwrite`` (start afresh)
files but no ``run.json``       error: not a genrec run folder (``--overwrite`` removes only
                                genrec's own files from it)
==============================  ================================================================

Settings that do not change what is computed (where the data lives, progress display, loader
workers, DDP or FSDP2, the folder itself) are left out of the fingerprint.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import genrec
from genrec import strict_json
from genrec.config import RunConfig, model_args
from genrec.errors import UserError

Mode = Literal["auto", "resume", "overwrite"]
RUN_FILE = "run.json"
# everything genrec writes into a run folder; --overwrite removes these and nothing else
OWN_FILES = ("run.json", "config.yaml", "console.log", "train_log.csv", "val_log.csv", "metrics.json",
             "checkpoints", "best", "tb")
# settings that do not change the computation: never part of the fingerprint
NOT_IDENTITY = frozenset({"train.out_dir", "train.progress", "train.progress_every_s", "train.tensorboard",
                          "train.strategy", "data.data_dir", "data.allow_download", "data.num_workers",
                          "data.eval_batch_size"})
# settings a run may continue under with --resume (the schedule); the rest is the run's identity
RESUMABLE_PREFIX = "train."
FIXED = frozenset({"train.seed", "train.init_from"})


_UNSET = object()


class RunFolderError(UserError):
    """Training into this folder would mix two runs or overwrite one; the message says how to proceed."""


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (tuples as lists, as JSON reads them back)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = prefix + key
        if isinstance(value, dict) and value:
            out |= flatten(value, path + ".")
        else:
            out[path] = list(value) if isinstance(value, tuple) else value
    return out


def record(cfg: RunConfig, data_digest: str) -> dict:
    """What ``run.json`` holds: every setting by dotted key (``model_args`` with the model's defaults
    filled in, so leaving a default out and writing it match), the data's identity and the fingerprint."""
    config = cfg.to_dict() | {"model_args": dataclasses.asdict(model_args(cfg.model, cfg.model_args))}
    settings = flatten(config) | {"data.source_digest": data_digest}
    identity = {k: v for k, v in settings.items() if k not in NOT_IDENTITY}
    fingerprint = hashlib.sha256(strict_json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": fingerprint, "genrec": genrec.__version__, "settings": strict_json.finite(settings)}


def differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two records' settings (fingerprinted keys only)."""
    a, b = old.get("settings", {}), new["settings"]
    keys = sorted((a.keys() | b.keys()) - NOT_IDENTITY)
    diff = [k for k in keys if a.get(k, _UNSET) != b.get(k, _UNSET)]
    if "model" in diff:  # another model has other model_args by nature: name the model alone
        diff = [k for k in diff if not k.startswith("model_args.")]
    return diff


def _shown(settings: dict, key: str) -> str:
    value = settings.get(key, _UNSET)
    text = "unset" if value is _UNSET else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 24 else text[:12] + "…"


def default_path(model: str, root: Path = Path("runs")) -> Path:
    """``runs/<model>-<UTC date-time>``, with a suffix when a run started in the same second."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{model}-{stamp}", 2
    while path.exists():
        path, n = root / f"{model}-{stamp}-{n}", n + 1
    return path


@dataclass
class Plan:
    action: Literal["new", "resume", "overwrite"]
    changed: list[str]  # train.* keys that differ from the recorded run (resume only)


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    def recorded(self) -> dict | None:
        file = self.path / RUN_FILE
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunFolderError(f"{file}: damaged (not JSON); pass --overwrite to start the run again") from None

    def plan(self, new: dict, mode: Mode) -> Plan:
        """What training ``new`` into this folder means under ``mode``; a RunFolderError when it would mix
        runs. Writes nothing."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"{p}: is a file, expected a run folder")
        entries = sorted(e.name for e in p.iterdir()) if p.is_dir() else []
        if not entries:
            if mode == "resume":
                raise RunFolderError(f"{p}: nothing to resume (no run there)")
            return Plan("new", [])
        if mode == "overwrite":
            return Plan("overwrite", [])
        old = self.recorded()
        if old is None:
            raise RunFolderError(f"{p}: not a genrec run folder (no {RUN_FILE}) but holds {', '.join(entries[:4])}"
                                 f"{' …' if len(entries) > 4 else ''}; choose another --out-dir, or --overwrite to "
                                 "remove genrec's files from it")
        diff = differences(old, new)
        shown = ", ".join(f"{k} {_shown(old['settings'], k)} -> {_shown(new['settings'], k)}" for k in diff[:6])
        shown += " …" if len(diff) > 6 else ""
        fixed = [k for k in diff if not k.startswith(RESUMABLE_PREFIX) or k in FIXED]
        if fixed:
            raise RunFolderError(f"{p} holds another run ({shown}); a run cannot continue with other "
                                 f"{', '.join(fixed[:3])}: pass --overwrite to replace it, or choose another --out-dir")
        if diff and mode != "resume":
            raise RunFolderError(f"{p} holds a run with other settings ({shown}); pass --resume to continue it "
                                 "with the new ones, --overwrite to replace it, or choose another --out-dir")
        if (p / "metrics.json").is_file() and mode != "resume":
            raise RunFolderError(f"{p} holds this run, finished (metrics.json); evaluate it with genrec eval "
                                 f"--checkpoint {p}, or pass --overwrite to train it again")
        return Plan("resume", diff)

    def claim(self, new: dict, plan: Plan, config_yaml: str) -> None:
        """Make the folder this run's: clear genrec's files on overwrite, write run.json and config.yaml."""
        if plan.action == "overwrite":
            for name in OWN_FILES:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / RUN_FILE).write_text(json.dumps(new, indent=1) + "\n")
        (self.path / "config.yaml").write_text(config_yaml)
