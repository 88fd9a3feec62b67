"""The ladder beyond clipping: skip the step, lower the learning rate, roll back, abort.

Clipping bounds one step. When steps keep going wrong, a run needs more: the
:class:`Remedies` ladder escalates one rung at a time, each rung with its own budget,
and every action it takes is an event in the Guard's log.

1. **Skip** -- a step with non-finite gradients does not happen (``Guard(nonfinite="skip")``).
   ``skip_budget`` consecutive skips escalate to the next rung.
2. **LR backoff** -- multiply the learning rate of every param group by ``factor`` (each
   group keeps its own ratio), then restore it geometrically over ``recovery_steps``
   clean steps. Triggered by escalating skips, or by ``spikes`` spike events within
   ``window`` steps. At most ``max_times`` backoffs.
3. **Rollback** -- restore parameters, optimizer state and the Guard's statistics from the
   last clean snapshot (kept on CPU, refreshed at every monitor interval without a
   spike, a non-finite step or a loss jump), then skip the next ``skip_batches`` batches:
   the PaLM recipe (restart ~100 steps before the spike, skip the batches around it).
   Triggered when backoff is exhausted, or when the interval's mean loss jumps above
   ``loss_factor`` x the last clean interval's (or is non-finite). At most ``max_times``.
4. **Abort** -- raise :class:`TrainingDiverged` saying what happened and what to try.

:class:`Remedies` is a decision function: the Guard hands it each step's outcome
(:meth:`Remedies.on_step`) and each monitor interval (:meth:`Remedies.on_interval`), and it
returns an :class:`Action` -- the LR factor of the next update, a snapshot to take, a
rollback, batches to skip, an abort, the events to log -- which the Guard applies. It holds
no reference to the Guard, the monitor or any tensor; its state is a handful of host
numbers (in ``state_dict``). The LR factor is applied inside the attached
``optimizer.step()`` for that step only and then undone, so LR schedulers never see it and
keep their own schedule.

References:
    Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", Section 5.1,
    arXiv:2204.02311 (rollback and batch skipping for loss spikes).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from gradguard._validation import check_int
from gradguard.log.events import Event
from gradguard.monitor.record import Interval

__all__ = ["Action", "LRBackoff", "Remedies", "RemedyContext", "Rollback", "StepOutcome",
           "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """Raised when the remedy ladder is exhausted: the run cannot be saved automatically."""


@dataclass
class LRBackoff:
    """Lower the learning rate after repeated trouble, then restore it gradually.

    Args:
        factor: multiply every group's learning rate by this (in ``(0, 1)``).
        spikes: spike events within ``window`` steps that trigger a backoff.
        window: the window, in steps.
        recovery_steps: clean steps over which the rate returns to its value, geometrically.
        max_times: backoffs allowed before the ladder moves on.
    """

    factor: float = 0.5
    spikes: int = 3
    window: int = 1000
    recovery_steps: int = 500
    max_times: int = 3

    def __post_init__(self) -> None:
        if not (isinstance(self.factor, (int, float)) and 0 < self.factor < 1):
            raise ValueError(f"factor must be in (0, 1), got {self.factor!r}")
        check_int(self.spikes, "spikes", 1)
        check_int(self.window, "window", 1)
        check_int(self.recovery_steps, "recovery_steps", 1)
        check_int(self.max_times, "max_times", 0)


@dataclass
class Rollback:
    """Restore the last clean snapshot and skip the batches that follow (PaLM recipe).

    Snapshots are taken at the end of every monitor interval (``Guard(log_every=...)``)
    that had no spike, no non-finite step and no loss jump, so the snapshot is at most one
    interval old when trouble starts.

    Args:
        skip_batches: optimizer steps skipped right after a rollback.
        loss_factor: an interval whose mean loss exceeds this times the last clean
            interval's (or is non-finite) triggers a rollback (``None``: only escalation
            from the rungs below triggers it). Needs ``guard.observe_loss(loss)``.
        max_times: rollbacks allowed before aborting.
    """

    skip_batches: int = 0
    loss_factor: float | None = 3.0
    max_times: int = 3

    def __post_init__(self) -> None:
        check_int(self.skip_batches, "skip_batches", 0)
        check_int(self.max_times, "max_times", 0)
        if self.loss_factor is not None and not (
            isinstance(self.loss_factor, (int, float)) and self.loss_factor > 1
        ):
            raise ValueError(f"loss_factor must be > 1 or None, got {self.loss_factor!r}")


@dataclass(frozen=True)
class StepOutcome:
    """What became of one Guard step.

    Attributes:
        step: the step number.
        skipped: ``None`` (the update goes through), ``"nonfinite"`` (skipped for
            non-finite gradients), ``"rollback"`` (a batch skipped after a rollback) or
            ``"dropped"`` (recorded, but its update dropped by a rollback decided during
            this step).
    """

    step: int
    skipped: str | None = None


@dataclass(frozen=True)
class RemedyContext:
    """What the Guard tells its remedies once, when they are bound.

    Attributes:
        stats: the Guard's exact counters (``steps``, ``clipped``, ``nonfinite``,
            ``skipped``; one host read), for the abort message.
        monitored: the Guard has a monitor (LR backoff and rollback need its intervals).
    """

    stats: Callable[[], Mapping[str, int]]
    monitored: bool = True


@dataclass
class Action:
    """What the Guard must do after a step or an interval; the default does nothing.

    Attributes:
        lr_factor: the factor on every learning rate for the next updates (the Guard
            applies it inside the attached ``optimizer.step()``, for that step only).
        snapshot: take the rollback snapshot now (the state before this step's update).
        restore: restore the snapshot now (a rollback); this step's update is dropped.
        skip_next: skip this many following batches (``None``: keep the current count).
        abort: raise :class:`TrainingDiverged` with this message once the step is logged.
        events: events to log (``lr_backoff``, ``lr_restore``, ``rollback``, ``abort``).
    """

    lr_factor: float = 1.0
    snapshot: bool = False
    restore: bool = False
    skip_next: int | None = None
    abort: str | None = None
    events: list[Event] = field(default_factory=list)


class Remedies:
    """The remedy ladder (see the module docstring). Give it to ``Guard(remedies=...)``.

    Args:
        skip_budget: consecutive skipped steps tolerated before escalating.
        lr_backoff: an :class:`LRBackoff`, ``True`` for the defaults, or ``None``/``False``.
        rollback: a :class:`Rollback`, ``True`` for the defaults, or ``None``/``False``
            (the default: snapshots cost a copy of the model and optimizer state).
        abort: raise :class:`TrainingDiverged` when the ladder is exhausted (``False``:
            keep skipping and logging).

    Attributes:
        lr_factor: the current factor on the learning rate (1 without a backoff).
        backoffs, rollbacks: how many of each were done.
        snapshot_step: the step whose pre-update state the Guard's snapshot holds (the
            rollback target), or ``None``.

    Example:
        >>> import torch, gradguard as gg
        >>> from gradguard import Remedies, Rollback
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> guard = gg.Guard(model, remedies=Remedies(rollback=Rollback(skip_batches=10)),
        ...                  sinks=[]).attach(opt)
    """

    def __init__(
        self,
        *,
        skip_budget: int = 3,
        lr_backoff: LRBackoff | bool | None = True,
        rollback: Rollback | bool | None = None,
        abort: bool = True,
    ) -> None:
        self.skip_budget = check_int(skip_budget, "skip_budget", 1)
        if not (lr_backoff is None or isinstance(lr_backoff, (bool, LRBackoff))):
            raise TypeError(f"lr_backoff must be an LRBackoff, True, False or None, got "
                            f"{lr_backoff!r}")
        if not (rollback is None or isinstance(rollback, (bool, Rollback))):
            raise TypeError(f"rollback must be a Rollback, True, False or None, got "
                            f"{rollback!r}")
        self.lr_backoff = LRBackoff() if lr_backoff is True else (lr_backoff or None)
        self.rollback = Rollback() if rollback is True else (rollback or None)
        self.abort = bool(abort)
        self._context: RemedyContext | None = None
        self._active = True  # False once the Guard closes: log, but act no more
        self._action = Action()  # the action being built by the current call
        # host-side state, all in state_dict
        self.lr_factor = 1.0
        self._recovery_rate = 1.0
        self.backoffs = 0
        self.rollbacks = 0
        self._consecutive_skips = 0
        self._spike_steps: deque[int] = deque()
        self._clean_loss: float | None = None
        self.snapshot_step: int | None = None
        self._interval_dirty = False
        self._fresh_backoff = False

    # -- wiring (called by the Guard) --------------------------------------------------

    def bind(self, context: RemedyContext) -> None:
        """Belong to a Guard (done by ``Guard(remedies=...)``).

        Raises:
            ValueError: if already bound, or if a rung needs a monitor the Guard lacks.
        """
        if self._context is not None:
            raise ValueError("this Remedies object already belongs to another Guard")
        if not context.monitored and (self.rollback is not None or self.lr_backoff is not None):
            raise ValueError("LR backoff and rollback need the Guard's monitor (monitor=True)")
        self._context = context

    def deactivate(self) -> None:
        """Stop acting (the Guard is closing): no more backoff, rollback or abort."""
        self._active = False

    # -- decisions -----------------------------------------------------------------------

    def on_step(self, outcome: StepOutcome) -> Action:
        """Decide after a step: count skips (escalating after ``skip_budget`` in a row),
        recover the learning rate on steps that go through.

        Args:
            outcome: the step and whether (why) it was skipped.

        Returns:
            The :class:`Action` for the Guard.
        """
        self._action = Action()
        if outcome.skipped == "nonfinite":
            self._consecutive_skips += 1
            self._interval_dirty = True
            if self._consecutive_skips >= self.skip_budget and self._active:
                self._consecutive_skips = 0
                self._escalate(outcome.step, f"{self.skip_budget} consecutive steps with "
                                             "non-finite gradients were skipped")
        elif outcome.skipped == "dropped":
            self._consecutive_skips = 0
        elif outcome.skipped is None:
            self._consecutive_skips = 0
            self._recover(outcome.step)
        return self._finish()

    def on_interval(self, interval: Interval) -> Action:
        """Decide after a monitor interval: spikes count towards a backoff, a loss jump (or
        a non-finite loss) rolls back, a clean interval refreshes the snapshot.

        Args:
            interval: the flushed interval (its record and the detectors' events).

        Returns:
            The :class:`Action` for the Guard.
        """
        self._action = Action()
        if self._active:
            for event in interval.events:
                if event.kind == "spike":
                    self._interval_dirty = True
                    self._on_spike(event.step)
                elif event.kind == "nonfinite":
                    self._interval_dirty = True
            self._on_record(interval.record)
        return self._finish()

    def _finish(self) -> Action:
        action, self._action = self._action, Action()
        action.lr_factor = self.lr_factor
        return action

    def _recover(self, step: int) -> None:
        if self._fresh_backoff:  # the first step after a backoff takes the full cut
            self._fresh_backoff = False
        elif self.lr_factor < 1.0:
            self.lr_factor = min(1.0, self.lr_factor * self._recovery_rate)
            if self.lr_factor >= 1.0 - 1e-12:
                self.lr_factor = 1.0
                self._emit(step, "lr_restore", "learning rate restored to its scheduled value",
                           {"backoffs": self.backoffs})

    def _on_spike(self, step: int) -> None:
        cfg = self.lr_backoff
        if cfg is None:
            return
        self._spike_steps.append(step)
        while self._spike_steps and self._spike_steps[0] <= step - cfg.window:
            self._spike_steps.popleft()
        if len(self._spike_steps) >= cfg.spikes:
            self._spike_steps.clear()
            self._escalate(step, f"{cfg.spikes} gradient-norm spikes within {cfg.window} steps")

    def _on_record(self, record: Mapping[str, Any]) -> None:
        step = int(record["step_last"])
        loss = record.get("loss_mean")
        loss_known = isinstance(loss, float) and not math.isnan(loss)
        bad_losses = record.get("loss_nonfinite", 0)
        dirty = (self._interval_dirty or record.get("nonfinite", 0) or record.get("spikes", 0)
                 or bad_losses)
        self._interval_dirty = False
        rb = self.rollback
        clean = self._clean_loss
        if rb is not None and rb.loss_factor is not None and bad_losses:
            self._do_rollback(step, f"{bad_losses} non-finite loss(es) in steps "
                                    f"{record['step_first']}-{step}")
            return
        if (rb is not None and rb.loss_factor is not None and clean is not None
                and loss_known and loss > rb.loss_factor * clean):
            self._do_rollback(step, f"mean loss {loss:.4g} over steps "
                                    f"{record['step_first']}-{step} is above "
                                    f"{rb.loss_factor}x the last clean interval's ({clean:.4g})")
            return
        if not dirty:
            if loss_known:
                self._clean_loss = float(loss)  # type: ignore[arg-type]
            if rb is not None:
                self._action.snapshot = True
                self.snapshot_step = step  # the state before this step's update

    # -- the ladder ----------------------------------------------------------------------

    def _escalate(self, step: int, why: str) -> None:
        cfg = self.lr_backoff
        if cfg is not None and self.backoffs < cfg.max_times:
            self.backoffs += 1
            self.lr_factor *= cfg.factor
            self._recovery_rate = (1.0 / self.lr_factor) ** (1.0 / cfg.recovery_steps)
            self._fresh_backoff = True
            self._emit(step, "lr_backoff",
                       f"{why}: learning rate x{self.lr_factor:.3g} (backoff {self.backoffs}/"
                       f"{cfg.max_times}), restored over {cfg.recovery_steps} clean steps",
                       {"lr_factor": self.lr_factor, "backoffs": self.backoffs})
            return
        if self.rollback is not None and self.snapshot_step is not None:
            self._do_rollback(step, why)
            return
        self._do_abort(step, why)

    def _do_rollback(self, step: int, why: str) -> None:
        rb = self.rollback
        assert rb is not None
        if self.snapshot_step is None:
            self._emit(step, "rollback", f"{why}; no clean snapshot yet, nothing to roll back to",
                       {"performed": False})
            return
        if self.rollbacks >= rb.max_times:
            self._do_abort(step, f"{why}, after {self.rollbacks} rollbacks")
            return
        self.rollbacks += 1
        self._action.restore = True
        self._action.skip_next = rb.skip_batches
        self._spike_steps.clear()
        self._emit(step, "rollback",
                   f"{why}: restored the state from before step {self.snapshot_step} "
                   f"(rollback {self.rollbacks}/{rb.max_times}) and skipping the next "
                   f"{rb.skip_batches} batches", {"to_step": self.snapshot_step,
                                                  "rollbacks": self.rollbacks,
                                                  "skip_batches": rb.skip_batches})

    def _do_abort(self, step: int, why: str) -> None:
        stats = self._context.stats() if self._context is not None else {}
        message = (
            f"gradguard: training diverged at step {step}: {why}. So far "
            f"{stats.get('nonfinite', 0)} steps had non-finite gradients, "
            f"{stats.get('skipped', 0)} were skipped, {self.backoffs} learning-rate "
            f"backoffs and {self.rollbacks} rollbacks were tried. Try: a learning rate "
            "10x lower, a warm-up, checking the data and the loss for NaN/inf, and "
            "gradguard.probe(model, batch) for the initialisation."
        )
        self._emit(step, "abort", message, {"backoffs": self.backoffs,
                                             "rollbacks": self.rollbacks})
        if self.abort:
            self._action.abort = message

    def _emit(self, step: int, kind: str, message: str, data: dict[str, Any]) -> None:
        self._action.events.append(Event(step=step, kind=kind, message=message, data=data))

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The ladder's host state and configuration."""
        return {
            "lr_factor": self.lr_factor,
            "recovery_rate": self._recovery_rate,
            "backoffs": self.backoffs,
            "rollbacks": self.rollbacks,
            "consecutive_skips": self._consecutive_skips,
            "spike_steps": list(self._spike_steps),
            "clean_loss": self._clean_loss,
            "snapshot_step": self.snapshot_step,
            "interval_dirty": self._interval_dirty,
            "fresh_backoff": self._fresh_backoff,
            "config": {
                "skip_budget": self.skip_budget,
                "lr_backoff": None if self.lr_backoff is None else asdict(self.lr_backoff),
                "rollback": None if self.rollback is None else asdict(self.rollback),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.lr_factor = float(state["lr_factor"])
        self._recovery_rate = float(state["recovery_rate"])
        self.backoffs = int(state["backoffs"])
        self.rollbacks = int(state["rollbacks"])
        self._consecutive_skips = int(state["consecutive_skips"])
        self._spike_steps = deque(state["spike_steps"])
        self._clean_loss = state["clean_loss"]
        self.snapshot_step = state["snapshot_step"]
        self._interval_dirty = bool(state["interval_dirty"])
        self._fresh_backoff = bool(state["fresh_backoff"])
