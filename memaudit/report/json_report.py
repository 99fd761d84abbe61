"""report.json: sorted keys, indent 2, floats rounded to 6 significant digits, NaN/inf -> null.

The same report always serialises to the same bytes, and re-writing a loaded report is a no-op. Every report
is validated before it is written.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from memaudit.atomic import write_text_atomic
from memaudit.report.schema import validate_report

SIGNIFICANT_DIGITS = 6


def _round(value: float) -> float | None:
    if not math.isfinite(value):
        return None
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types with floats rounded to 6 significant digits and non-finite floats as None.

    Accepts numpy scalars/arrays, torch tensors, tuples and Paths as well.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        return _round(float(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # torch.Tensor without importing torch here
    if callable(tolist):
        return to_jsonable(tolist())
    raise TypeError(f"cannot serialise {type(obj).__name__} into the report")


def dumps_report(report: dict) -> str:
    """The report's canonical JSON text (ends with a newline)."""
    return json.dumps(to_jsonable(report), sort_keys=True, indent=2, ensure_ascii=False,
                      allow_nan=False) + "\n"


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Check the report against its schema (a report that fails is a bug, never written), then write it
    atomically as canonical JSON."""
    validate_report(json.loads(dumps_report(report)))
    write_text_atomic(path, dumps_report(report))
