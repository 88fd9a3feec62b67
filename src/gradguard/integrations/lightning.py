"""PyTorch Lightning: a Guard in one line, ``Trainer(callbacks=[GuardCallback()])``.

::

    from gradguard.integrations.lightning import GuardCallback

    guard_callback = GuardCallback(clip="auto")
    trainer = L.Trainer(max_steps=1000, callbacks=[guard_callback])
    trainer.fit(model)
    guard_callback.guard.stats()    # {'steps': 1000, 'clipped': ..., 'skipped': ...}

What the callback does, and where in Lightning's loop:

* **fit start** -- builds ``Guard(pl_module, clip=..., nonfinite=..., **guard_kwargs)``
  (after the process group exists, so every DDP rank decides together) and attaches it
  to every optimizer of the trainer: automatic optimisation (Lightning calls
  ``optimizer.step(closure)``; the Guard runs on the gradients the closure made) and
  manual optimisation (``opt.step()`` in ``training_step``) alike.
* **the loss** -- read in ``on_before_backward`` for every micro-batch, without user
  code: Lightning divides it by ``accumulate_grad_batches`` in automatic optimisation
  (the shares are summed) and scales it under fp16 ``MixedPrecision`` (undone with the
  scaler's scale, a device tensor: no sync). The Guard records the step's mean loss.
* **logging** -- every ``log_every`` Guard steps (default: the trainer's
  ``log_every_n_steps``) the monitor's interval record goes to the trainer's loggers as
  ``gradguard/...`` metrics (:mod:`gradguard.integrations.common`), at
  ``step=trainer.global_step``. Nothing is logged, or read from the device, between
  intervals.
* **checkpoints** -- the Guard's state is the callback's ``state_dict``; on
  ``fit(ckpt_path=...)`` Lightning hands it back before fit start (held until the Guard
  exists) or after it (FSDP, DeepSpeed: loaded at once).
* **fit end** (or an exception) -- the Guard is closed: the last partial interval is
  logged, and the optimizers are detached. ``callback.guard`` stays readable.

Skipped steps follow Lightning's convention for steps that AMP's GradScaler skips:
``global_step`` counts them and step-interval LR schedulers step. To hold the LR on a
skipped step, override ``LightningModule.lr_scheduler_step``::

    def lr_scheduler_step(self, scheduler, metric):
        guard = next(c.guard for c in self.trainer.callbacks if isinstance(c, GuardCallback))
        if not guard.last_step_skipped:
            scheduler.step()

``Trainer(gradient_clip_val=...)`` is refused: Lightning clips inside the optimizer
closure, before the Guard, which would then only see (and clip) clipped gradients. With
``clip=None`` (monitor only) it is allowed, with a warning that the norms are post-clip.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from gradguard.guard.guard import Guard
from gradguard.integrations.common import (
    DEFAULT_CLIP,
    check_guard_arguments,
    counter_metrics,
    missing_extra,
    record_metrics,
)

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as err:  # the optional extra is not installed
    raise missing_extra("PyTorch Lightning", "lightning", err) from err

__all__ = ["GuardCallback"]


class GuardCallback(pl.Callback):
    """Protect a Lightning run with a :class:`~gradguard.Guard`.

    Args:
        clip: the Guard's threshold policy (default: the Guard's own default).
        nonfinite: what the Guard does with a NaN/inf gradient (default ``"skip"``).
        **guard_kwargs: any other :class:`~gradguard.Guard` argument (``log_every``,
            ``sinks``, ``remedies``, ``sync_group``, ...). ``log_every`` defaults to the
            trainer's ``log_every_n_steps``.

    Attributes:
        guard: the :class:`~gradguard.Guard`, from fit start on (``None`` before).

    Raises:
        TypeError, ValueError: on arguments the Guard would refuse (at once).
    """

    def __init__(self, clip: Any = DEFAULT_CLIP, nonfinite: str = "skip",
                 **guard_kwargs: Any) -> None:
        check_guard_arguments(clip, nonfinite, guard_kwargs)
        self.clip = clip
        self.nonfinite = nonfinite
        self.guard_kwargs = guard_kwargs
        self.guard: Guard | None = None
        self._held_state: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None

    # ----------------------------------------------------------------------------------
    # Set-up: refuse what would blind the Guard, build it, attach it
    # ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the trainer before anything runs (``fit`` only)."""
        if stage != "fit":
            return
        self._check_trainer(trainer, pl_module)
        if self.guard is not None:  # a second fit() goes on from the first one's state
            self._held_state = self.guard.state_dict()
            self.guard = None

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "deepspeed" in type(trainer.strategy).__name__.lower():
            raise ValueError(
                f"GuardCallback does not work with {type(trainer.strategy).__name__}: "
                "DeepSpeed steps its own optimizer, so the Guard could not skip or clip")
        clip_val = trainer.gradient_clip_val
        if clip_val:
            if self.clip is not None:
                raise ValueError(
                    f"GuardCallback(clip={self.clip!r}) clips the gradients itself, but "
                    f"Trainer(gradient_clip_val={clip_val}) would clip them first (inside "
                    "the optimizer closure), so the Guard would measure and clip already "
                    "clipped gradients: remove gradient_clip_val, or pass clip=None to "
                    "keep Lightning's clipping and only monitor")
            warnings.warn(
                f"GuardCallback(clip=None) with Trainer(gradient_clip_val={clip_val}): "
                "Lightning clips before the Guard runs, so the Guard's gradient norms are "
                "post-clip (NaN/inf are still caught)", stacklevel=2)
        if is_overridden("configure_gradient_clipping", pl_module):
            warnings.warn(
                f"{type(pl_module).__name__}.configure_gradient_clipping runs before the "
                "Guard: if it clips, the Guard's norms are post-clip", stacklevel=2)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the Guard and attach it to the trainer's optimizers."""
        kwargs = dict(self.guard_kwargs)
        kwargs.setdefault("log_every", max(1, int(trainer.log_every_n_steps)))
        guard = Guard(pl_module, clip=self.clip, nonfinite=self.nonfinite, **kwargs)
        # Lightning's loggers write on rank 0 only: the other ranks need no record sink
        if guard.monitor is not None and trainer.is_global_zero:
            guard.monitor.add_sink(self._log_record)
        for optimizer in trainer.optimizers:  # the torch optimizers, not LightningOptimizer
            guard.attach(optimizer)
        if self._held_state is not None:
            guard.load_state_dict(self._held_state)
            self._held_state = None
        self._trainer = trainer
        self.guard = guard

    # ----------------------------------------------------------------------------------
    # During training: the loss and the interval records
    # ----------------------------------------------------------------------------------

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: Tensor) -> None:
        """Give the Guard each micro-batch's loss, as the user computed it."""
        if self.guard is None:
            return
        value = loss.detach()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # fp16 MixedPrecision hands the scaled loss; its private _scale is the device
        # tensor (get_scale() would read it on the host at every micro-batch)
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if isinstance(scale, Tensor) and scaler.is_enabled():
            value = value / scale.to(value.device)
        # automatic optimisation: Lightning divided the loss by accumulate_grad_batches,
        # so the micro-batches' values sum to the step's mean; manual: the user's losses
        automatic = pl_module.automatic_optimization
        self.guard.observe_loss(value, reduction="sum" if automatic else "mean")

    def _log_record(self, kind: str, payload: Any) -> None:
        """Monitor sink: an interval record -> the trainer's loggers."""
        trainer, guard = self._trainer, self.guard
        if kind != "record" or trainer is None or guard is None:
            return
        # the monitor has just read its rows from the device: the counters cost no wait
        metrics = {**record_metrics(payload), **counter_metrics(guard.stats())}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ----------------------------------------------------------------------------------
    # The end, and checkpoints
    # ----------------------------------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the Guard: log the last partial interval, detach from the optimizers."""
        if self.guard is not None:
            self.guard.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Close the Guard when training fails (its sinks are flushed and closed)."""
        if self.guard is not None:
            self.guard.close()

    def state_dict(self) -> dict[str, Any]:
        """The Guard's state (empty before fit: Lightning then stores nothing)."""
        if self.guard is not None:
            return {"guard": self.guard.state_dict()}
        return {} if self._held_state is None else {"guard": self._held_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the Guard's state; held until fit start if the Guard does not exist
        yet (Lightning restores callbacks before ``on_fit_start``, except under
        strategies that restore after set-up)."""
        state = state_dict.get("guard")
        if state is None:
            return
        if self.guard is None:
            self._held_state = state
        else:
            self.guard.load_state_dict(state)
