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

The LR factor is applied inside the attached ``optimizer.step()`` for that step only and
then undone, so LR schedulers never see it and keep their own schedule.

References:
    Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", Section 5.1,
    arXiv:2204.02311 (rollback and batch skipping for loss spikes).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from gradguard._validation import check_int
from gradguard.log.events import Event
from gradguard.log.sinks import CallbackSink

if TYPE_CHECKING:
    from gradguard.guard import Guard

__all__ = ["LRBackoff", "Remedies", "Rollback", "TrainingDiverged"]


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


class Remedies:
    """The remedy ladder (see the module docstring). Give it to ``Guard(remedies=...)``.

    Args:
        skip_budget: consecutive skipped steps tolerated before escalating.
        lr_backoff: an :class:`LRBackoff`, ``True`` for the defaults, or ``None``/``False``.
        rollback: a :class:`Rollback`, ``True`` for the defaults, or ``None``/``False``
            (the default: snapshots cost a copy of the model and optimizer state).
        abort: raise :class:`TrainingDiverged` when the ladder is exhausted (``False``:
            keep skipping and logging).

    Example:
        >>> import torch, gradguard as gg
        >>> from gradguard.remedies import Remedies, Rollback
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
        self._active = True  # False once the Guard closes: log, but act no more
        self._in_callback = False
        self._pending_abort: str | None = None
        self._warned_no_optimizer = False
        self.guard: Guard | None = None
        self._optimizers: list[torch.optim.Optimizer] = []
        # host-side state, all in state_dict
        self.lr_factor = 1.0
        self._recovery_rate = 1.0
        self.backoffs = 0
        self.rollbacks = 0
        self._consecutive_skips = 0
        self._spike_steps: deque[int] = deque()
        self._clean_loss: float | None = None
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_step: int | None = None
        self._interval_dirty = False
        self._fresh_backoff = False
        self._rolled_back = False

    # -- wiring (called by the Guard) --------------------------------------------------

    def bind(self, guard: Guard) -> None:
        """Connect to a Guard (done by ``Guard(remedies=...)``)."""
        if self.guard is not None and self.guard is not guard:
            raise ValueError("this Remedies object already belongs to another Guard")
        self.guard = guard
        if guard.monitor is not None:
            guard.monitor.add_sink(CallbackSink(self._on_monitor))
        elif self.rollback is not None or self.lr_backoff is not None:
            raise ValueError("LR backoff and rollback need the Guard's monitor (monitor=True)")

    def deactivate(self) -> None:
        """Stop acting (the Guard is closing): no more backoff, rollback or abort."""
        self._active = False

    def raise_pending_abort(self) -> None:
        """Raise the :class:`TrainingDiverged` decided during a monitor flush, once the
        flush has logged the interval's record and events."""
        message, self._pending_abort = self._pending_abort, None
        if message is not None:
            raise TrainingDiverged(message)

    def step_dropped(self) -> None:
        """This step does not reach the optimizer anyway: a rollback decided during it
        needs no further step dropped."""
        self._rolled_back = False

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember an optimizer whose learning rate and state the ladder may act on."""
        if optimizer not in self._optimizers:
            self._optimizers.append(optimizer)

    @contextlib.contextmanager
    def scaled_lr(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Apply the current LR factor to ``optimizer`` for one step, then undo it."""
        f = self.lr_factor
        if f == 1.0:
            yield
            return
        saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * f  # a tensor lr gets a new tensor; the original is put back
        try:
            yield
        finally:
            for g, lr in zip(optimizer.param_groups, saved, strict=True):
                g["lr"] = lr

    # -- per-step hooks --------------------------------------------------------------

    def on_skip(self, step: int, reason: str) -> None:
        """A step was skipped (non-finite gradients). Escalate after ``skip_budget``."""
        self._consecutive_skips += 1
        self._interval_dirty = True
        if self._consecutive_skips >= self.skip_budget and self._active:
            self._consecutive_skips = 0
            self._escalate(step, f"{self.skip_budget} consecutive steps with non-finite "
                                 "gradients were skipped")
        self.step_dropped()

    def after_step(self, step: int) -> bool:
        """A step is about to go through: count it towards recovery.

        Returns:
            Whether the optimizer should step (``False`` right after a rollback, whose
            restored parameters must not receive this step's update).
        """
        self._consecutive_skips = 0
        if self._rolled_back:
            self._rolled_back = False
            return False
        if self._fresh_backoff:  # the first step after a backoff takes the full cut
            self._fresh_backoff = False
        elif self.lr_factor < 1.0:
            self.lr_factor = min(1.0, self.lr_factor * self._recovery_rate)
            if self.lr_factor >= 1.0 - 1e-12:
                self.lr_factor = 1.0
                self._emit(step, "lr_restore", "learning rate restored to its scheduled value",
                           {"backoffs": self.backoffs})
        return True

    # -- monitor callbacks -------------------------------------------------------------

    def _on_monitor(self, kind: str, payload: Any) -> None:
        if not self._active:
            return
        outer = self._in_callback  # (events this callback emits come back here)
        self._in_callback = True  # an abort waits until the flush has logged everything
        try:
            if kind == "event" and payload.kind == "spike":
                self._interval_dirty = True
                self._on_spike(payload.step)
            elif kind == "event" and payload.kind == "nonfinite":
                self._interval_dirty = True
            elif kind == "record":
                self._on_record(payload)
        finally:
            self._in_callback = outer

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
                self._take_snapshot(step)

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
        if self.rollback is not None and self._snapshot is not None:
            self._do_rollback(step, why)
            return
        self._do_abort(step, why)

    def _do_rollback(self, step: int, why: str) -> None:
        rb = self.rollback
        assert rb is not None
        if self._snapshot is None:
            self._emit(step, "rollback", f"{why}; no clean snapshot yet, nothing to roll back to",
                       {"performed": False})
            return
        if self.rollbacks >= rb.max_times:
            self._do_abort(step, f"{why}, after {self.rollbacks} rollbacks")
            return
        self.rollbacks += 1
        self._restore_snapshot()
        self._rolled_back = True
        guard = self.guard
        assert guard is not None
        guard._skip_next = rb.skip_batches
        self._spike_steps.clear()
        self._emit(step, "rollback",
                   f"{why}: restored the state from before step {self._snapshot_step} "
                   f"(rollback {self.rollbacks}/{rb.max_times}) and skipping the next "
                   f"{rb.skip_batches} batches", {"to_step": self._snapshot_step,
                                                  "rollbacks": self.rollbacks,
                                                  "skip_batches": rb.skip_batches})

    def _do_abort(self, step: int, why: str) -> None:
        guard = self.guard
        stats = guard.stats() if guard is not None else {}
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
            self._pending_abort = message
            if not self._in_callback:
                self.raise_pending_abort()

    def _emit(self, step: int, kind: str, message: str, data: dict[str, Any]) -> None:
        guard = self.guard
        if guard is not None and guard.monitor is not None:
            guard.monitor.emit(Event(step=step, kind=kind, message=message, data=data))

    # -- snapshots -----------------------------------------------------------------------

    def _take_snapshot(self, step: int) -> None:
        guard = self.guard
        assert guard is not None
        if not self._optimizers and not self._warned_no_optimizer:
            self._warned_no_optimizer = True
            warnings.warn(
                "gradguard: rollback snapshots hold the parameters but no optimizer state, "
                "because the Guard knows no optimizer: use guard.attach(optimizer), or "
                "Guard(optimizer, ...), so that a rollback restores its state too",
                stacklevel=2,
            )
        with torch.no_grad():
            params = [p.detach().to("cpu", copy=True) for p in guard.params]
        self._snapshot = {
            "params": params,
            "optimizers": [_to_cpu(copy.deepcopy(o.state_dict())) for o in self._optimizers],
            "policy": None if guard.policy is None else guard.policy.state_dict(),
        }
        self._snapshot_step = step  # the state before this step's update

    def _restore_snapshot(self) -> None:
        guard = self.guard
        snap = self._snapshot
        assert guard is not None and snap is not None
        with torch.no_grad():
            for p, saved in zip(guard.params, snap["params"], strict=True):
                p.copy_(saved)
        for opt, state in zip(self._optimizers, snap["optimizers"], strict=True):
            # The moments go back; the hyperparameters (the LR a scheduler set) stay.
            current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(copy.deepcopy(state))
            for group, hyper in zip(opt.param_groups, current, strict=True):
                group.update(hyper)
        if guard.policy is not None and snap["policy"] is not None:
            guard.policy.load_state_dict(snap["policy"])

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Ladder state, including the rollback snapshot (CPU tensors) if any."""
        return {
            "lr_factor": self.lr_factor,
            "recovery_rate": self._recovery_rate,
            "backoffs": self.backoffs,
            "rollbacks": self.rollbacks,
            "consecutive_skips": self._consecutive_skips,
            "spike_steps": list(self._spike_steps),
            "clean_loss": self._clean_loss,
            "snapshot": self._snapshot,
            "snapshot_step": self._snapshot_step,
            "interval_dirty": self._interval_dirty,
            "fresh_backoff": self._fresh_backoff,
            "rolled_back": self._rolled_back,
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
        self._snapshot = state["snapshot"]
        self._snapshot_step = state["snapshot_step"]
        self._interval_dirty = bool(state["interval_dirty"])
        self._fresh_backoff = bool(state["fresh_backoff"])
        self._rolled_back = bool(state["rolled_back"])


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
