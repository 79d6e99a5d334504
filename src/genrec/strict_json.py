"""JSON that every parser reads: undefined numbers (NaN, ±inf) are written as ``null``.

Python's ``json`` writes a bare ``NaN`` by default, which is not JSON; an AUC of a split with one
class is undefined, and ``null`` says so in every language.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (numpy scalars included) replaced by None."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) or type(value).__name__ in ("float32", "float64", "float16"):
        return float(value) if math.isfinite(value) else None
    return value


def dumps(value: Any, **kwargs) -> str:
    return json.dumps(finite(value), allow_nan=False, **kwargs)
