"""Checks at the Session's door: a wrong type is a TypeError naming the argument, a bad value a
ValueError naming the limit, before anything reaches the model.

    check_int("max_new_tokens", value, low=1, high=4096)
    check_number("temperature", value, low=0.0)
    check_text("question", value)
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from rgpt_rt import prompts


def check_int(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bound}; got {value}")
    return value


def check_number(name: str, value: Any, *, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number; got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large to be a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}; got {value}")
    return value


def check_text(name: str, value: Any, *, allow_empty: bool = False) -> str:
    """A str of valid Unicode (prompts.check_text), not blank unless allow_empty."""
    value = prompts.check_text(name, value)
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} is empty; give some text")
    return value


def check_optional_text(name: str, value: Any) -> str | None:
    return None if value is None else check_text(name, value)
