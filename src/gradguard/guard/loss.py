"""The loss of one Guard step, accumulated over micro-batches on the device.

Under gradient accumulation several micro-batch losses make one optimizer step.
:class:`StepLoss` keeps their running sum on the device (no host read) and a host-side
count. IEEE arithmetic keeps what matters: a NaN or inf in any micro-batch makes the sum
non-finite, so a bad micro-batch is never hidden by the later ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["REDUCTIONS", "StepLoss"]

#: How the micro-batch losses of one step combine.
REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class StepLoss:
    """The losses observed since the last Guard step (immutable: :meth:`add` returns a new
    one, so a saved reference restores the accumulator exactly).

    Attributes:
        total: the sum of the observed values (a 0-d float32 device tensor).
        count: how many values were observed.
        reduction: ``"mean"`` (the step's loss is ``total / count``: each value is a
            micro-batch's own loss) or ``"sum"`` (``total``: each value is already the
            micro-batch's share of the step, e.g. divided by the accumulation count).
    """

    total: Tensor
    count: int
    reduction: str

    @staticmethod
    def first(value: Tensor, reduction: str) -> StepLoss:
        """The accumulator after the step's first value."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        return StepLoss(value, 1, reduction)

    def add(self, value: Tensor, reduction: str) -> StepLoss:
        """The accumulator with one more value (of the same ``reduction``)."""
        if reduction != self.reduction:
            raise ValueError(
                f"reduction={reduction!r}, but this step's losses so far were observed with "
                f"reduction={self.reduction!r}; use one reduction per step")
        return StepLoss(self.total + value, self.count + 1, reduction)

    def value(self) -> Tensor:
        """The step's loss, on the device; a non-finite one (NaN included) reads as inf,
        because NaN in the monitor means "no loss given"."""
        loss = self.total / self.count if self.reduction == "mean" else self.total
        return torch.where(torch.isnan(loss), math.inf, loss)
