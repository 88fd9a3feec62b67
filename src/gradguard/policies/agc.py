"""AGC: unit-wise adaptive gradient clipping relative to the parameter norms (NFNets)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradguard._validation import check_threshold
from gradguard.engine.scaling import agc_coefficients
from gradguard.policies.base import StepNorms, ThresholdPolicy

__all__ = ["AGC"]


class AGC(ThresholdPolicy):
    """Unit-wise adaptive gradient clipping relative to parameter norms (NFNets).

    A policy like the others, of granularity ``"unit"``: :meth:`compute` receives the unit
    norms of the gradients and of the parameters in its :class:`StepNorms` and returns one
    coefficient per unit, by :func:`gradguard.clip_grad_agc_`'s rule. Stateless (a pure
    function of the unit norms). The recorded coefficient is the smallest unit
    coefficient of the step, the threshold NaN (there is one per unit).

    Args:
        clipping: the largest allowed ``||G_i|| / max(||W_i||, eps)`` per unit.
        eps: the floor on parameter norms.

    References:
        Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale Image Recognition
        Without Normalization", arXiv:2102.06171.
    """

    name = "agc"
    granularity = "unit"

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3) -> None:
        super().__init__()
        self.clipping = check_threshold(clipping, "clipping", positive=True)
        self.eps = check_threshold(eps, "eps")

    def config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps}

    def unit_coefficients(self, g_norms: list[Tensor], w_norms: list[Tensor]) -> list[Tensor]:
        """Coefficients per unit, shaped like ``g_norms`` (see
        :func:`gradguard.engine.scaling.agc_coefficients`)."""
        return agc_coefficients(g_norms, w_norms, self.clipping, self.eps)

    def compute(self, step: StepNorms) -> tuple[list[Tensor], Tensor]:
        """The unit coefficients of the step (one stacked tensor per unit group) and a NaN
        threshold.

        Raises:
            TypeError: if ``step`` carries no unit norms.
        """
        if step.unit_norms is None or step.param_unit_norms is None:
            raise TypeError("AGC clips unit-wise: StepNorms needs unit_norms and "
                            "param_unit_norms (the Guard measures them for a 'unit' policy)")
        threshold = torch.full((), math.nan, device=step.total.device)
        return self.unit_coefficients(step.unit_norms, step.param_unit_norms), threshold
