"""A small checker for JSON-like report data: each method raises ValueError naming the field and the problem."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence


class Check:
    """Type and range checks; `where` is the dotted path of the field, used in the message."""

    @staticmethod
    def fail(where: str, what: str) -> None:
        raise ValueError(f"invalid report: {where} {what}")

    def dict(self, obj, where: str, keys: Sequence[str] = ()) -> Mapping:
        if not isinstance(obj, Mapping):
            self.fail(where, f"must be an object, got {type(obj).__name__}")
        for key in keys:
            if key not in obj:
                self.fail(f"{where}.{key}" if where else key, "is missing")
        return obj

    def list(self, obj, where: str) -> list:
        if not isinstance(obj, list):
            self.fail(where, f"must be a list, got {type(obj).__name__}")
        return obj

    def str(self, obj, where: str) -> str:
        if not isinstance(obj, str):
            self.fail(where, f"must be a string, got {type(obj).__name__}")
        return obj

    def bool(self, obj, where: str) -> bool:
        if not isinstance(obj, bool):
            self.fail(where, "must be true or false")
        return obj

    def int(self, obj, where: str, minimum: Optional[int] = None) -> int:
        if isinstance(obj, bool) or not isinstance(obj, int):
            self.fail(where, f"must be an integer, got {type(obj).__name__}")
        if minimum is not None and obj < minimum:
            self.fail(where, f"must be >= {minimum}, got {obj}")
        return obj

    def num(self, obj, where: str, nullable: bool = False) -> Optional[float]:
        if obj is None and nullable:
            return None
        if isinstance(obj, bool) or not isinstance(obj, (int, float)):
            self.fail(where, "must be a number" + (" or null" if nullable else "")
                      + f", got {type(obj).__name__}")
        if not math.isfinite(obj):
            self.fail(where, f"must be finite, got {obj}")
        return float(obj)

    def fraction(self, obj, where: str) -> Optional[float]:
        value = self.num(obj, where, nullable=True)
        if value is not None and not 0 <= value <= 1:
            self.fail(where, f"must lie in [0, 1], got {value}")
        return value

    def nums(self, obj, where: str, length: Optional[int] = None) -> list:
        self.list(obj, where)
        if length is not None and len(obj) != length:
            self.fail(where, f"must have {length} entries (one per sigma), got {len(obj)}")
        for i, v in enumerate(obj):
            self.num(v, f"{where}[{i}]", nullable=True)
        return obj

    def shape(self, obj, where: str) -> None:
        self.list(obj, where)
        if len(obj) != 3:
            self.fail(where, f"must be [C, H, W], got {len(obj)} entries")
        for i, v in enumerate(obj):
            self.int(v, f"{where}[{i}]", minimum=1)

    def curves(self, obj, where: str, keys: Sequence[str]) -> int:
        """A {"sigmas": [...], key: [...] per sigma} object; returns the number of sigmas."""
        self.dict(obj, where, ("sigmas",) + tuple(keys))
        sigmas = self.nums(obj["sigmas"], f"{where}.sigmas")
        for key in keys:
            self.nums(obj[key], f"{where}.{key}", len(sigmas))
        return len(sigmas)
