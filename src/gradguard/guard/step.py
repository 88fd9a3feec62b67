"""One Guard step, read top to bottom: measure -> decide -> apply -> record.

* **measure** -- the norms of every gradient present (one foreach norm per device and
  dtype group, fp32 accumulation), the total, a non-finite flag, the loss, and what the
  policy asked for (unit norms, the parameter norm): one :class:`StepStats`, the same on
  every rank (:meth:`GuardSync.measure <gradguard.guard.sync.GuardSync.measure>`: one
  collective with several ranks, none alone).
* **decide** -- skip (``nonfinite="skip"``: the one host read of the step) or raise; else
  the policy turns the statistics into coefficients, on the device.
* **apply** -- the gradients are scaled once, by granularity: one coefficient for all, one
  per tensor, or one per unit.
* **record** -- the counters, the :attr:`GuardStep.last` record and one row of the
  monitor's device buffer; every ``log_every`` steps the monitor flushes an interval.

The fifth phase, **act**, belongs to the Guard (:mod:`gradguard.guard.guard`): the remedies
decide from the step's outcome and the interval, and the Guard applies their action.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradguard.engine.norms import TensorGroups
from gradguard.engine.scaling import mul_
from gradguard.engine.units import UnitNorms
from gradguard.monitor.detectors import describe_origin
from gradguard.monitor.record import FIELDS, Interval
from gradguard.policies.base import StepNorms, ThresholdPolicy

if TYPE_CHECKING:
    from gradguard.guard.sync import GuardSync
    from gradguard.monitor.monitor import Monitor

__all__ = ["COUNTERS", "GuardStep", "NonFiniteGradientError", "StepResult", "StepStats"]

#: The Guard's exact counters, in the order of :attr:`GuardStep.counters`.
COUNTERS = ("steps", "clipped", "nonfinite", "skipped")


class NonFiniteGradientError(RuntimeError):
    """Raised by ``Guard(nonfinite="raise")`` when a gradient contains NaN or inf."""


@dataclass
class StepStats(StepNorms):
    """The statistics of one step, from measurement to record (all tensors on the Guard's
    device). It *is* what the policy sees (:class:`~gradguard.policies.base.StepNorms`:
    ``norms``, ``total``, ``finite``, ...), and grows as the step goes on.

    Attributes:
        step: the step number.
        grads_finite: 0-d bool: the gradients were finite (on every rank); ``finite`` is
            that and no GradScaler overflow: what the policy may learn from.
        overflow: 0-d bool: a fused optimizer's GradScaler overflow (on any rank), or
            ``None``.
        loss: the step's loss (the ranks' mean), or ``None`` when none was observed.
        codes: per-rank evidence codes (several ranks only; see
            :mod:`gradguard.guard.sync`).
        units: the unit grouping of the present gradients (``"unit"`` policies).
        unit_plan: how unit summaries combine across ranks (several ranks only).
        index: the positions of the present gradients among the guarded parameters, on
            the device (``None`` when all are present).
        coef, threshold, post, clipped, nonfinite, skipped: what was decided and applied
            (``coef`` of a ``"unit"`` policy: one stacked tensor per unit group until
            :meth:`GuardStep.apply` summarises it).
        record: the values recorded, by :data:`~gradguard.monitor.record.FIELDS` name.
    """

    step: int = 0
    grads_finite: Tensor | None = None
    overflow: Tensor | None = None
    loss: Tensor | None = None
    codes: Tensor | None = None
    units: UnitNorms | None = None
    unit_plan: Any = None
    index: Tensor | None = None
    coef: Any = None
    threshold: Tensor | None = None
    post: Tensor | None = None
    clipped: Tensor | None = None
    nonfinite: Tensor | None = None
    skipped: Tensor | None = None
    record: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class StepResult:
    """What a step came to, for the Guard's act phase.

    Attributes:
        stats: the step's statistics, or ``None`` when nothing was recorded (no gradient
            at all, or a GradScaler overflow, which is the scaler's to skip).
        proceed: whether the optimizer should step.
        skipped: why the step was skipped (``"nonfinite"``, ``"rollback"``), else ``None``.
        interval: the monitor interval this step completed, if any.
        found_inf: a step decided on the device (fused optimizers): the 0-d float32
            flag to hand the optimizer (1: skip the update, 0: update), else ``None``.
    """

    stats: StepStats | None
    proceed: bool
    skipped: str | None = None
    interval: Interval | None = None
    found_inf: Tensor | None = None


class GuardStep:
    """The Guard's step machinery (see the module docstring), built by the Guard.

    Args:
        params: the guarded parameters.
        names: their names.
        policy: the threshold policy, or ``None`` (monitor only).
        nonfinite: ``"skip"``, ``"zero"``, ``"raise"`` or ``"ignore"``.
        norm_type: the order of the norms.
        scaler: the GradScaler of an explicit ``Guard.step()`` loop, or ``None``.
        sync: the synchroniser (a world of size 1 without ``torch.distributed``).
        monitor: the monitor, or ``None``.
        device: the device of the statistics (the first parameter's).

    Attributes:
        counters: exact counts (:data:`COUNTERS`), an int64 device tensor.
        last: the last recorded step's statistics, or ``None``.
    """

    def __init__(
        self, params: Sequence[Tensor], names: Sequence[str], policy: ThresholdPolicy | None,
        *, nonfinite: str, norm_type: float, scaler: Any, sync: GuardSync,
        monitor: Monitor | None, device: torch.device,
    ) -> None:
        self.params, self.names = list(params), list(names)
        self.policy = policy
        self.nonfinite, self.norm_type, self.scaler = nonfinite, norm_type, scaler
        self.sync, self.monitor, self.device = sync, monitor, device
        self.counters = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
        self.last: StepStats | None = None

    # ----------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self, step: int, *, loss: Tensor | None, optimizers: Sequence[torch.optim.Optimizer],
        grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
        scaled: bool = False, on_device: bool = False,
    ) -> StepResult:
        """Measure, decide, apply and record one step.

        Args:
            step: the step number.
            loss: this rank's loss observed since the last step, or ``None``.
            optimizers: the attached optimizers (policies may read them).
            grad_scale, found_inf: a fused optimizer's GradScaler attributes.
            scaled: the gradients were just unscaled by a GradScaler that the update
                goes through (accelerate): non-finite gradients are its overflow, which
                it skips itself (``proceed=True``, nothing recorded).
            on_device: ``nonfinite="skip"`` without the host read: the step is
                recorded whatever it holds, and :attr:`StepResult.found_inf` carries the
                skip to a fused optimizer.

        Raises:
            NonFiniteGradientError: with ``nonfinite="raise"`` on a non-finite step.
        """
        grads = [p.grad for p in self.params]
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            self.sync.discard()
            return StepResult(None, proceed=True)
        groups = TensorGroups([grads[i] for i in present], what="parameters[{}].grad")
        if groups.partial and (self.policy is not None or self.nonfinite == "zero"):
            groups.writable()  # raises: clipping would miss the pending sum
        stats = self.measure(groups, present, loss=loss, optimizers=optimizers,
                             grad_scale=grad_scale, found_inf=found_inf)
        stats.step = step
        if on_device:
            return self._skip_on_device(step, stats, groups)
        if self.nonfinite in ("skip", "raise") or self.scaler is not None or scaled:
            assert stats.grads_finite is not None
            if not bool(stats.grads_finite):  # the one host read of these modes
                if self.scaler is not None or found_inf is not None or scaled:
                    # The GradScaler skips this step and lowers its scale: not an
                    # observation, not an event. (A fused optimizer skips it by itself.)
                    return StepResult(None, proceed=found_inf is not None or scaled)
                return self._skip_nonfinite(step, stats)
        self.decide(stats, found_inf=found_inf)
        self.apply(stats, groups)
        return StepResult(stats, proceed=True, interval=self.record(step, stats))

    def _skip_on_device(self, step: int, stats: StepStats, groups: TensorGroups) -> StepResult:
        """``nonfinite="skip"`` for fused optimizers, with no host read: the policy and
        the clipping run as on a finite step (the statistics learn nothing from a
        non-finite one), the record marks the step skipped where it was non-finite, and
        the optimizer gets the flag as ``found_inf``."""
        self.decide(stats, finite_only=True)
        self.apply(stats, groups, finite_only=True)
        bad = stats.nonfinite
        assert bad is not None
        nan = torch.full((), math.nan, device=self.device)
        stats.post = torch.where(bad, nan, stats.post)
        stats.threshold = torch.where(bad, nan, stats.threshold)
        stats.coef = torch.where(bad, nan, stats.coef)
        stats.skipped = bad
        flag = bad.to(torch.float32).reshape(())  # GradScaler's found_inf: 0-d float32
        return StepResult(stats, proceed=True, interval=self.record(step, stats),
                          found_inf=flag)

    def measure(
        self, groups: TensorGroups, present: list[int], *, loss: Tensor | None,
        optimizers: Sequence[torch.optim.Optimizer], grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> StepStats:
        """The step's statistics, per guarded parameter (0 where a gradient is absent)."""
        params = self.params
        policy = self.policy
        want_param_norm = policy is not None and policy.wants_param_norm(optimizers)
        stats = self.sync.measure(
            groups, [params[i] for i in present], policy=policy, loss=loss,
            grad_scale=grad_scale, found_inf=found_inf, repair=self.nonfinite == "zero",
            all_params=params if want_param_norm else None)
        if len(present) < len(params):
            index = self.sync.cache.index(present, self.device)
            norms = torch.zeros(len(params), device=self.device)
            stats.norms = norms.index_copy(0, index, stats.norms)
            mask = torch.zeros(len(params), dtype=torch.bool, device=self.device)
            stats.present, stats.index = mask.index_fill(0, index, True), index
        stats.params, stats.optimizers = params, tuple(optimizers)
        grads_finite = stats.grads_finite
        assert grads_finite is not None
        if stats.overflow is not None:  # fused optimizer under GradScaler: its call
            ok = torch.logical_not(stats.overflow)  # logical_not, not ~: FakeTensorMode
            stats.finite = grads_finite & ok
            stats.nonfinite = torch.logical_not(grads_finite) & ok
        else:
            stats.finite, stats.nonfinite = grads_finite, torch.logical_not(grads_finite)
        return stats

    def decide(self, stats: StepStats, *, found_inf: Tensor | None = None,
               finite_only: bool = False) -> None:
        """The policy's coefficients and threshold (statistics updated on finite steps).

        ``finite_only`` (or a GradScaler's ``found_inf``): the step may be non-finite
        and is not skipped on the host: coefficients are 1 where it is.
        """
        policy = self.policy
        if policy is None:
            stats.coef = torch.ones((), device=self.device)
            stats.threshold = torch.full((), math.nan, device=self.device)
            return
        policy.setup(len(self.params), self.device)
        coef, stats.threshold = policy.compute(stats)
        if policy.granularity == "unit":
            if self.nonfinite == "ignore" or finite_only:  # non-finite units unscaled
                coef = [torch.where(stats.grads_finite, c, 1.0) for c in coef]
        elif self.nonfinite == "ignore" or found_inf is not None or finite_only:
            coef = torch.where(stats.finite, coef, torch.ones_like(coef))
        stats.coef = coef

    def apply(self, stats: StepStats, groups: TensorGroups, *,
              finite_only: bool = False) -> None:
        """Scale the gradients once, by the policy's granularity; summarise the
        coefficients (the smallest) and the post-clip norm (``finite_only``: as for
        :meth:`decide`)."""
        policy = self.policy
        coef = stats.coef
        if policy is None:
            post = stats.total
        elif policy.granularity == "unit":
            assert stats.units is not None
            stats.units.mul_(groups.local, coef)
            stats.threshold = torch.full((), math.nan, device=self.device)
            coef, post = self.sync.unit_summary(
                stats, coef, ones_if_nonfinite=self.nonfinite == "ignore" or finite_only)
        elif policy.granularity == "tensor":
            mul_(groups, coef if stats.index is None else coef.index_select(0, stats.index))
            post = torch.linalg.vector_norm(stats.norms * coef, self.norm_type)
            assert stats.threshold is not None
            threshold = stats.threshold
            if coef.numel():
                coef, stats.threshold = coef.amin(), threshold.amin()
            else:  # no tensor: nothing clipped, no threshold
                coef = torch.ones((), device=self.device)
                stats.threshold = torch.full((), math.nan, device=self.device)
        else:
            mul_(groups, coef)
            post = stats.total * coef
        stats.coef, stats.post = coef, post
        stats.clipped = (coef < 1) & stats.finite
        stats.skipped = torch.zeros((), dtype=torch.bool, device=self.device)

    def record(self, step: int, stats: StepStats) -> Interval | None:
        """Counters, :attr:`last`, and one row of the monitor's buffer (no host read)."""
        f32 = torch.float32
        loss = stats.loss
        if loss is None:
            loss = torch.full((), math.nan, device=self.device)
        assert stats.post is not None and stats.threshold is not None
        assert stats.clipped is not None and stats.nonfinite is not None
        assert stats.skipped is not None
        stats.record = {
            "pre_norm": stats.total.to(f32), "post_norm": stats.post.to(f32),
            "threshold": stats.threshold.to(f32), "coef": stats.coef.to(f32),
            "clipped": stats.clipped, "nonfinite": stats.nonfinite, "skipped": stats.skipped,
            "loss": loss.to(self.device, f32),
        }
        self.last = stats
        flags = torch.stack([torch.ones_like(stats.clipped), stats.clipped, stats.nonfinite,
                             stats.skipped])
        self.counters += flags.to(torch.int64)
        if self.monitor is None:
            return None
        fields = torch.stack([stats.record[k].to(f32).reshape(()) for k in FIELDS])
        return self.monitor.observe(step, fields, stats.norms.to(f32))

    # ----------------------------------------------------------------------------------
    # Skipped steps
    # ----------------------------------------------------------------------------------

    def _skip_nonfinite(self, step: int, stats: StepStats) -> StepResult:
        """A non-finite step under ``"skip"`` (recorded, with its event) or ``"raise"``."""
        bad = [n for n, b in zip(self.names, torch.logical_not(
            torch.isfinite(stats.norms)).tolist(), strict=True) if b]
        # which rank saw it first: a host read (the step skips or raises anyway)
        origin = None
        if stats.codes is not None and (self.nonfinite == "raise" or self.monitor is not None):
            origin = self.sync.origin(stats.codes)
        if self.nonfinite == "raise":
            where = "" if origin is None else "; " + describe_origin(origin)
            raise NonFiniteGradientError(
                f"step {step}: non-finite gradient in {', '.join(bad[:5])}"
                f"{' and more' if len(bad) > 5 else ''}{where}. Lower the learning rate, "
                "check the inputs and the loss for NaN/inf, or use "
                "Guard(nonfinite='skip') to skip such steps."
            )
        nan = torch.full((), math.nan, device=self.device)
        stats.post = stats.threshold = stats.coef = nan
        stats.clipped = torch.zeros((), dtype=torch.bool, device=self.device)
        stats.nonfinite = stats.skipped = torch.ones((), dtype=torch.bool, device=self.device)
        interval = self.record(step, stats)
        if self.monitor is not None:
            self.monitor.note_step(step, "nonfinite", layers=bad, origin=origin)
        return StepResult(stats, proceed=False, skipped="nonfinite", interval=interval)

    @torch.no_grad()
    def skip(self, step: int, reason: str) -> StepResult:
        """Record a step skipped without measuring it (e.g. a batch after a rollback)."""
        self.sync.discard()
        nan = torch.full((), math.nan, device=self.device)
        false = torch.zeros((), dtype=torch.bool, device=self.device)
        stats = StepStats(norms=torch.zeros(len(self.params), device=self.device), total=nan,
                          finite=false, step=step, grads_finite=false, coef=nan, threshold=nan,
                          post=nan, clipped=false, nonfinite=false,
                          skipped=torch.ones((), dtype=torch.bool, device=self.device))
        interval = self.record(step, stats)
        if self.monitor is not None:
            self.monitor.note_step(step, "skip", reason=reason)
        return StepResult(stats, proceed=False, skipped=reason, interval=interval)

    def count_dropped(self) -> None:
        """Count one more skipped step: a step recorded as going through whose update the
        remedies dropped (a rollback decided during it)."""
        self.counters[3] += 1
