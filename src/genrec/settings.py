"""Typed settings from plain dicts (YAML): a dataclass built from a mapping, each value coerced to its
field's type and unknown keys rejected.

The run config (:mod:`genrec.config`) and the model registry (:mod:`genrec.models`, for
``model_args``) both build their dataclasses this way; it sits on the lowest floor so that the run
config can sit above the models and check ``model_args`` against them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce a YAML value to the field's type (YAML 1.1 reads ``3e-4`` as a string)."""
    if value is None:
        return None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = option(value)
            except ValueError:
                continue
            if option is int and isinstance(value, float) and number != value:
                continue
            return number
        if option is bool and isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(option)
            if len(args) == 2 and args[1] is Ellipsis:
                args = (args[0],) * len(value)
            return tuple(coerce(v, t, where) for v, t in zip(value, args, strict=True))
        if option is dict and isinstance(value, dict) or typing.get_origin(option) is dict and isinstance(value, dict):
            return value
    raise ValueError(f"{where}: {value!r} is not a valid {hint}")


def build_dataclass(cls, values: dict, where: str):
    """``cls(**values)`` with each value coerced to its field's type; unknown keys are errors naming
    ``where`` (the config section), so a typo never silently falls back to a default."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})
