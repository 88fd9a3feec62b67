"""Which optimizer does the update: one answer for every reader of optimizer state.

Frameworks hand out wrappers around the torch optimizer (accelerate's
``AcceleratedOptimizer``, which the Hugging Face ``Trainer`` and ``accelerator.prepare``
return, keeps it as ``.optimizer``). The ``auto`` policy (its rule depends on the
optimizer's type and hyper-parameters) and the monitor's Adam-aware signals (they read
its state) both look through such wrappers here.
"""

from __future__ import annotations

import torch

__all__ = ["unwrap_optimizer"]

_MAX_DEPTH = 8  # wrappers of wrappers; a cycle of .optimizer references stops here


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer behind any wrappers that keep it as ``.optimizer``.

    Args:
        optimizer: a torch optimizer or a wrapper of one.

    Returns:
        The innermost torch optimizer reached through ``.optimizer`` attributes
        (``optimizer`` itself when it wraps nothing).
    """
    for _ in range(_MAX_DEPTH):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer
