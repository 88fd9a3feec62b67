"""Argument checks shared by the modules: each error names the argument and its value."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_fraction", "check_int", "check_threshold"]


def check_threshold(value: object, name: str, *, positive: bool = False) -> float:
    """Validate a clipping threshold: a finite real number, ``>= 0`` (``> 0`` if ``positive``).

    Args:
        value: the threshold given by the user.
        name: the argument name, for the error message.
        positive: reject zero as well.

    Returns:
        ``value`` as a float.

    Raises:
        TypeError: if ``value`` is not a real number.
        ValueError: if it is NaN, infinite, negative (or zero when ``positive``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def check_int(value: object, name: str, minimum: int = 0) -> int:
    """Validate an integer count ``>= minimum`` (``bool`` is not an int here).

    Raises:
        TypeError: if ``value`` is not an int.
        ValueError: if it is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_fraction(value: object, name: str) -> float:
    """Validate a decay or fraction in ``[0, 1)``.

    Raises:
        TypeError: if ``value`` is not a real number.
        ValueError: if it is outside ``[0, 1)``.
    """
    v = check_threshold(value, name)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return v
