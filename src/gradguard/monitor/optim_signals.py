"""Adam-aware training-health signals, computed on the device from an optimizer's state.

At the step that completes a log interval the :class:`~gradguard.monitor.Monitor` asks an
:class:`OptimizerWatch` for three values per guarded parameter tensor, before the optimizer
steps (the Guard runs inside ``optimizer.step()``, ahead of the update), so that ``.grad``
holds the gradient the optimizer is about to consume and the state holds the moments of
the previous step:

``grad_v_rms`` -- how large the current gradient is relative to Adam's second moment:

    rms_j( g_j / (sqrt(v̂_{t-1,j}) + eps) ),   v̂_{t-1} = v_{t-1} / (1 - β2^(t-1))

over the tensor's entries ``j``. It is ~1 while the gradient's scale is what ``v``
remembers, below 1 while norms fall, and far above 1 when the gradient outgrows ``v`` (an
out-of-date second moment, the cause of loss spikes in Wortsman et al. 2023; the
"RMS spike" StableAdamW caps at 1). Chosen over SPAM's ``max_j g_j² / v_j`` because a
maximum over entries is one noisy coordinate whose healthy level grows with the tensor's
size (the maximum of n squared Gaussians is ~2 ln n), whereas the RMS has the same healthy
level (~1) for every tensor and is the quantity the update-clipping rules threshold. The
denominator is Adam's own (``sqrt(v̂) + eps``), so the value is the RMS, in units of the
learning rate, of the update this gradient alone would cause; ``v`` of the *previous* step
is used (not ``v_t``, which already contains ``g²`` and bounds the ratio by
``1/sqrt(1-β2)``), so a jump is not hidden by the gradient it measures.

``update_ratio`` -- the update-to-weight ratio of this step, ``||Δθ|| / ||θ||``, with
``Δθ`` the exact update the optimizer is about to apply, computed from the gradient, the
state and the group's hyper-parameters (bias corrections, AMSGrad, decoupled or L2 weight
decay, NAdam's momentum schedule, RAdam's rectification, Adamax's infinity norm,
``maximize``; a fused optimizer's GradScaler scale is divided out). Chosen over measuring
the parameter change because that needs a copy of every parameter (memory the size of the
model) held across the step; reconstructing it needs only a few temporaries the size of
one tensor, at one step per interval, and it equals the measured change up to fp32
rounding (the tests check it against real optimizer steps). Healthy Transformer runs sit
near 1e-3 (Karpathy's "update:data ratio"). Not included: a remedy's temporary learning-rate
factor, which the Guard applies around the step.

``update_ratio_per_lr`` -- the same divided by the group's learning rate: every term of
these updates is proportional to it, so this is what the detector watches (a warm-up or
decay schedule moves ``update_ratio`` but not this).

Supported: :class:`torch.optim.Adam`, :class:`~torch.optim.AdamW`, :class:`~torch.optim.NAdam`,
:class:`~torch.optim.RAdam`, :class:`~torch.optim.Adamax` and their subclasses (the
formulas of torch's classes; foreach, fused, capturable and differentiable variants keep
the same state). Other optimizers are not watched. A tensor without a gradient, without
optimizer state yet (before the first step), or with a zero weight norm gets NaN.

Under FSDP2 (DTensor parameters and state) the values are over this rank's local shard:
no collective, and the ranks' values may differ slightly.

Every value is a device tensor: no host read (the step counts, learning rates and betas
may be tensors and stay on their devices; CPU step counters enter as 0-d operands).

References:
    Wortsman et al., "Small-scale proxies for large-scale Transformer training
    instabilities", arXiv:2309.14322 (2023).
    Wortsman et al., "Stable and low-precision training for large-scale vision-language
    models" (StableAdamW), arXiv:2304.13013 (2023).
    Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
    arXiv:2501.06842 (2025); "Stable-SPAM", arXiv:2502.17055 (2025).
    Shazeer & Stern, "Adafactor", arXiv:1804.04235 (2018), section 6.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard._optimizers import unwrap_optimizer

__all__ = ["SIGNALS", "OptimizerWatch", "adam_family", "tensor_signals"]

#: The rows an :class:`OptimizerWatch` computes, one value per guarded tensor each.
SIGNALS: tuple[str, ...] = ("grad_v_rms", "update_ratio", "update_ratio_per_lr")


def adam_family(optimizer: Any) -> str | None:
    """The update rule of ``optimizer``: ``"adam"`` (Adam, AdamW), ``"nadam"``, ``"radam"``,
    ``"adamax"``, or ``None`` for an optimizer this module does not read."""
    optim = torch.optim
    for cls, name in ((optim.NAdam, "nadam"), (optim.RAdam, "radam"),
                      (optim.Adamax, "adamax"), (optim.Adam, "adam")):
        if isinstance(optimizer, cls):
            return name
    return None


def _real(x: Tensor) -> Tensor:
    """This rank's real values of ``x``, in fp32 at least (float64 stays float64).

    A DTensor (FSDP2) gives its local shard: the signals are then over this rank's shard,
    with no collective (a norm of the DTensor itself would all-reduce, tensor by tensor).
    """
    to_local = getattr(x, "to_local", None)
    if to_local is not None:
        x = to_local()
    x = torch.view_as_real(x) if torch.is_complex(x) else x
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _has_weight_decay(wd: Any) -> bool:
    # a tensor weight decay is taken as non-zero (comparing it would read it)
    return isinstance(wd, Tensor) or wd != 0


def _grad_v_rms(g: Tensor, v: Tensor, beta2: Any, step: Tensor, eps: Any) -> Tensor:
    """rms(g / (sqrt(v_hat) + eps)) with the previous step's bias-corrected ``v``
    (NaN before the first step: 0/0)."""
    denom = v.div(1 - beta2 ** step).sqrt_().add_(eps)
    return torch.linalg.vector_norm(denom.reciprocal_().mul_(g)) / math.sqrt(max(g.numel(), 1))


def _moments(g: Tensor, m: Tensor, v: Tensor, beta1: Any, beta2: Any) -> tuple[Tensor, Tensor]:
    """This step's raw moments, in new tensors (the optimizer's state is not touched)."""
    m_t = m.lerp(g, 1 - beta1)
    if isinstance(beta2, Tensor):
        return m_t, v * beta2 + (1 - beta2) * g.square()
    return m_t, v.mul(beta2).addcmul_(g, g, value=1 - beta2)


def _adam(g: Tensor, theta: Tensor, st: Mapping[str, Any], group: Mapping[str, Any],
          step: Tensor) -> tuple[Tensor, Tensor]:
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    m, v = _real(st["exp_avg"]), _real(st["exp_avg_sq"])
    ratio = _grad_v_rms(g, v, beta2, step, eps)
    t = step + 1
    m_t, v_t = _moments(g, m, v, beta1, beta2)
    if group.get("amsgrad", False):
        v_t = torch.maximum(_real(st["max_exp_avg_sq"]), v_t)
    # in place on the new tensors: m_hat / (sqrt(v_t) / sqrt(bc2) + eps), as torch does
    denom = v_t.sqrt_().div_((1 - beta2 ** t).sqrt()).add_(eps)
    direction = m_t.div_(denom).div_(1 - beta1 ** t)
    return ratio, direction


def _nadam(g: Tensor, theta: Tensor, st: Mapping[str, Any], group: Mapping[str, Any],
           step: Tensor) -> tuple[Tensor, Tensor]:
    beta1, beta2 = group["betas"]
    eps, psi = group["eps"], group["momentum_decay"]
    m, v = _real(st["exp_avg"]), _real(st["exp_avg_sq"])
    ratio = _grad_v_rms(g, v, beta2, step, eps)
    t = step + 1
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    mu_product = _real(st["mu_product"]) * mu
    m_t, v_t = _moments(g, m, v, beta1, beta2)
    denom = (v_t / (1 - beta2 ** t)).sqrt() + eps
    direction = (g * ((1 - mu) / (1 - mu_product))
                 + m_t * (mu_next / (1 - mu_product * mu_next))) / denom
    return ratio, direction


def _radam(g: Tensor, theta: Tensor, st: Mapping[str, Any], group: Mapping[str, Any],
           step: Tensor) -> tuple[Tensor, Tensor]:
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    m, v = _real(st["exp_avg"]), _real(st["exp_avg_sq"])
    ratio = _grad_v_rms(g, v, beta2, step, eps)
    t = step + 1
    m_t, v_t = _moments(g, m, v, beta1, beta2)
    bc2 = 1 - beta2 ** t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2 ** t / bc2
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
            / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp(min=0).sqrt()
    adaptive = bc2.sqrt() / (v_t.sqrt() + eps)
    # RAdam falls back to un-adapted momentum SGD while the variance is intractable
    scale = torch.where(rho_t > 5.0, rect * adaptive, torch.ones_like(adaptive))
    direction = m_t / (1 - beta1 ** t) * scale
    return ratio, direction


def _adamax(g: Tensor, theta: Tensor, st: Mapping[str, Any], group: Mapping[str, Any],
            step: Tensor) -> tuple[Tensor, Tensor]:
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    m, u = _real(st["exp_avg"]), _real(st["exp_inf"])
    # Adamax's denominator is its infinity norm u (eps inside)
    ratio = torch.linalg.vector_norm(g / u) / math.sqrt(max(g.numel(), 1))
    t = step + 1
    m_t = m.lerp(g, 1 - beta1)
    u_t = torch.maximum(u * beta2, g.abs() + eps)
    direction = m_t / (1 - beta1 ** t) / u_t
    return ratio, direction


_RULES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "adam": _adam, "nadam": _nadam, "radam": _radam, "adamax": _adamax,
}
# Which families may decouple weight decay (group["decoupled_weight_decay"]).
_DECOUPLABLE = ("adam", "nadam", "radam")


@torch.no_grad()
def tensor_signals(
    family: str, param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any],
    *, grad_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The signals of one parameter tensor (:data:`SIGNALS`), as fp32 0-d device tensors.

    Args:
        family: the update rule (:func:`adam_family`).
        param: the parameter; ``param.grad`` is the gradient the optimizer will consume.
        state: the optimizer's state for ``param`` (before this step).
        group: its param group (``lr``, ``betas``, ``eps``, ``weight_decay``, ...).
        grad_scale: a GradScaler's scale still in the gradient (fused optimizers), or None.

    Returns:
        ``(grad_v_rms, update_ratio, update_ratio_per_lr)``; ``None`` when the tensor has
        no gradient or no state yet. Entries are NaN where undefined (a zero weight norm,
        a state at step 0).

    Raises:
        ValueError: for an unknown ``family``.
    """
    if family not in _RULES:
        raise ValueError(f"family must be one of {tuple(_RULES)}, got {family!r}")
    grad = param.grad
    if grad is None or "step" not in state:
        return None
    g = _real(grad.detach())
    if grad_scale is not None:
        g = g / grad_scale
    if group.get("maximize", False):
        g = -g
    theta = _real(param.detach())
    step = state["step"]
    if hasattr(step, "to_local"):
        step = step.to_local()
    if not isinstance(step, Tensor):
        step = torch.tensor(float(step))
    wd = group.get("weight_decay", 0)
    decoupled = family in _DECOUPLABLE and bool(group.get("decoupled_weight_decay", False))
    decay = _has_weight_decay(wd)
    if decay and not decoupled:  # L2 penalty: part of the gradient the moments see
        g = g + wd * theta
    # Bias corrections such as 1 - 0.999**t lose digits in fp32: on the CPU (where torch
    # computes them in double on the host) take them in float64, as the optimizer does.
    step = step.double() if step.device.type == "cpu" else step.float()
    ratio, direction = _RULES[family](g, theta, state, group, step)
    if decay and decoupled:
        direction = direction.add_(wd * theta)
    # NaN before the first step (no second moment yet); an additive mask because the
    # step counter may be a CPU scalar while the values are on an accelerator
    ratio = ratio + torch.where(step > 0, 0.0, math.nan)
    weight = torch.linalg.vector_norm(theta)
    per_lr = torch.linalg.vector_norm(direction) / weight
    per_lr = torch.where(weight > 0, per_lr, torch.full_like(per_lr, math.nan))
    return ratio, per_lr * group["lr"], per_lr


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when the index is left open."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class OptimizerWatch:
    """Which guarded tensor each watched Adam-family optimizer updates, and the signals.

    The optimizers are held by weak reference and their param groups looked up at each
    :meth:`compute`, so learning-rate schedules are seen; call :meth:`add` again after
    ``add_param_group``.

    Args:
        n: the number of guarded tensors (the monitor's per-tensor columns).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
        >>> watch = OptimizerWatch(1)
        >>> watch.add(opt, [w])
        1
        >>> w.grad = torch.ones(3); opt.step(); w.grad = torch.ones(3)
        >>> values = watch.compute(torch.device("cpu"))  # (3 signals, 1 tensor)
        >>> [round(x, 4) for x in values[:, 0].tolist()]  # g/sqrt(v) = 1; update 0.1/0.9
        [1.0, 0.1111, 1.1111]
    """

    def __init__(self, n: int) -> None:
        self.n = n
        # per tensor: (weakref to the optimizer, group index, parameter, family) or None
        self._slots: list[tuple[weakref.ref, int, Tensor, str] | None] = [None] * n

    @property
    def watched(self) -> int:
        """How many guarded tensors a watched optimizer updates."""
        return sum(s is not None for s in self._slots)

    def add(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> int:
        """Watch ``optimizer`` for the tensors of ``params`` it updates.

        Args:
            optimizer: a torch optimizer, or a wrapper holding one as ``.optimizer``
                (accelerate); one that :func:`adam_family` does not know is ignored.
            params: the guarded tensors, in the order of the monitor's columns.

        Returns:
            How many of ``params`` this optimizer updates (0 when it is not Adam-family).

        Raises:
            TypeError: if ``optimizer`` is not a ``torch.optim.Optimizer``.
            ValueError: if ``params`` does not have one tensor per column.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        params = list(params)
        if len(params) != self.n:
            raise ValueError(f"params must have {self.n} tensors (one per name), got "
                             f"{len(params)}")
        # accelerate's wrapper: read the inner optimizer's state and hyper-parameters
        optimizer = unwrap_optimizer(optimizer)
        family = adam_family(optimizer)
        if family is None:
            return 0
        where = {id(p): i for i, p in enumerate(params)}
        ref = weakref.ref(optimizer)
        count = 0
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                i = where.get(id(p))
                if i is not None:
                    self._slots[i] = (ref, gi, params[i], family)
                    count += 1
        return count

    def compute(self, device: torch.device) -> Tensor:
        """The signals of every guarded tensor, without any host read.

        Args:
            device: where the result goes (the monitor's buffer).

        Returns:
            A ``(len(SIGNALS), n)`` fp32 tensor on ``device``; NaN for tensors no watched
            optimizer updates, without gradient or without state.
        """
        nan = torch.full((), math.nan, device=device)
        values: list[list[Tensor]] = [[nan] * self.n for _ in SIGNALS]
        for i, slot in enumerate(self._slots):
            if slot is None:
                continue
            ref, gi, param, family = slot
            optimizer = ref()
            if optimizer is None or gi >= len(optimizer.param_groups):
                continue
            found = tensor_signals(
                family, param, optimizer.state.get(param, {}), optimizer.param_groups[gi],
                grad_scale=getattr(optimizer, "grad_scale", None))
            if found is None:
                continue
            for row, value in zip(values, found, strict=True):
                value = value.float().reshape(())
                # non_blocking: a copy between devices must not wait for the host
                row[i] = value if _same_device(value.device, device) else value.to(
                    device, non_blocking=True)
        return torch.stack([torch.stack(row) for row in values])
