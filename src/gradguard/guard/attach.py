"""What an attached ``optimizer.step()`` does around the Guard, inside the frameworks.

The Guard's own step lives in :mod:`gradguard.guard.step`; this module holds the pieces
of the optimizer wrapper that deal with the caller:

* **closures** (:class:`StepCall`, :class:`ReplayClosure`): ``step(closure)`` runs the
  closure first (so that the Guard sees the fresh gradients), then hands the optimizer a
  closure that replays that first evaluation instead of computing it twice;
* **accelerate** (:func:`accumulating`, :func:`accelerate_scaler`): an
  ``AcceleratedOptimizer`` (duck-typed: ``gradient_state.sync_gradients``; accelerate is
  never imported) is stepped on every micro-batch but updates only when gradients are
  synchronised; its GradScaler must see every overflow;
* **skips the frameworks can see** (:func:`mark_step`): accelerate's
  ``step_was_skipped``, and torch's LR-scheduler order check;
* **fused optimizers** (:func:`takes_found_inf`, :func:`passing_found_inf`): torch's fused Adam,
  AdamW, SGD and Adagrad skip an update on the device when handed a ``found_inf`` flag,
  as GradScaler does (``torch/amp/grad_scaler.py``, ``GradScaler.step``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ReplayClosure",
    "StepCall",
    "accelerate_scaler",
    "accumulating",
    "check_attachable",
    "mark_step",
    "passing_found_inf",
    "takes_found_inf",
    "unscale_once",
]


class StepCall:
    """One call ``optimizer.step(*args, **kwargs)``, with its closure (if any) taken out.

    torch optimizers take the closure as the first positional argument or as
    ``closure=``; :meth:`__call__` puts the replacement back where it came from.

    Args:
        original: the optimizer's ``step`` before the Guard wrapped it.
        args, kwargs: what the caller passed.
    """

    def __init__(self, original: Callable, args: tuple, kwargs: dict[str, Any]) -> None:
        self.original = original
        self.keyword = "closure" in kwargs
        if self.keyword:
            kwargs = dict(kwargs)
            self.closure = kwargs.pop("closure")
        else:
            self.closure = args[0] if args else None
            args = args[1:]
        self.args, self.kwargs = args, kwargs

    def __call__(self, closure: Callable | None) -> Any:
        """The wrapped step, with ``closure`` in the caller's place (or none)."""
        if self.keyword:
            return self.original(*self.args, closure=closure, **self.kwargs)
        if closure is None and not self.args:
            return self.original(**self.kwargs)
        return self.original(closure, *self.args, **self.kwargs)


class ReplayClosure:
    """The closure the optimizer receives after the Guard ran the real one.

    The first call returns the loss already computed (its gradients are there, checked
    and clipped) when no parameter changed in place since then (every ``_version`` is
    the same): optimizers that evaluate the closure once, and LBFGS's first evaluation,
    cost no second forward/backward. Otherwise (an optimizer that moved the parameters
    first, like SAM), and on every later call (LBFGS's further evaluations), it calls
    the real closure with gradients enabled.

    Args:
        closure: the caller's closure.
        loss: what its first evaluation returned.
        params: the tensors whose in-place changes invalidate that evaluation.
    """

    def __init__(self, closure: Callable, loss: Any, params: Sequence[Tensor]) -> None:
        self.closure, self.loss, self.params = closure, loss, list(params)
        self.versions = [p._version for p in self.params]
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls == 1 and all(
                p._version == v for p, v in zip(self.params, self.versions, strict=True)):
            return self.loss
        with torch.enable_grad():
            return self.closure()


def accumulating(optimizer: Any) -> bool:
    """Whether ``optimizer`` is an accelerate ``AcceleratedOptimizer`` on a micro-batch
    whose gradients are not synchronised (its ``step`` does nothing then)."""
    state = getattr(optimizer, "gradient_state", None)
    return state is not None and not getattr(state, "sync_gradients", True)


def accelerate_scaler(optimizer: Any) -> Any:
    """The GradScaler an accelerate ``AcceleratedOptimizer`` steps through, else ``None``."""
    if getattr(optimizer, "gradient_state", None) is None:
        return None
    return getattr(optimizer, "scaler", None)


def unscale_once(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless it already ran since the scaler's last
    ``update()`` (the Hugging Face Trainer unscales before ``optimizer.step()``)."""
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as err:  # GradScaler's public answer to "already unscaled"
        if "unscale_() has already been called" not in str(err):
            raise


def check_attachable(optimizer: Any) -> None:
    """Refuse optimizers whose ``step()`` cannot be guarded.

    Raises:
        TypeError: accelerate's DeepSpeed wrapper (its ``step`` does nothing; the engine
            steps inside ``backward``).
    """
    if type(optimizer).__name__ == "DeepSpeedOptimizerWrapper":
        raise TypeError(
            "optimizer is accelerate's DeepSpeedOptimizerWrapper: DeepSpeed updates the "
            "parameters inside backward(), where a Guard cannot act; use DeepSpeed's own "
            "gradient_clipping instead"
        )


def _set_flag(obj: Any, name: str, value: bool) -> None:
    # Flags of other libraries that have no public setter (see mark_step).
    setattr(obj, name, value)


def mark_step(optimizer: Any, skipped: bool) -> None:
    """Tell the frameworks whether the Guard skipped this (synchronised) step.

    * accelerate: ``optimizer.step_was_skipped`` reads the wrapper's overflow flag, which
      only its GradScaler branch writes. It is set for this step (``False`` before an
      update, which a GradScaler may turn to ``True``), so a prepared scheduler and the
      Hugging Face Trainer hold the learning rate on a Guard skip, and only then.
    * torch LR schedulers: their order check ("``lr_scheduler.step()`` before
      ``optimizer.step()``") reads a flag that only their own wrapper around ``step``
      sets; a skip never calls it when the scheduler was created before ``attach``. The
      user did call ``optimizer.step()``: the flag is set on a skip.

    Neither library offers a public setter; these are the flags their own code sets.
    """
    if (isinstance(getattr(type(optimizer), "step_was_skipped", None), property)
            and hasattr(optimizer, "_is_overflow")):
        _set_flag(optimizer, "_is_overflow", skipped)
    if skipped:
        for opt in (optimizer, getattr(optimizer, "optimizer", None)):
            if isinstance(opt, torch.optim.Optimizer):
                _set_flag(opt, "_opt_called", True)


def takes_found_inf(optimizer: Any) -> bool:
    """Whether ``optimizer`` skips its update on the device when given ``found_inf``:
    torch's fused Adam, AdamW, SGD and Adagrad (``fused=True``), the optimizers
    GradScaler drives through that flag (``_step_supports_amp_scaling``)."""
    defaults = getattr(optimizer, "defaults", None)
    return (isinstance(optimizer, torch.optim.Optimizer)
            and getattr(optimizer, "gradient_state", None) is None
            and isinstance(defaults, dict) and bool(defaults.get("fused"))
            and bool(getattr(optimizer, "_step_supports_amp_scaling", False)))


@contextlib.contextmanager
def passing_found_inf(optimizer: torch.optim.Optimizer, flag: Tensor | None) -> Iterator[None]:
    """Hand a fused optimizer ``flag`` (float32 1.0: skip, 0.0: update) for one step, as
    GradScaler does: the attribute ``found_inf``, removed afterwards. The fused kernel
    skips the parameters and the moments, and takes back its step-count increment."""
    if flag is None:
        yield
        return
    optimizer.found_inf = flag  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]
