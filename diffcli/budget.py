"""`--budget`, the hard cap on stored update parameters that swr and basis read: a count, or a percentage of N."""

from __future__ import annotations

import math
import re

from diffcli.errors import InvalidValueError

_BUDGET = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*")


def parse_budget(text: str | None) -> tuple[str, float] | None:
    """'100000' → ('count', 100000); '0.5%' → ('fraction', 0.005); None stays None (the method's default)."""
    if text is None:
        return None
    m = _BUDGET.fullmatch(str(text))
    if not m:
        raise InvalidValueError(f"--budget {text!r} is not a parameter count (100000) or a percentage (0.5%)")
    value = float(m.group(1))
    if not math.isfinite(value):  # 309 digits or more
        raise InvalidValueError(f"--budget {text[:20]}... is too large a number of parameters")
    if m.group(2):
        if not 0 < value <= 100:
            raise InvalidValueError(f"--budget {text} must be a percentage in (0, 100]")
        return "fraction", value / 100
    if value != int(value):
        raise InvalidValueError(f"--budget {text} must be a whole number of parameters (or a percentage)")
    return "count", float(int(value))


def budget_count(text: str, n: int) -> int:
    """--budget as a number of parameters: the count itself, or round(fraction·n) (swr and basis both read it)."""
    kind, value = parse_budget(text)
    return round(value * n) if kind == "fraction" else int(value)
