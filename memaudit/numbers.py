"""Small number helpers shared by the report, the gates and the metrics: finite-or-null and short formatting."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np


def finite_or_none(value: Any) -> Optional[float]:
    """float(value) if it is a finite number, else None (JSON null)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fmt(value: Any, digits: int = 4) -> str:
    """Short human-readable number ('n/a' for null / non-finite)."""
    v = finite_or_none(value)
    return "n/a" if v is None else f"{v:.{digits}g}"


def floats(values: Iterable[Any]) -> list[Optional[float]]:
    """A flat list of finite floats, None where a value is not finite."""
    return [finite_or_none(v) for v in np.asarray(values, dtype=np.float64).reshape(-1).tolist()]


def finite(values: Iterable[Any]) -> list[float]:
    """The finite values of an iterable, as floats."""
    return [v for v in (finite_or_none(x) for x in values) if v is not None]
