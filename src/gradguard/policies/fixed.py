"""A constant threshold on the total norm: torch's ``clip_grad_norm_`` rule as a policy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradguard._validation import check_threshold
from gradguard.engine.scaling import clip_coefficient
from gradguard.policies.base import StepNorms, ThresholdPolicy

__all__ = ["Fixed"]


class Fixed(ThresholdPolicy):
    """A constant threshold on the total norm: ``coef = min(1, max_norm / (norm + 1e-6))``.

    Exactly torch's ``clip_grad_norm_`` rule; there are no statistics.

    Args:
        max_norm: the threshold (finite, ``>= 0``).
    """

    name = "fixed"

    def __init__(self, max_norm: float) -> None:
        super().__init__()
        self.max_norm = check_threshold(max_norm, "max_norm")

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def compute(self, step: StepNorms) -> tuple[Tensor, Tensor]:
        threshold = torch.full_like(step.total, self.max_norm)
        return clip_coefficient(threshold, step.total), threshold
