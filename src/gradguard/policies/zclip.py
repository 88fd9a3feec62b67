"""ZClip: z-score clipping on EMA statistics of the total gradient norm."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradguard._validation import check_fraction, check_int, check_threshold
from gradguard.engine.scaling import NORM_EPS, clip_coefficient, strict_clip_coefficient
from gradguard.policies.base import StepNorms, ThresholdPolicy

__all__ = ["ZClip"]


class ZClip(ThresholdPolicy):
    """Z-score clipping on EMA statistics of the total norm (ZClip).

    Warm-up: the first ``warmup_steps`` finite norms are collected; their mean and
    population variance start the statistics; no z-score clipping happens before
    (``max_norm``, if set, still caps the norm). Afterwards, with ``s = sqrt(var)``::

        z = (g - mean) / (s + 1e-6)
        if z > z_thresh:  target = mean + z_thresh**2 * s / z     (the "reciprocal" rule)
        else:             target = g
        eff   = min(target, max_norm)
        coef  = eff / (g + 1e-6) if g > eff else 1
        mean <- alpha * mean + (1 - alpha) * target
        var  <- alpha * var + (1 - alpha) * (target - mean)**2    (the updated mean)

    This is the update of the reference implementation (``zclip`` 1.0.0, ``mode="zscore"``,
    ``clip_option="adaptive_scaling"``, ``clip_factor=1``) on every finite step. Where it
    differs, it is NaN-safety: a non-finite norm updates nothing (in the reference it makes
    mean and variance NaN forever, after which no spike is ever clipped), and the state is
    on the device (the reference calls ``.item()`` every step) and checkpointable.

    Args:
        alpha: EMA decay (paper: 0.97).
        z_thresh: z-score above which a norm is a spike (paper: 2.5).
        warmup_steps: finite steps collected before clipping starts (paper: 25).
        max_norm: optional absolute cap applied at every step, warm-up included. ``None``
            (default) is the paper's adaptive rule alone; the ``zclip`` package defaults to
            ``max_grad_norm=1.0``, which pass here to reproduce it.

    References:
        Kumar, Owen, Chowdhury & Güra 2025, "ZClip: Adaptive Spike Mitigation for LLM
        Pre-Training", arXiv:2504.02507.
    """

    name = "zclip"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = None,
    ) -> None:
        super().__init__()
        self.alpha = check_fraction(alpha, "alpha")
        self.z_thresh = check_threshold(z_thresh, "z_thresh", positive=True)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", 1)
        self.max_norm = None if max_norm is None else check_threshold(max_norm, "max_norm")

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh,
                "warmup_steps": self.warmup_steps, "max_norm": self.max_norm}

    def initial_state(self, num_tensors: int, device: torch.device) -> dict[str, Tensor]:
        return {
            "mean": torch.zeros((), dtype=torch.float64, device=device),
            "var": torch.zeros((), dtype=torch.float64, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "warmup": torch.zeros(self.warmup_steps, dtype=torch.float64, device=device),
        }

    def compute(self, step: StepNorms) -> tuple[Tensor, Tensor]:
        g = step.total.to(torch.float64)
        finite = step.finite
        active = self.count >= self.warmup_steps  # statistics exist: z-score clipping on

        # Warm-up: store the norm; when the buffer fills, start the statistics from it.
        slot = torch.clamp(self.count, max=self.warmup_steps - 1).reshape(1)
        collecting = finite & torch.logical_not(active)  # not ~: FakeTensorMode lacks it
        old = self.warmup.index_select(0, slot)
        self.warmup.index_copy_(0, slot, torch.where(collecting, g.reshape(1), old))
        w_mean = self.warmup.mean()
        w_var = (self.warmup - w_mean).square().mean()
        starts = collecting & (self.count == self.warmup_steps - 1)

        # Z-score rule (computed every step, kept only where active).
        std = self.var.sqrt()
        z = (g - self.mean) / (std + NORM_EPS)
        spike = z > self.z_thresh
        target = torch.where(spike, self.mean + self.z_thresh**2 * std / z, g)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * target
        new_var = self.alpha * self.var + (1 - self.alpha) * (target - new_mean).square()
        update = finite & active
        self.mean = torch.where(update, new_mean, torch.where(starts, w_mean, self.mean))
        self.var = torch.where(update, new_var, torch.where(starts, w_var, self.var))
        self.count = self.count + finite.to(torch.int64)

        nan = torch.full_like(g, math.nan)
        threshold = torch.where(active & spike, target, nan)
        if self.max_norm is not None:
            threshold = torch.fmin(threshold, torch.full_like(g, self.max_norm))
        threshold = threshold.to(step.total.dtype)
        # The reference clips with torch's clip_grad_norm_ in warm-up, then with its own
        # strict rule (scale only when the norm is above the threshold).
        coef = torch.where(active, strict_clip_coefficient(threshold, step.total),
                           clip_coefficient(threshold, step.total))
        return coef, threshold
