"""JSON that strict parsers accept: NaN and infinities become null (the standard has neither)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """A copy of `value` with non-finite floats as None, paths and other objects as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(jsonable(value), allow_nan=False, **kwargs)
