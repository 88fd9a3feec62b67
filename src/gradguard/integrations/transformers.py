"""Hugging Face ``Trainer``: a Guard in one line, ``Trainer(..., callbacks=[GuardCallback()])``.

::

    from gradguard.integrations.transformers import GuardCallback

    guard_callback = GuardCallback()            # the Guard's default policy
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[guard_callback])
    trainer.train()
    guard_callback.guard.stats()

No ``Trainer`` subclass and no change to its optimizer set-up (``optim``, weight-decay
groups, scheduler): at ``on_train_begin`` the callback builds ``Guard(model, ...)`` and
attaches it to the Trainer's own (accelerate-prepared) optimizer, so the Guard runs
inside every real optimizer step, once per step under gradient accumulation.

* **HF's clipping is turned off.** The Trainer clips (``max_grad_norm``, default 1.0)
  before ``optimizer.step()``, with no hook in between: the Guard would only see norms
  of 1.0 and its statistics would learn from clipped gradients. So at train begin the
  callback sets ``args.max_grad_norm = 0`` (saying so once, by name) and the Guard's
  policy clips instead; the value is put back at train end. With ``clip=None`` (monitor
  only) HF's clipping is kept, with a warning that the Guard's norms are post-clip.
* **The loss** is what ``Trainer.training_step`` returns for each micro-batch (wrapped on
  the Trainer instance, found from the callback's caller): the Guard records the loss HF
  logs for the step.
* **Logs.** Every training log (the ones with ``loss``) gets the ``gradguard/...`` keys of
  :mod:`gradguard.integrations.common` before HF appends it to ``state.log_history`` and
  before any callback's ``on_log`` (reporters included): ``gradguard/grad_norm`` (the
  last step's pre-clip norm), ``gradguard/skipped`` and the other running counts, and
  the interval statistics of the monitor's last record. They are read only at HF's
  logging steps, where HF reads its own values from the device anyway. ``log_every``
  defaults to ``logging_steps``, so each log has a fresh interval.
* **Skipped steps** follow HF's convention for steps that AMP skips: the Guard's skip
  shows in ``accelerator.optimizer_step_was_skipped``, so HF holds the LR scheduler for
  that step; ``state.global_step`` counts it.
* **Checkpoints.** The Guard's state is saved with every HF checkpoint (in
  ``trainer_state.json``, through ``ExportableState``) and restored when training resumes
  from it (``resume_from_checkpoint``), with or without
  ``restore_callback_states_from_checkpoint`` (with it, HF replaces the callback by one
  it builds from the checkpoint's JSON arguments: find it in
  ``trainer.callback_handler.callbacks``).
* **Train end**: the Guard is closed (last partial interval flushed, optimizer detached)
  and the Trainer instance is restored. ``callback.guard`` stays readable.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import warnings
from typing import Any

import torch

from gradguard.guard.guard import Guard
from gradguard.integrations.common import (
    DEFAULT_CLIP,
    check_guard_arguments,
    counter_metrics,
    missing_extra,
    record_metrics,
)

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as err:  # the optional extra is not installed
    raise missing_extra("transformers", "transformers", err) from err

__all__ = ["GuardCallback"]


def _calling_trainer() -> Trainer | None:
    """The Trainer whose callback handler is running (HF passes callbacks no Trainer)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _encode(state: dict[str, Any]) -> str:
    """A Guard state dict as text: ``trainer_state.json`` is JSON."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode(text: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class GuardCallback(TrainerCallback, ExportableState):
    """Protect a Hugging Face ``Trainer`` run with a :class:`~gradguard.Guard`.

    Args:
        clip: the Guard's threshold policy (default: the Guard's own default). Any value
            but ``None`` turns HF's ``max_grad_norm`` clipping off for the run.
        nonfinite: what the Guard does with a NaN/inf gradient (default ``"skip"``).
        **guard_kwargs: any other :class:`~gradguard.Guard` argument (``log_every``,
            ``sinks``, ``remedies``, ...). ``log_every`` defaults to ``logging_steps``.

    Attributes:
        guard: the :class:`~gradguard.Guard`, from train begin on (``None`` before).
        resume_state: the Guard's state at the last checkpoint, as HF hands it to a
            callback it rebuilds from a checkpoint (``{"global_step", "guard"}``).

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
        self.resume_state: dict[str, Any] | None = None
        self._global_step = 0
        self._record: dict[str, Any] | None = None  # the monitor's last interval record
        self._trainer: Trainer | None = None
        self._wrappers: dict[str, Any] = {}
        self._max_grad_norm: float | None = None  # HF's value, put back at train end
        self._warned_clipping = False

    # ----------------------------------------------------------------------------------
    # Train begin: HF's clipping, the Guard, the Trainer's loss and logs, a resume
    # ----------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Build the Guard on HF's model and attach it to HF's optimizer."""
        if getattr(args, "deepspeed", None):
            raise ValueError("GuardCallback does not work with DeepSpeed: DeepSpeed steps "
                             "and clips inside its engine, where the Guard cannot act")
        self._take_over_clipping(args)
        dropped = sorted(k for k, v in self._arguments().items() if not _jsonable(v))
        if dropped and getattr(args, "restore_callback_states_from_checkpoint", False):
            warnings.warn(
                f"GuardCallback: restore_callback_states_from_checkpoint rebuilds this "
                f"callback from the JSON arguments in the checkpoint; {dropped} are not "
                "JSON and will take their defaults on resume", stacklevel=2)
        options = dict(self.guard_kwargs)
        if args.logging_strategy == "steps" and state.logging_steps >= 1:
            options.setdefault("log_every", int(state.logging_steps))
        guard = Guard(model, clip=self.clip, nonfinite=self.nonfinite, **options)
        if guard.monitor is not None:
            guard.monitor.add_sink(self._keep_record)
        guard.attach(optimizer)
        self.guard = guard
        saved = self._saved_state(state)
        if saved is not None:
            guard.load_state_dict(_decode(saved["guard"]))
        self.resume_state = None
        self._global_step = state.global_step
        self._record = None
        self._trainer = _calling_trainer()
        if self._trainer is not None:
            self._wrap(self._trainer)

    def _take_over_clipping(self, args: Any) -> None:
        """``max_grad_norm`` off (the Guard clips), or a warning with ``clip=None``."""
        max_grad_norm = args.max_grad_norm
        if not max_grad_norm or max_grad_norm <= 0:
            return
        if self.clip is None:
            message = (f"GuardCallback(clip=None) keeps the Trainer's clipping "
                       f"(max_grad_norm={max_grad_norm}), which runs before the Guard: the "
                       "Guard's gradient norms are post-clip (NaN/inf are still caught)")
        else:
            self._max_grad_norm = max_grad_norm
            args.max_grad_norm = 0.0
            message = (f"GuardCallback(clip={self.clip!r}): the Guard clips, so the "
                       f"Trainer's own clipping is off for this run (max_grad_norm "
                       f"{max_grad_norm} -> 0); it would clip before the Guard and hide "
                       "the true gradient norm")
        if not self._warned_clipping:
            self._warned_clipping = True
            warnings.warn(message, stacklevel=3)

    def _saved_state(self, state: Any) -> dict[str, Any] | None:
        """The Guard state saved at the checkpoint training resumes from, if any."""
        saved = self.resume_state  # set when HF rebuilt this callback from the checkpoint
        if saved is None and isinstance(state.stateful_callbacks, dict):
            entry = state.stateful_callbacks.get(type(self).__name__)
            if isinstance(entry, list):  # several instances: HF keeps a list
                entry = entry[0] if entry else None
            if isinstance(entry, dict):
                saved = entry.get("attributes", {}).get("resume_state")
        # only the state of the step training resumes at (not a stale one)
        if saved and state.global_step > 0 and saved.get("global_step") == state.global_step:
            return saved
        return None

    def _wrap(self, trainer: Trainer) -> None:
        """``training_step`` and ``log`` of this Trainer instance, for the loss and logs."""
        training_step, log = trainer.training_step, trainer.log
        guard = self.guard

        def guarded_training_step(*args: Any, **kwargs: Any) -> Any:
            loss = training_step(*args, **kwargs)
            # HF returns the micro-batch's share of the step's loss (divided by the
            # accumulation count, or normalised over the step's tokens): their sum is
            # the step's loss, as HF logs it
            guard.observe_loss(loss, reduction="sum")
            return loss

        def log_with_guard(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            if "loss" in logs:  # a training log (evaluation logs have eval_loss)
                logs.update(self._metrics())
            return log(logs, *args, **kwargs)

        self._wrappers = {"training_step": guarded_training_step, "log": log_with_guard}
        trainer.training_step = guarded_training_step
        trainer.log = log_with_guard

    # ----------------------------------------------------------------------------------
    # During training
    # ----------------------------------------------------------------------------------

    def _keep_record(self, kind: str, payload: Any) -> None:
        """Monitor sink: keep the last interval record for the next training log."""
        if kind == "record":
            self._record = payload

    def _metrics(self) -> dict[str, float]:
        """The ``gradguard/...`` keys of one training log (two reads of the device,
        at HF's logging steps only)."""
        guard = self.guard
        if guard is None:
            return {}
        metrics = {} if self._record is None else record_metrics(self._record)
        self._record = None
        last = guard.last
        if last:  # the norm of the step HF logs (not only of the interval's last finite)
            metrics["gradguard/grad_norm"] = float(last["pre_norm"])
        metrics.update(counter_metrics(guard.stats()))
        return metrics

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Note the step, for the checkpoint HF may save next."""
        self._global_step = state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
               **kwargs: Any) -> None:
        """Without the Trainer's ``log`` (not found): add the keys here, and to the copy
        HF has already appended to ``state.log_history`` (reporters that ran before
        this callback miss them)."""
        if self._trainer is not None or logs is None or "loss" not in logs:
            return
        metrics = self._metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the Guard, put ``max_grad_norm`` and the Trainer back."""
        if self._max_grad_norm is not None:
            args.max_grad_norm = self._max_grad_norm
            self._max_grad_norm = None
        if self._trainer is not None:
            attributes = vars(self._trainer)
            for name, wrapper in self._wrappers.items():  # back to the class's methods
                if attributes.get(name) is wrapper:
                    del attributes[name]
            self._trainer = None
        if self.guard is not None:
            self.guard.close()

    # ----------------------------------------------------------------------------------
    # Checkpoints (ExportableState)
    # ----------------------------------------------------------------------------------

    def _arguments(self) -> dict[str, Any]:
        return {"clip": self.clip, "nonfinite": self.nonfinite, **self.guard_kwargs}

    def state(self) -> dict[str, Any]:
        """What HF stores in a checkpoint's ``trainer_state.json``: the constructor's
        JSON arguments (HF rebuilds the callback from them with
        ``restore_callback_states_from_checkpoint``) and the Guard's state, encoded."""
        resume_state = self.resume_state
        if self.guard is not None:
            resume_state = {"global_step": self._global_step,
                            "guard": _encode(self.guard.state_dict())}
        return {"args": {k: v for k, v in self._arguments().items() if _jsonable(v)},
                "attributes": {"resume_state": resume_state}}
