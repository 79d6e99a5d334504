"""The architecture rule, tested: every import inside ``src/genrec`` points down the floors.

Floors, lowest first (a module may import its own room and any room on a lower floor, never one on
its own floor or above; rooms sharing a floor do not know each other):

    0  errors.py  strict_json.py    the user-error type; JSON with null for NaN
    1  settings.py                  typed dicts (raises the config error)
    2  ops/  data/                  attention and masks; readers, batches, DatasetInfo
    3  nn/                          blocks, embeddings, heads, token layouts of events, the KV cache
    4  models/  flops.py            one file per model; analytic FLOPs of their work
    5  config.py                    the run's settings (may check model_args against the models)
    6  eval/                        metrics and the evaluation loop
    7  serve/                       candidate scoring, recommendation, CUDA graphs, the HTTP service
    8  train/                       the trainer and its checkpoints
    9  distributed/                 launch, sharding, distributed checkpoints
    10 cli.py                       the ``genrec`` command
    11 __main__.py                  ``python -m genrec`` (and ``torchrun -m genrec``): runs cli.main

``benchmarks/`` sits on top and may import anything; nothing in ``src`` imports ``benchmarks`` or
``tests``. What two rooms both need (a checkpoint loader for train and serve, say) moves down to a
floor both can reach. Every import counts: top-level, inside a function, or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "genrec"
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "strict_json"),
    ("settings",),
    ("ops", "data"),
    ("nn",),
    ("models", "flops"),
    ("config",),
    ("eval",),
    ("serve",),
    ("train",),
    ("distributed",),
    ("cli",),
    ("__main__",),
)
FLOOR_OF = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}
FOREIGN = ("benchmarks", "tests")  # never imported from the library


def module_name(path: Path) -> str:
    """``src/genrec/nn/hstu.py`` -> ``genrec.nn.hstu``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str | None:
    """``genrec.nn.hstu`` -> ``nn``; the package root ``genrec`` -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``source``, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # ``from genrec import config`` imports the module genrec.config
            found += [(node.lineno, f"{base}.{alias.name}" if base == "genrec" else base) for alias in node.names]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Why each import of ``module`` breaks the floors (empty if none does)."""
    room = room_of(module)
    if room is not None and room not in FLOOR_OF:
        return [f"{module}: room {room!r} has no floor; add it to FLOORS in tests/test_layers.py"]
    own = -1 if room is None else FLOOR_OF[room]  # the package root imports no room
    out = []
    for line, target in imports_of(source, module, is_package):
        top = target.split(".")[0]
        if top in FOREIGN:
            out.append(f"{module}:{line} imports {target}: the library never imports {top}/")
            continue
        if top != "genrec" or room_of(target) in (None, room):
            continue
        other = room_of(target)
        if other not in FLOOR_OF:
            out.append(f"{module}:{line} imports {target}: room {other!r} has no floor")
        elif FLOOR_OF[other] >= own:
            where = "the same floor" if FLOOR_OF[other] == own else "a higher floor"
            out.append(f"{module}:{line} imports {target} ({other}, floor {FLOOR_OF[other]}) from {room} "
                       f"(floor {own}): {where}")
    return out


def library_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_import_in_the_library_points_down_the_floors():
    problems = [v for path in library_files()
                for v in violations(path.read_text(), module_name(path), path.name == "__init__.py")]
    assert not problems, "imports against the floors:\n" + "\n".join(problems)


def test_the_lowest_rooms_never_import_models_serving_or_training():
    """The issue's independent check, without the floor table: the lowest rooms import nothing above nn/."""
    offenders = []
    for room in ("nn", "ops", "data"):
        for path in sorted((SRC / room).rglob("*.py")):
            for line, target in imports_of(path.read_text(), module_name(path), path.name == "__init__.py"):
                if target.startswith(("genrec.models", "genrec.serve", "genrec.train", "genrec.eval",
                                      "genrec.distributed", "genrec.cli", "genrec.config")):
                    offenders.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_every_room_in_the_library_has_a_floor():
    rooms = {p.name if p.is_dir() else p.stem for p in SRC.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert rooms <= set(FLOOR_OF), f"rooms without a floor: {sorted(rooms - set(FLOOR_OF))}"


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("genrec.nn.hstu", "from genrec.serve.kv_cache import KVCache", "a higher floor"),
    ("genrec.nn.ctr", "def f():\n    from genrec.models.base import RecModel", "a higher floor"),
    ("genrec.ops.masks", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import genrec.data.batching",
     "the same floor"),
    ("genrec.models.hstu", "from genrec import config", "a higher floor"),
    ("genrec.serve.graphs", "from ..train import checkpoint", "a higher floor"),
    ("genrec.eval.metrics", "import benchmarks.report", "never imports benchmarks"),
    ("genrec.newroom.x", "import torch", "has no floor"),
])
def test_the_checker_reports_an_upward_import(module, source, expected):
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(("module", "source"), [
    ("genrec.models.hstu", "from genrec.nn.hstu import HSTUBlock\nfrom genrec.ops import masks"),
    ("genrec.cli", "from genrec import config\nfrom genrec.train.trainer import Trainer"),
    ("genrec.nn.hstu", "from .kv_cache import LayerCache\nimport torch"),
])
def test_the_checker_accepts_downward_and_same_room_imports(module, source):
    assert violations(source, module) == []
