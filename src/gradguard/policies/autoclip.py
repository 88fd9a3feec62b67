"""AutoClip: clip at a percentile of past gradient norms, over a bounded window."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradguard._validation import check_int, check_threshold
from gradguard.engine.scaling import clip_coefficient
from gradguard.policies.base import StepNorms, ThresholdPolicy

__all__ = ["AutoClip"]


class AutoClip(ThresholdPolicy):
    """Clip at the p-th percentile of past gradient norms (AutoClip).

    The rule of the reference implementation: append the current (pre-clip) total norm to
    the history, then clip at ``percentile(history, p)`` with numpy's linear
    interpolation. On the first step the threshold is the norm itself, so the gradient
    is left as it is up to torch's ``1e-6`` (a norm of ``1e-6`` would be halved).

    Differences from the original, both deliberate:

    * The history is a ring buffer of the last ``window`` finite norms on the device, not
      every norm since step 0, so memory and time per step are bounded (a sort of
      ``window`` floats) and the threshold follows the run as the norm drifts. With
      ``window`` larger than the run it is the original rule.
    * Non-finite norms are never added (the original appends them, after which
      ``np.percentile`` returns NaN and ``clip_grad_norm_`` zeroes or NaNs the gradients).

    Args:
        percentile: p in ``[0, 100]`` (the paper recommends 10).
        window: how many past finite norms are kept (``>= 1``).

    References:
        Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for
        Source Separation Networks", IEEE MLSP, arXiv:2007.14469.
    """

    name = "autoclip"

    def __init__(self, percentile: float = 10.0, window: int = 1000) -> None:
        super().__init__()
        p = check_threshold(percentile, "percentile")
        if p > 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        self.percentile = p
        self.window = check_int(window, "window", 1)

    def config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "window": self.window}

    def initial_state(self, num_tensors: int, device: torch.device) -> dict[str, Tensor]:
        return {
            "history": torch.full((self.window,), math.nan, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
        }

    def compute(self, step: StepNorms) -> tuple[Tensor, Tensor]:
        total = step.total.float()
        slot = torch.remainder(self.count, self.window).reshape(1)
        old = self.history.index_select(0, slot)
        self.history.index_copy_(0, slot, torch.where(step.finite, total.reshape(1), old))
        self.count += step.finite.to(torch.int64)
        # NaN marks empty slots: nanquantile uses numpy's linear interpolation over the rest.
        threshold = torch.nanquantile(self.history, self.percentile / 100.0)
        return clip_coefficient(threshold, step.total), threshold
