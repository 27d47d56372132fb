"""Argument checks that fail with one clear line: the parameter, the value, what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def check_choice(param: str, value: T, allowed: Iterable[T]) -> T:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError``."""
    allowed = list(allowed)
    if value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{param}={value!r} is not supported; allowed: {names}")
    return value


def check_int(param: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` if it is an integer in ``[low, high]``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{param}={value!r} must be an integer{_range_text(low, high)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{param}={value!r} is out of range; allowed: an integer{_range_text(low, high)}")
    return value


def check_float(
    param: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as float if it is finite and lies in ``[low, high]`` (open at an end with ``low_open`` /
    ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{param}={value!r} must be a number")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or not math.isfinite(value):
        left = "(" if low_open or low is None else "["
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{param}={value!r} is out of range; allowed: a finite number in {left}{lo}, {hi}")
    return value


def check_same_shape(param: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``shape`` equals ``expected``."""
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{param} has shape {tuple(shape)}; expected {tuple(expected)}")


def _range_text(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""
