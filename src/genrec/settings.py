"""Typed settings: dataclasses built strictly from plain dicts (YAML, ``--set``), and described for people.

Every config in genrec (the run's data and training settings, each model's config) is a dataclass
whose type hints say what a field accepts; :func:`build_dataclass` turns a dict into one and rejects, with one
line naming the field, the value and what is expected:

* an unknown key (with a "did you mean" when one is close, or when the key lives one level down),
* a value of the wrong type (YAML 1.1 reads ``3e-4`` as a string: numbers are coerced),
* a value outside a ``Literal[...]`` choice or an ``Annotated[int, Range(1)]`` range,
* a cross-field rule: a dataclass may define ``check(self) -> None`` that raises :class:`Invalid`.

It sits on the lowest floor, so that the run config (:mod:`genrec.config`) can sit above the models
and check ``model_args`` against them. Nested dataclass fields are built from nested dicts. Field
meanings come from the trailing ``# comment`` on each field's line in the source, so the code's own
comment is the documentation that ``genrec config show`` prints (:func:`describe`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from genrec.errors import ConfigError

__all__ = ["DropoutRate", "Fraction", "Invalid", "NonNegative", "Positive", "Range", "build_dataclass", "check",
           "check_heads", "describe"]


class Invalid(ValueError):
    """Raised by a dataclass's ``check()``: ``field`` holds a value that breaks a rule; ``expected``
    says what would be right (``Invalid("stride", "expected at most max_len (200)")``)."""

    def __init__(self, field: str, expected: str):
        super().__init__(f"{field}: {expected}")
        self.field = field
        self.expected = expected


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field: ``Annotated[int, Range(1)]`` is an integer >= 1; ``low_open`` /
    ``high_open`` exclude the bound (``Range(0, 1, low_open=True)`` is ``0 < x <= 1``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts) or "finite"


Fraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]  # strictly between 0 and 1
Positive = Annotated[int, Range(1)]  # a count or a width: 0 builds an empty layer or samples nothing
NonNegative = Annotated[int, Range(0)]
DropoutRate = Annotated[float, Range(0, 1, high_open=True)]  # a probability of zeroing; 1 zeroes everything


def check_heads(d_model: int, num_heads: int, even_head_size: bool = False) -> None:
    """Raise :class:`Invalid` for ``num_heads`` unless it splits ``d_model`` into whole heads (of an even
    size, for RoPE), so the models' config ``check()`` names the key before any data is read instead
    of the block failing to build after the run folder is written."""
    if d_model % num_heads or (even_head_size and (d_model // num_heads) % 2):
        size = "an even head size" if even_head_size else "whole heads"
        raise Invalid("num_heads", f"expected a divisor of d_model ({d_model}) that gives {size}")

Where = Callable[[str], str]  # field path ("train.epochs") -> where it came from, for messages


def _plain_where(prefix: str) -> Where:
    return lambda path: f"{prefix}: {path}" if prefix else path


def _split_hint(hint: Any) -> tuple[Any, list[Range]]:
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        return base, [e for e in extras if isinstance(e, Range)]
    return hint, []


def type_text(hint: Any) -> str:
    """A type as a user reads it: ``an integer >= 1``, ``one of 'max', 'min'``, ``a number or null``."""
    base, ranges = _split_hint(hint)
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        options = [type_text(a) for a in typing.get_args(base) if a is not type(None)]
        nullable = type(None) in typing.get_args(base)
        return " or ".join(options) + (" or null" if nullable else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(base))
    if origin is tuple:
        args = typing.get_args(base)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_text(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} numbers"
    if origin is dict or base is dict:
        return "a mapping"
    if dataclasses.is_dataclass(base):
        return "a mapping"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    text = names.get(base, getattr(base, "__name__", str(base)))
    return text + (" " + " and ".join(r.text() for r in ranges) if ranges else "")


def _coerce(value: Any, hint: Any, path: str, where: Where) -> Any:
    """``value`` as the field's type, or a ConfigError naming the field, the value and the type."""
    base, ranges = _split_hint(hint)
    origin = typing.get_origin(base)
    options = typing.get_args(base) if origin in (typing.Union, types.UnionType) else (base,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where(path)} = null: expected {type_text(hint)}")
    for option in options:
        option, option_ranges = _split_hint(option)
        got = _coerce_one(value, option, path, where)
        if got is not _NO:
            for r in ranges + option_ranges:
                if isinstance(got, (int, float)) and not isinstance(got, bool) and not r.admits(got):
                    raise ConfigError(f"{where(path)} = {value!r}: expected {type_text(hint)}")
            return got
    raise ConfigError(f"{where(path)} = {value!r}: expected {type_text(hint)}")


