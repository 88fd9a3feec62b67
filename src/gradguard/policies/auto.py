"""Auto: gradguard's default policy, a trust cap relative to the parameters and a spike cap."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradguard._validation import check_fraction, check_int, check_threshold
from gradguard.engine.norms import TensorGroups
from gradguard.engine.scaling import clip_coefficient
from gradguard.policies.base import StepNorms, ThresholdPolicy

__all__ = ["Auto", "sgd_effective_lr"]


def sgd_effective_lr(optimizers: Sequence[torch.optim.Optimizer]) -> float | None:
    """The largest steady-state step multiplier ``lr * (1 - dampening) / (1 - momentum)``
    over the param groups of SGD optimizers, or ``None`` if there is no SGD optimizer.

    For SGD the update is proportional to the gradient, so ``lr_eff * ||g||`` is the size
    of a step (momentum accumulates ``1 / (1 - momentum)`` steps of one gradient). Adaptive
    optimizers (Adam, RMSprop, Adagrad, ...) normalise the gradient: their step size does
    not grow with the gradient norm, and this function ignores them.
    """
    best: float | None = None
    for opt in optimizers:
        if not isinstance(opt, torch.optim.SGD):
            continue
        for group in opt.param_groups:
            lr = float(group["lr"])
            momentum = float(group.get("momentum", 0.0) or 0.0)
            dampening = float(group.get("dampening", 0.0) or 0.0)
            eff = lr * (1.0 - dampening) / (1.0 - momentum) if momentum < 1 else math.inf
            best = eff if best is None else max(best, eff)
    return best


def _trust_applies(lr_eff: float | None) -> bool:
    """Whether :class:`Auto`'s trust cap has a step size to be relative to (an SGD
    optimizer with a positive, finite effective learning rate; momentum 1 has none)."""
    return lr_eff is not None and 0 < lr_eff < math.inf


class Auto(ThresholdPolicy):
    """gradguard's default: no tuning, safe from step 0 and against rare spikes.

    The threshold is the smaller of two caps::

        threshold = min(trust, spike)

    **trust** (explosions, including from the first step; SGD-type optimizers). With an
    attached SGD optimizer, whose update is ``lr_eff * g`` with
    ``lr_eff = lr (1 - dampening) / (1 - momentum)``, the gradient norm is capped so that
    one (steady-state) step moves the parameters by at most a fraction ``rho`` of their
    norm::

        trust = rho * ||theta|| / lr_eff

    A global trust region (LARS applies the same ratio per layer): it needs no history, so
    it holds when the explosion is there from step 0, where ZClip and AutoClip learn their
    statistics from exploded norms; and it scales with the learning rate, where any fixed
    threshold is too loose at high rates and too tight at low ones. ``||theta||`` is
    refreshed every ``param_norm_every`` steps (one extra read of the parameters,
    amortised). Adaptive optimizers (Adam, RMSprop, Adagrad, ...) normalise the gradient,
    so their step does not grow with it: for them, when the Guard has no attached
    optimizer, and when the last refresh found every parameter zero (nothing to be
    relative to), the trust cap is off and the spike cap alone applies.

    **spike** (rare spikes in a healthy run). After ``warmup_steps`` finite steps::

        spike = spike_factor * exp(m),   m <- beta * m + (1 - beta) * log(clipped norm)

    an EMA of the log of the *clipped* norm, so a spike (or an explosion) cannot raise the
    baseline by more than ``(1 - beta) * log(spike_factor)`` per step, while a lasting
    change of the gradient scale is followed within ~``1 / (1 - beta)`` steps.

    How the defaults were chosen (``gradguard bench``, 300 SGD-momentum steps, learning
    rates 0.003-1, 1-3 seeds; scores are test accuracy for deep-mlp-digits, higher is
    better, and test MSE for adding-rnn and deep-linear, lower is better; "tuned" is
    torch's clip_grad_norm_ at the best single threshold of {0.1, 0.3, 1, 3, 10}):

    ==========  =================  ==========  ===========
    rho         deep-mlp-digits    adding-rnn  deep-linear
    ==========  =================  ==========  ===========
    0.0005      0.47               0.155
    0.001       0.53               0.143
    0.0015                         0.143       0.504
    **0.002**   0.55               0.152       0.416
    0.003       0.63               0.170       0.273
    0.004       0.68               0.167
    0.01        0.51               0.170
    tuned       0.44 (clip 0.1)    0.159       0.467
    ==========  =================  ==========  ===========

    (mean score over the six learning rates). With the trust cap binding, the score
    hardly depends on the learning rate. The chaotic RNN wants small steps, the deep
    linear network large ones; ``rho = 0.002`` is the value that beats ``tuned`` on all
    three. (An adaptive radius, halving ``rho`` whenever the norm doubled against its
    recent average and growing it 1 % per step otherwise, scored 0.29 on
    deep-mlp-digits and was dropped.) ``spike_factor`` between 3 and 10 changed no score
    by more than one seed's spread on the suite (spike-injection, charlm-postln); 5 puts
    the cap 1.6 in log units above the typical norm, i.e. 3-16 standard deviations of the
    step-to-step noise of healthy runs (0.1-0.5).

    Non-finite steps update nothing. Coefficients follow torch's rule,
    ``min(1, threshold / (norm + 1e-6))``.

    Args:
        rho: the largest relative parameter change per step allowed by the trust cap.
        spike_factor: how far above the running typical norm a norm is a spike (> 1).
        beta: EMA decay of the log norm.
        warmup_steps: finite steps before the spike cap is armed.
        param_norm_every: steps between refreshes of the parameter norm.

    References:
        You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks"
        (LARS trust ratio), arXiv:1708.03888. Pascanu, Mikolov & Bengio 2013, "On the
        difficulty of training recurrent neural networks" (norm clipping).
    """

    name = "auto"
    #: ``calls``: Guard steps seen (when to refresh the parameter norm);
    #: ``have_param_norm``: ``param_norm`` holds a measured value.
    host_state: ClassVar[Mapping[str, Any]] = {"calls": 0, "have_param_norm": False}

    def __init__(
        self,
        rho: float = 0.002,
        spike_factor: float = 5.0,
        beta: float = 0.98,
        warmup_steps: int = 20,
        param_norm_every: int = 100,
    ) -> None:
        super().__init__()
        self.rho = check_threshold(rho, "rho", positive=True)
        self.spike_factor = check_threshold(spike_factor, "spike_factor", positive=True)
        if self.spike_factor <= 1:
            raise ValueError(f"spike_factor must be > 1, got {spike_factor!r}")
        self.beta = check_fraction(beta, "beta")
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", 0)
        self.param_norm_every = check_int(param_norm_every, "param_norm_every", 1)

    def config(self) -> dict[str, Any]:
        return {"rho": self.rho, "spike_factor": self.spike_factor, "beta": self.beta,
                "warmup_steps": self.warmup_steps, "param_norm_every": self.param_norm_every}

    def initial_state(self, num_tensors: int, device: torch.device) -> dict[str, Tensor]:
        return {
            "log_ema": torch.zeros((), dtype=torch.float64, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "param_norm": torch.zeros((), device=device),  # valid once have_param_norm
        }

    def compute(self, step: StepNorms) -> tuple[Tensor, Tensor]:
        total = step.total
        threshold = torch.minimum(self._trust_cap(step), self._spike_cap(total))
        coef = clip_coefficient(threshold, total)
        self._update(total * coef, step.finite)
        return coef, threshold

    def _trust_cap(self, step: StepNorms) -> Tensor:
        """``rho * ||theta|| / lr_eff`` with an SGD-type optimizer, else ``inf``."""
        total = step.total
        inf = torch.full_like(total, math.inf)
        lr_eff = sgd_effective_lr(step.optimizers)
        if _trust_applies(lr_eff) and (step.params or step.param_norm is not None):
            if self._refresh_due():
                if step.param_norm is not None:  # computed by the Guard (one collective)
                    fresh = step.param_norm
                else:
                    with torch.no_grad():
                        fresh = torch.linalg.vector_norm(
                            TensorGroups(list(step.params)).norms(2.0))
                self.param_norm = fresh.to(total.device, total.dtype)
                self.have_param_norm = True
            param_norm = self.param_norm.to(total.dtype)
            # All-zero parameters (a zero-initialised model) give no scale to be relative
            # to: a cap of 0 would freeze them for good, so the trust cap is off until
            # the parameters have a norm.
            trust = torch.where(param_norm > 0, (self.rho / lr_eff) * param_norm, inf)  # type: ignore[operator]
        else:
            trust = inf
        self.calls += 1
        return trust

    def _spike_cap(self, total: Tensor) -> Tensor:
        """``spike_factor * exp(m)`` once armed, else ``inf``."""
        armed = self.count >= max(self.warmup_steps, 1)
        return torch.where(armed, self.spike_factor * torch.exp(self.log_ema).to(total.dtype),
                           torch.full_like(total, math.inf))

    def _update(self, clipped_norm: Tensor, finite: Tensor) -> None:
        """Fold the clipped norm of a finite step into the EMA of its log."""
        clipped = clipped_norm.clamp_min(1e-30).to(torch.float64).log()
        first = self.count == 0
        ema = torch.where(first, clipped, self.beta * self.log_ema + (1 - self.beta) * clipped)
        self.log_ema = torch.where(finite, ema, self.log_ema)
        self.count = self.count + finite.to(torch.int64)

    def _refresh_due(self) -> bool:
        return self.calls % self.param_norm_every == 0 or not self.have_param_norm

    def wants_param_norm(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Whether this step's :meth:`compute` needs ``||theta||`` (the Guard then supplies
        it in ``StepNorms.param_norm``, within its one collective when distributed)."""
        return _trust_applies(sgd_effective_lr(optimizers)) and self._refresh_due()
