"""AdaGC: per-tensor adaptive clipping from each tensor's own EMA of clipped norms."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradguard._validation import check_fraction, check_int, check_threshold
from gradguard.engine.scaling import clip_coefficient, strict_clip_coefficient
from gradguard.policies.base import StepNorms, ThresholdPolicy

__all__ = ["AdaGC"]


class AdaGC(ThresholdPolicy):
    """Per-tensor adaptive clipping from each tensor's own EMA of clipped norms (AdaGC).

    Warm-up (the first ``warmup_steps`` finite steps): global-norm clipping at ``max_norm``,
    and ``gamma_i`` is the running minimum of each tensor's norm after that clip. Then, per
    tensor ``i``::

        coef_i  = rel * gamma_i / (||g_i|| + 1e-6)  if ||g_i|| > rel * gamma_i  else 1
        gamma_i <- beta * gamma_i + (1 - beta) * min(||g_i||, rel * gamma_i)

    The threshold uses the previous EMA, and the EMA takes the *clipped* norm. A tensor
    first seen after warm-up starts from its own norm. This is the official Megatron
    implementation's rule; non-finite steps update nothing. One deviation: a tensor whose
    gradient is exactly zero on a step is not observed on that step (the published rule
    would fold the 0 into the running minimum or the EMA, and then clip every later
    gradient of that tensor to zero, for good).

    Args:
        rel: the relative factor lambda_rel (default 1.05 as published; the released code
            uses 1.04).
        beta: EMA decay (default 0.98 as published; the released code uses 0.99).
        warmup_steps: steps of global clipping before per-tensor clipping (paper: 100).
        max_norm: the global threshold lambda_abs during warm-up (paper: 1.0).

    References:
        Wang, Li, Chen, Zeng, Yang, Yu, Ma & Shen 2025, "AdaGC: Improving Training Stability
        for Large Language Model Pretraining", arXiv:2502.11034.
    """

    name = "adagc"
    granularity = "tensor"

    def __init__(
        self, rel: float = 1.05, beta: float = 0.98, warmup_steps: int = 100,
        max_norm: float = 1.0,
    ) -> None:
        super().__init__()
        self.rel = check_threshold(rel, "rel", positive=True)
        self.beta = check_fraction(beta, "beta")
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", 0)
        self.max_norm = check_threshold(max_norm, "max_norm")

    def config(self) -> dict[str, Any]:
        return {"rel": self.rel, "beta": self.beta, "warmup_steps": self.warmup_steps,
                "max_norm": self.max_norm}

    def initial_state(self, num_tensors: int, device: torch.device) -> dict[str, Tensor]:
        return {
            "gamma": torch.zeros(num_tensors, device=device),
            "seen": torch.zeros(num_tensors, dtype=torch.bool, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
        }

    def compute(self, step: StepNorms) -> tuple[Tensor, Tensor]:
        norms = step.norms.float()
        present = step.present if step.present is not None else torch.ones_like(self.seen)
        # A zero gradient says nothing about a tensor's scale (a LoRA factor while its
        # partner is zero, a layer behind a zero-initialised head): folded into the
        # running minimum or the EMA it would pin the threshold at 0 for good.
        observe = present & step.finite & (norms > 0)
        warm = self.count < self.warmup_steps

        # Warm-up: global clipping; gamma tracks the minimum post-clip norm.
        g_thr = torch.full_like(step.total, self.max_norm)
        g_coef = clip_coefficient(g_thr, step.total)
        clipped = norms * g_coef.to(norms.dtype)
        warm_gamma = torch.where(self.seen, torch.minimum(self.gamma, clipped), clipped)

        # Per-tensor rule; tensors never seen start from their own norm.
        gamma = torch.where(self.seen, self.gamma, norms)
        thr = self.rel * gamma
        t_coef = strict_clip_coefficient(thr, norms)
        ema = self.beta * gamma + (1 - self.beta) * torch.minimum(norms, thr)

        self.gamma = torch.where(observe, torch.where(warm, warm_gamma, ema), self.gamma)
        self.seen = self.seen | observe
        self.count = self.count + step.finite.to(torch.int64)
        coef = torch.where(warm, g_coef.expand_as(t_coef), t_coef)
        # In warm-up the threshold applies to the total norm; it is reported per tensor.
        threshold = torch.where(warm, g_thr.expand_as(thr), thr)
        return coef, threshold
