"""Argument checks shared by the modules: each error names the argument and its value."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "check_clip_threshold",
    "check_fraction",
    "check_int",
    "check_open_interval",
    "check_str_sequence",
    "check_threshold",
]


def check_threshold(
    value: object, name: str, *, positive: bool = False, allow_inf: bool = False
) -> float:
    """Validate a clipping threshold: a real number, ``>= 0`` (``> 0`` if ``positive``).

    Args:
        value: the threshold given by the user.
        name: the argument name, for the error message.
        positive: reject zero as well.
        allow_inf: accept ``+inf`` (a threshold that never clips).

    Returns:
        ``value`` as a float.

    Raises:
        TypeError: if ``value`` is not a real number.
        ValueError: if it is NaN, negative (or zero when ``positive``), or infinite unless
            ``allow_inf``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)):
        raise ValueError(f"{name} must be {'a number or +inf' if allow_inf else 'finite'}, "
                         f"got {value!r}")
    if v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def check_clip_threshold(
    value: object, name: str, *, positive: bool = False
) -> float | torch.Tensor:
    """Validate the threshold of a stateless clipping function, accepting what torch accepts.

    A Python number is checked like :func:`check_threshold` (``+inf``, a threshold that
    never clips, is allowed). A one-element tensor (torch reads it with ``float()``) is
    accepted as well, but its *value* is not checked: on an accelerator that would need a
    host read, and a tensor threshold is what a sync-free caller passes. Tensor thresholds
    therefore behave exactly as in torch, everywhere: a negative one flips the gradients'
    sign, a NaN one gives NaN gradients. A CPU tensor is read on the host, which costs
    nothing; any other tensor stays on its device as a 0-d tensor.

    Args:
        value: the threshold given by the user.
        name: the argument name, for the error message.
        positive: reject zero as well (Python numbers only).

    Returns:
        A float, or a 0-d tensor on ``value``'s (non-CPU) device.

    Raises:
        TypeError: if ``value`` is neither a real number nor a real-valued tensor.
        ValueError: if a number is NaN, negative (or zero when ``positive``), or ``-inf``;
            if a tensor has more than one element.
    """
    if not isinstance(value, torch.Tensor):
        return check_threshold(value, name, positive=positive, allow_inf=True)
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be a real number or a real one-element tensor, got a "
                        f"{value.dtype} tensor")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of "
                         f"shape {tuple(value.shape)}")
    if value.device.type == "cpu":
        return float(value)  # host memory: reading it is free, as torch's float() does
    return value.detach().reshape(())


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


def check_open_interval(value: object, name: str, low: float, high: float) -> float:
    """Validate a real number strictly between ``low`` and ``high`` (NaN is refused).

    Args:
        value: the number given by the user.
        name: the argument name, for the error message.
        low: the exclusive lower bound (may be ``-inf``).
        high: the exclusive upper bound (may be ``inf``: then ``inf`` itself is refused).

    Returns:
        ``value`` as a float.

    Raises:
        TypeError: if ``value`` is not a real number.
        ValueError: if it is not in ``(low, high)``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not low < v < high:
        raise ValueError(f"{name} must be in ({low:g}, {high:g}), got {value!r}")
    return v


def check_str_sequence(value: object, name: str) -> list[str]:
    """Validate a sequence of str (not a str itself, which is a sequence of characters).

    Returns:
        The strings, as a new list.

    Raises:
        TypeError: if ``value`` is not a sequence or one of its items is not a str (naming
            the item, e.g. ``names[1]``).
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of str, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(item).__name__} {item!r}")
    return list(value)