_NO = object()


def _coerce_one(value: Any, option: Any, path: str, where: Where) -> Any:
    origin = typing.get_origin(option)
    if origin is Literal:
        return value if value in typing.get_args(option) and not isinstance(value, bool) else _NO
    if option in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = option(value)
        except ValueError:
            return _NO
        if option is int and isinstance(value, float) and number != value:
            return _NO
        if option is float and not math.isfinite(number):
            return _NO
        return number
    if option is bool:
        return value if isinstance(value, bool) else _NO
    if option is str:
        return value if isinstance(value, str) else _NO
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(option)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            return _NO
        return tuple(_coerce(v, t, f"{path}[{i}]", where) for i, (v, t) in enumerate(zip(value, args, strict=True)))
    if (option is dict or origin is dict) and isinstance(value, dict):
        return dict(value)
    if dataclasses.is_dataclass(option) and isinstance(value, dict):
        return _build(option, value, path, where)
    if dataclasses.is_dataclass(option) and isinstance(value, option):
        return value
    return _NO


def _suggest(cls, key: str) -> str:
    """``; did you mean 'lr'?`` for a near miss, or the nested field holding ``key``."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls, include_extras=True)
    for name in names:  # a key that moved one level down (data.protocol -> data.split.protocol)
        base, _ = _split_hint(hints[name])
        if dataclasses.is_dataclass(base) and key in {f.name for f in dataclasses.fields(base)}:
            return f"; it belongs in '{name}' ({name}.{key})"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(names)}"


def _build(cls, values: dict, prefix: str, where: Where):
    if not isinstance(values, dict):
        raise ConfigError(f"{where(prefix)} = {values!r}: expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where(path)}: unknown field {key!r} in {prefix or cls.__name__}{_suggest(cls, key)}")
    built = cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, where) for k, v in values.items()})
    check(built, prefix, where)
    return built


def check(obj, prefix: str = "", where: Where | None = None) -> None:
    """Run the dataclass's own cross-field ``check()``; an :class:`Invalid` becomes a ConfigError that
    names the field's source, path and value."""
    where = where or _plain_where("")
    rule = getattr(obj, "check", None)
    if rule is None:
        return
    try:
        rule()
    except Invalid as err:
        path = f"{prefix}.{err.field}" if prefix else err.field
        raise ConfigError(f"{where(path)} = {getattr(obj, err.field)!r}: {err.expected}") from None


def build_dataclass(cls, values: dict | None, where: Where | str | None = None, prefix: str = ""):
    """``cls`` from ``values``: unknown keys, wrong types and out-of-range values are ConfigErrors.

    ``where`` says where the values came from, either a label (``"configs/run.yaml"``) or a function
    from a field path to such a label (so that ``--set`` values are blamed on ``--set``).
    """
    if not callable(where):
        where = _plain_where(where or "")
    return _build(cls, dict(values or {}), prefix, where)


@dataclass(frozen=True)
class FieldDoc:
    name: str  # dotted path
    type: str
    default: Any
    doc: str


def _comments(cls) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the class body; a field without one takes the comment
    lines just above it, and comment lines below a commented field continue its comment."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    field_line = re.compile(r"^    (\w+)\s*:[^#]*?(?:#\s?(.*))?$")
    previous, pending = None, []
    for line in lines[1:]:
        m = field_line.match(line)
        if m and not line.strip().startswith("#"):
            trailing = (m.group(2) or "").strip()
            if trailing and pending and previous:
                docs[previous] = " ".join([docs[previous], *pending]).strip()
            docs[m.group(1)] = trailing or " ".join(pending)
            previous, pending = m.group(1), []
        elif re.match(r"^\s+#", line):
            pending.append(line.strip().lstrip("#").strip())
        else:
            if pending and previous:
                docs[previous] = " ".join([docs[previous], *pending]).strip()
            previous, pending = None, []
    return docs


def describe(cls, prefix: str = "", fallback: dict[str, str] | None = None) -> list[FieldDoc]:
    """Every field of ``cls`` (nested dataclasses flattened to dotted paths) with type, default and doc;
    ``fallback`` gives the meaning of a field whose line has no comment."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = (fallback or {}) | {k: v for k, v in _comments(cls).items() if v}
    out: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        base, _ = _split_hint(hints[f.name])
        if dataclasses.is_dataclass(base):
            out += describe(base, path, fallback)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(FieldDoc(path, type_text(hints[f.name]), default, docs.get(f.name, "")))
    return out
