"""Auto: gradguard's default policy. With SGD-type optimizers a trust cap relative to the
parameters and a spike cap; with Adam-family optimizers a clip at the robust typical norm,
ramped in over the second moment's horizon, and a drop of spike steps."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradguard._optimizers import unwrap_optimizer
from gradguard._validation import check_fraction, check_int, check_threshold
from gradguard.engine.norms import TensorGroups
from gradguard.engine.scaling import clip_coefficient
from gradguard.policies.base import StepNorms, ThresholdPolicy

__all__ = ["ADAPTIVE_OPTIMIZERS", "Auto", "second_moment_decay", "sgd_effective_lr"]

#: The torch optimizers whose update is normalised by a running second moment with a decay
#: rate (``betas[1]``; RMSprop's ``alpha``): :class:`Auto` uses its adaptive rule with them,
#: and with third-party optimizers that carry Adam's ``betas`` (see
#: :func:`second_moment_decay`).
ADAPTIVE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.Adamax, torch.optim.RMSprop)


def sgd_effective_lr(optimizers: Sequence[torch.optim.Optimizer]) -> float | None:
    """The largest steady-state step multiplier ``lr * (1 - dampening) / (1 - momentum)``
    over the param groups of SGD optimizers, or ``None`` if there is no SGD optimizer.

    For SGD the update is proportional to the gradient, so ``lr_eff * ||g||`` is the size
    of a step (momentum accumulates ``1 / (1 - momentum)`` steps of one gradient). Adaptive
    optimizers (Adam, RMSprop, Adagrad, ...) normalise the gradient: their step size does
    not grow with the gradient norm, and this function ignores them.
    """
    best: float | None = None
    for opt in map(unwrap_optimizer, optimizers):
        if not isinstance(opt, torch.optim.SGD):
            continue
        for group in opt.param_groups:
            lr = float(group["lr"])
            momentum = float(group.get("momentum", 0.0) or 0.0)
            dampening = float(group.get("dampening", 0.0) or 0.0)
            eff = lr * (1.0 - dampening) / (1.0 - momentum) if momentum < 1 else math.inf
            best = eff if best is None else max(best, eff)
    return best


def second_moment_decay(optimizers: Sequence[torch.optim.Optimizer]) -> float | None:
    """The slowest second-moment decay ``beta2`` over the param groups of the attached
    Adam-family optimizers, or ``None`` when an SGD optimizer is attached (SGD's rule
    wins) or none of them is Adam-family.

    Adam-family: torch's :data:`ADAPTIVE_OPTIMIZERS` (RMSprop's ``alpha`` is its decay),
    and any other optimizer whose every param group has Adam's ``betas = (beta1, beta2)``
    and no ``momentum`` (bitsandbytes' 8-bit and paged AdamW, apex's FusedAdam and
    FusedLAMB, timm's and other libraries' Adam variants, Lion): ``beta2`` is read from
    ``betas``. Adagrad (no decay), Adafactor (no ``betas``) and optimizers with three or
    more betas (Adan) return ``None``.
    """
    if sgd_effective_lr(optimizers) is not None:
        return None
    best: float | None = None
    for opt in map(unwrap_optimizer, optimizers):
        for beta2 in _second_moment_decays(opt):
            best = beta2 if best is None else max(best, beta2)
    # a second moment that never decays (beta2 = 1) has no horizon to ramp over
    return best if best is not None and best < 1 else None


def _second_moment_decays(opt: torch.optim.Optimizer) -> list[float]:
    """Each param group's ``beta2`` if ``opt`` is Adam-family (see
    :func:`second_moment_decay`), else an empty list."""
    groups = opt.param_groups
    if isinstance(opt, torch.optim.RMSprop):
        return [float(group["alpha"]) for group in groups]
    if isinstance(opt, ADAPTIVE_OPTIMIZERS):
        return [float(group["betas"][1]) for group in groups]
    # third-party optimizers: Adam's (beta1, beta2) in every group, and no SGD momentum
    betas = [group.get("betas") for group in groups]
    if not groups or any("momentum" in group for group in groups) or not all(
            isinstance(b, (tuple, list)) and len(b) == 2
            and all(isinstance(x, numbers.Real) and 0 <= x < 1 for x in b) for b in betas):
        return []
    return [float(b[1]) for b in betas]  # type: ignore[index]


def _trust_applies(lr_eff: float | None) -> bool:
    """Whether :class:`Auto`'s trust cap has a step size to be relative to (an SGD
    optimizer with a positive, finite effective learning rate; momentum 1 has none)."""
    return lr_eff is not None and 0 < lr_eff < math.inf


class Auto(ThresholdPolicy):
    """gradguard's default: no tuning, safe from step 0 and against rare spikes.

    The rule depends on the attached optimizers: SGD-type (or none, or one that is neither
    SGD nor Adam-family), the two caps below; Adam-family (:data:`ADAPTIVE_OPTIMIZERS`
    and other libraries' optimizers with Adam's ``betas``, :func:`second_moment_decay`;
    with no SGD optimizer attached), the rule of the section "Adam-family optimizers".

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
    so their step does not grow with it: for Adagrad and other adaptive optimizers without
    a second-moment decay, when the Guard has no attached optimizer, and when the last
    refresh found every parameter zero (nothing to be relative to), the trust cap is off
    and the spike cap alone applies.

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

    **Adam-family optimizers** (Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, and other
    libraries' optimizers with Adam's ``betas``: see :func:`second_moment_decay`). Their update
    is normalised by a running second moment ``v`` (decay ``beta2``: ``betas[1]``,
    RMSprop's ``alpha``; the largest over the param groups). Up to ``eps`` the update
    does not depend on a constant scale of the gradients, so a clip matters only through
    how it re-weights steps inside Adam's moments: bringing an above-typical step down to
    the typical norm costs little, while a step k times too large multiplies ``v`` by
    ``beta2 + (1 - beta2) k**2`` (the next ~``ln(k**2) / (1 - beta2)`` updates shrink) and
    writes its direction into the momentum. The rule, with ``n`` the finite steps seen::

        typical   = exp(m),   m <- beta2 m + (1 - beta2) clamp(log ||g||, m -+ log s)
        threshold = typical_factor * min(1, (n + 1) / K) * typical,   K = 2 / (1 - beta2)
        coef      = 0  if ||g|| > s * typical (after warmup_steps), else torch's rule

    with ``s = spike_factor`` and ``m`` starting at the first finite step's log norm.

    * *typical*: a geometric running mean over the horizon of the optimizer's own second
      moment (the sum of Adam's ``v`` is the same EMA of ``||g||**2``), each step's
      contribution bounded to ``log s`` either side, so one spike moves it by at most a
      factor ``s ** (1 - beta2)``. Clipping at the typical norm (``typical_factor = 1``)
      is AdaGC's ``lambda_rel ~ 1`` on the global norm, and the global form of
      "gradient larger than the second moment expects" (SPAM's ``g**2 / v``,
      StableAdamW's update RMS): about a quarter of the steps are clipped, each to the
      weight of a typical step.
    * *ramp*: over the first ``K = min(2 / (1 - beta2), max_ramp_steps)`` steps (40 at
      ``beta2 = 0.95``), the untuned warm-up horizon of Ma & Yarats, the threshold rises
      linearly from ``typical / K``: the first gradients, the largest of a run and
      estimated by ``v`` from one, two, three samples (RAdam), enter Adam's moments with
      weight ``(n + 1) / K``, so ``v`` is not left inflated by them when the norm falls.
      This is what a fixed ``clip_grad_norm_(..., 1.0)`` does for a model whose early
      norms are above 1, without the unit. The ramp stops at ``max_ramp_steps`` (100 =
      ``2 / (1 - 0.98)``: the horizon follows ``beta2`` over the values of Transformer
      recipes, 0.95-0.98): while the bias-corrected ``v`` is still a plain average of the
      squares seen (``n << 1 / (1 - beta2)``), any rising threshold raises the update by
      up to ``sqrt(3)``, and with torch's default ``beta2 = 0.999`` a 2,000-step ramp
      would keep it raised for most of a short run.
    * *drop*: a step ``s`` (5) times the typical norm, the rare-event test of OLMo-core's
      skip-step rule and SPAM's spike detection, gets coefficient 0 -- a corrupted batch or
      a spike contributes nothing (Adam still applies its momentum and weight decay; a
      non-finite step is skipped whole by the Guard). A lasting rise of the norm is
      followed within ~``log(rise / s) / ((1 - beta2) log s)`` steps. The drop is armed
      after ``warmup_steps`` finite steps, like the SGD rule's spike cap: armed from the
      first step, it also dropped the genuinely large steps of early training and cost
      the clean ``gpt:preln`` runs 0.07 nats at lr 0.03 (5 seeds, every seed worse).

    Measured on ``gradguard bench --tasks transformer`` (a 2-block GPT, AdamW 0.9/0.95,
    learning rates 1e-3 - 0.1; ``results/transformer/table.md``), seed 0: without the
    ramp the mean validation loss over the grid was 0.04 nats worse on Pre-LN, and worse
    at 1e-3 and 3e-3 on every variant; a threshold at half the typical norm was worse on
    three variants of four (by up to 0.04); a typical-norm decay of 0.98 instead of
    ``beta2`` lost 0.01 on Pre-LN and bf16 and won 0.07 on Post-LN.

    With ``beta2 = 0.999`` (``charlm-postln``: Adam 0.9/0.999, no warm-up, a negative
    control where every method stalls at lr >= 0.01; 3 seeds x 6 learning rates) the
    mean score over the grid was 3.042 with the 100-step ramp, 3.050 with a 2,000-step
    ramp and 3.047 with the SGD-type rule; the stalled runs at lr 0.3 (val loss 3.205,
    as every method's) end above the loss cap with either ramp: 6/18 runs flagged
    diverged against 3/18 with the SGD-type rule.

    Non-finite steps update nothing. Coefficients follow torch's rule,
    ``min(1, threshold / (norm + 1e-6))``.

    Args:
        rho: the largest relative parameter change per step allowed by the trust cap.
        spike_factor: how far above the running typical norm a norm is a spike (> 1).
        beta: EMA decay of the log norm (SGD-type rule; the Adam-family rule uses the
            optimizer's ``beta2``).
        warmup_steps: finite steps before the spike cap (and the drop) is armed.
        param_norm_every: steps between refreshes of the parameter norm.
        typical_factor: the Adam-family threshold in units of the typical norm (> 0).
        drop_spikes: whether the Adam-family rule drops spikes (coefficient 0) instead of
            clipping them to the threshold.
        max_ramp_steps: the longest ramp of the Adam-family threshold, in finite steps.

    References:
        You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks"
        (LARS trust ratio), arXiv:1708.03888. Pascanu, Mikolov & Bengio 2013, "On the
        difficulty of training recurrent neural networks" (norm clipping). Kingma & Ba
        2015, "Adam", arXiv:1412.6980. Ma & Yarats 2019, "On the adequacy of untuned
        warmup for adaptive optimization", arXiv:1910.04209. Liu et al. 2019, "On the
        Variance of the Adaptive Learning Rate and Beyond" (RAdam), arXiv:1908.03265.
        Wang et al. 2025, "AdaGC", arXiv:2502.11034. Huang et al. 2025, "SPAM",
        arXiv:2501.06842. Wortsman et al. 2023, "Stable and low-precision training for
        large-scale vision-language models" (StableAdamW), arXiv:2304.13013. OLMo et al.
        2024, "2 OLMo 2 Furious", arXiv:2501.00656 (skip-step rule).
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
        typical_factor: float = 1.0,
        drop_spikes: bool = True,
        max_ramp_steps: int = 100,
    ) -> None:
        super().__init__()
        self.rho = check_threshold(rho, "rho", positive=True)
        self.spike_factor = check_threshold(spike_factor, "spike_factor", positive=True)
        if self.spike_factor <= 1:
            raise ValueError(f"spike_factor must be > 1, got {spike_factor!r}")
        self.beta = check_fraction(beta, "beta")
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", 0)
        self.param_norm_every = check_int(param_norm_every, "param_norm_every", 1)
        self.typical_factor = check_threshold(typical_factor, "typical_factor", positive=True)
        if not isinstance(drop_spikes, bool):
            raise TypeError(f"drop_spikes must be a bool, got {drop_spikes!r}")
        self.drop_spikes = drop_spikes
        self.max_ramp_steps = check_int(max_ramp_steps, "max_ramp_steps", 1)

    def config(self) -> dict[str, Any]:
        return {"rho": self.rho, "spike_factor": self.spike_factor, "beta": self.beta,
                "warmup_steps": self.warmup_steps, "param_norm_every": self.param_norm_every,
                "typical_factor": self.typical_factor, "drop_spikes": self.drop_spikes,
                "max_ramp_steps": self.max_ramp_steps}

    def initial_state(self, num_tensors: int, device: torch.device) -> dict[str, Tensor]:
        return {
            "log_ema": torch.zeros((), dtype=torch.float64, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "param_norm": torch.zeros((), device=device),  # valid once have_param_norm
        }

    def compute(self, step: StepNorms) -> tuple[Tensor, Tensor]:
        beta2 = second_moment_decay(step.optimizers)
        if beta2 is not None:
            return self._adaptive_compute(step, beta2)
        total = step.total
        threshold = torch.minimum(self._trust_cap(step), self._spike_cap(total))
        coef = clip_coefficient(threshold, total)
        self._update(total * coef, step.finite)
        return coef, threshold

    def _adaptive_compute(self, step: StepNorms, beta2: float) -> tuple[Tensor, Tensor]:
        """The rule for Adam-family optimizers (see the class docstring)."""
        total = step.total
        log_norm = total.to(torch.float64).clamp_min(1e-30).log()
        first = self.count == 0
        log_typical = torch.where(first, log_norm, self.log_ema)
        horizon = min(2.0 / (1.0 - beta2), float(self.max_ramp_steps))
        ramp = torch.clamp((self.count + 1).to(torch.float64) / horizon, max=1.0)
        threshold = (self.typical_factor * ramp * log_typical.exp()).to(total.dtype)
        coef = clip_coefficient(threshold, total)
        log_spike = math.log(self.spike_factor)
        if self.drop_spikes:
            spike = (log_norm > log_typical + log_spike) & (self.count >= max(self.warmup_steps, 1))
            coef = torch.where(spike, torch.zeros_like(coef), coef)
        # each step moves the typical norm by at most (1 - beta2) log(spike_factor) either way
        bounded = torch.minimum(torch.maximum(log_norm, log_typical - log_spike),
                                log_typical + log_spike)
        # over the horizon of the optimizer's own second moment
        ema = torch.where(first, log_norm, beta2 * log_typical + (1 - beta2) * bounded)
        self.log_ema = torch.where(step.finite, ema, self.log_ema)
        self.count = self.count + step.finite.to(torch.int64)
        self.calls += 1
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
