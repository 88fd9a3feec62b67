"""The Guard: clipping, non-finite protection, monitoring and remedies in one object.

This module is the wiring: construction, ``attach`` (the optimizer wrapper), the loss,
introspection, checkpoints. The step itself reads top to bottom in
:mod:`gradguard.guard.step` (measure -> decide -> apply -> record); here the Guard runs it
and then *acts*: its remedies (:mod:`gradguard.guard.remedies`) decide from the step's
outcome and the monitor's interval, and the Guard applies their action (LR factor,
snapshot, rollback, skipped batches, abort).

Attach it to an optimizer and an existing training loop changes by one line::

    guard = gg.Guard(model, clip="auto").attach(optimizer)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()        # the Guard runs here, before the update

or call :meth:`Guard.step` by hand between ``backward()`` and ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.engine.norms import validate_norm_type
from gradguard.guard.attach import (
    ReplayClosure,
    StepCall,
    accelerate_scaler,
    accumulating,
    check_attachable,
    mark_step,
    passing_found_inf,
    takes_found_inf,
    unscale_once,
)
from gradguard.guard.loss import StepLoss
from gradguard.guard.remedies import Action, Remedies, RemedyContext, StepOutcome, TrainingDiverged
from gradguard.guard.snapshot import Snapshot
from gradguard.guard.step import COUNTERS, GuardStep, StepResult
from gradguard.guard.sync import GuardSync
from gradguard.log.events import Event
from gradguard.log.sinks import LOG_RANKS, sinks_for_rank
from gradguard.monitor.monitor import Monitor
from gradguard.policies.base import ThresholdPolicy
from gradguard.policies.registry import make_policy

__all__ = ["NONFINITE_POLICIES", "Guard"]

NONFINITE_POLICIES = ("skip", "zero", "raise", "ignore")


def _resolve_parameters(
    model_or_params: Any,
) -> tuple[list[nn.Parameter], list[str]]:
    """Parameters (trainable, deduplicated) and their names from what the Guard accepts."""
    if isinstance(model_or_params, nn.Module):
        named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"model_or_params: {type(model_or_params).__name__} has no trainable parameters"
            )
        return [p for _, p in named], [n for n, _ in named]
    if isinstance(model_or_params, torch.optim.Optimizer):
        model_or_params = model_or_params.param_groups
    if isinstance(model_or_params, Tensor):
        model_or_params = [model_or_params]
    if isinstance(model_or_params, (str, bytes)) or not isinstance(model_or_params, Iterable):
        raise TypeError(
            "model_or_params must be an nn.Module, an iterable of parameters, param-group "
            f"dicts or an optimizer, got {type(model_or_params).__name__}"
        )
    params: list[nn.Parameter] = []
    names: list[str] = []
    seen: set[int] = set()
    for gi, item in enumerate(list(model_or_params)):
        if isinstance(item, Mapping):
            group = item.get("params")
            group = [group] if isinstance(group, Tensor) else list(group or [])
            labels = [f"group{gi}.{k}" for k in range(len(group))]
        else:
            group, labels = [item], [f"param{gi}"]
        for p, label in zip(group, labels, strict=True):
            if not isinstance(p, Tensor):
                raise TypeError(f"model_or_params[{gi}] holds a {type(p).__name__}, not a tensor")
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            params.append(p)
            names.append(label)
    if not params:
        raise ValueError("model_or_params holds no trainable parameters")
    return params, names


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


@contextlib.contextmanager
def _scaled_lr(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Every group's learning rate times ``factor`` for one step, then put back."""
    if factor == 1.0:
        yield
        return
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * factor  # a tensor lr gets a new tensor; the original is put back
    try:
        yield
    finally:
        for g, lr in zip(optimizer.param_groups, saved, strict=True):
            g["lr"] = lr


class Guard:
    """Protect a training run: clip gradients, survive NaN/inf, monitor, and act.

    Args:
        model_or_params: an ``nn.Module`` (its trainable parameters, with their names), an
            iterable of parameters or of param-group dicts, or an optimizer.
        clip: the threshold policy: a float (fixed threshold on the total norm), a name
            (``"auto"``, ``"autoclip"``, ``"zclip"``, ``"adagc"``, ``"agc"``,
            ``"fixed:<t>"``), a :class:`~gradguard.policies.base.ThresholdPolicy`, or
            ``None`` to monitor only.
        nonfinite: what to do when a gradient holds NaN or inf:

            * ``"skip"`` (default): the optimizer step does not happen; parameters,
              optimizer state (moments, step counts) and statistics stay exactly as they
              were. Deciding to skip reads one flag on the host: **one device
              synchronisation per step** (free on CPU), except with torch's fused
              Adam, AdamW, SGD and Adagrad, which take the flag on the device and skip
              with no synchronisation (see :meth:`attach`).
            * ``"zero"``: non-finite entries become 0 and the step goes on. Sync-free: on
              accelerators every gradient is passed through ``nan_to_num_`` each step.
            * ``"raise"``: :class:`NonFiniteGradientError` naming the first offending
              parameters (one sync per step).
            * ``"ignore"``: the step goes on untouched (no sync).

            Whatever the choice, the policy's statistics never absorb a non-finite value.
        norm_type: the order p of the norms (2 by default).
        log_every: steps between monitor flushes (the one host transfer of the monitor).
        sinks: where records and events go (see :func:`gradguard.log.sinks.make_sink`): a path
            ``*.jsonl``/``*.csv``, ``"console"``, ``"tensorboard:DIR"``, a callable, a Sink,
            or a list of them. Default: ``"console"`` (events only, on stderr).
        monitor: keep per-layer statistics (``False`` turns the monitor off).
        remedies: a :class:`~gradguard.guard.remedies.Remedies` ladder (LR backoff,
            rollback, abort) or ``None``.
        scaler: the ``torch.amp.GradScaler`` in use, if any, when calling :meth:`step` by
            hand: non-finite gradients are then the scaler's overflow steps, which it
            skips itself; they are neither observations nor events. (With
            :meth:`attach` and ``scaler.step(optimizer)``, overflow steps never reach the
            Guard and nothing is needed.)
        process_group: reduce norms over this group (ranks holding disjoint parameters).
        sync_group: the ranks that take the same decisions (clip coefficient, skip,
            remedies), with **one** all-reduce per step whatever the policy (see
            :mod:`gradguard.guard.sync`). ``None`` (default): every rank, when
            ``torch.distributed`` is initialised with several; a process group: those
            ranks; ``False``: each rank on its own. Works unchanged under DDP (``no_sync``
            accumulation included) and FSDP2 (``fully_shard``; build the Guard after it).
        log_ranks: under ``torch.distributed``, ``"zero"`` (default): only rank 0 writes to
            the sinks; ``"all"``: every rank does, into per-rank files (``run.jsonl``,
            ``run.rank1.jsonl``, ...). Events carry the rank that saw the problem first.
        monitor_options: extra keyword arguments for :class:`gradguard.monitor.Monitor`.

    Attributes:
        params, names: the guarded parameters and their names.
        policy: the threshold policy, or ``None``.
        monitor: the :class:`~gradguard.monitor.Monitor`, or ``None``.
        remedies: the :class:`~gradguard.guard.remedies.Remedies`, or ``None``.
        sync: the :class:`~gradguard.guard.sync.GuardSync` (``sync.world`` ranks decide
            together; 1 without ``torch.distributed``).
        step_count: Guard steps taken (observed or not).

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = gg.Guard(model, clip=1.0, sinks=[]).attach(opt)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()  # clipped inside
        >>> guard.stats()["steps"]
        1
    """

    def __init__(
        self,
        model_or_params: Any,
        clip: float | str | ThresholdPolicy | None = "auto",
        *,
        nonfinite: str = "skip",
        norm_type: float = 2.0,
        log_every: int = 100,
        sinks: Any = ("console",),
        monitor: bool = True,
        remedies: Any = None,
        scaler: Any = None,
        process_group: Any = None,
        sync_group: Any = None,
        log_ranks: str = "zero",
        monitor_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.params, self.names = _resolve_parameters(model_or_params)
        self.policy = make_policy(clip)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.norm_type = validate_norm_type(norm_type)
        if (self.policy is not None and self.policy.granularity == "unit"
                and self.norm_type != 2.0):
            raise ValueError(f"clip='{self.policy.name}' uses L2 unit norms; got "
                             f"norm_type={norm_type!r}")
        if log_ranks not in LOG_RANKS:
            raise ValueError(f"log_ranks must be one of {LOG_RANKS}, got {log_ranks!r}")
        if remedies is not None and not isinstance(remedies, Remedies):
            raise TypeError(f"remedies must be a gradguard.Remedies or None, got {remedies!r}")
        self.scaler, self.process_group, self.log_ranks = scaler, process_group, log_ranks
        self.step_count = 0
        device = self.params[0].device
        self._device = device
        self._loss: StepLoss | None = None  # the losses observed since the last step
        self._loss_calls = 0  # observe_loss calls so far (a closure may make some)
        self._last_skipped: bool | Tensor = False
        self._fused = False  # every attached optimizer skips on the device (found_inf)
        self._attached: list[tuple[weakref.ref, Callable]] = []
        # (weakrefs to the gradients, their versions, decision) of the last Guard step
        self._last_gradients: tuple[list, list[int], bool | Tensor] | None = None
        # Distributed: the step's one collective, identical decisions on every rank.
        self.sync = GuardSync.create(sync_group, norm_type=self.norm_type, device=device,
                                     process_group=process_group)
        self.monitor = self._build_monitor(sinks, log_every, monitor_options) if monitor \
            else None
        self._steps = GuardStep(self.params, self.names, self.policy, nonfinite=nonfinite,
                                norm_type=self.norm_type, scaler=scaler, sync=self.sync,
                                monitor=self.monitor, device=device)
        # What the remedies' actions act on: optimizers whose state rolls back, the
        # snapshot, the LR factor of the next updates, the batches still to skip.
        self._state_optimizers: list[torch.optim.Optimizer] = []
        self._snapshot: Snapshot | None = None
        self._warned_no_optimizer = False
        self._lr_factor = 1.0
        self._skip_next = 0
        self.remedies: Remedies | None = remedies
        if remedies is not None:
            remedies.bind(RemedyContext(stats=self.stats, monitored=self.monitor is not None))
            if isinstance(model_or_params, torch.optim.Optimizer):  # its state rolls back too
                self._state_optimizers.append(model_or_params)
        if self.monitor is not None and isinstance(model_or_params, torch.optim.Optimizer):
            self.monitor.watch_optimizer(model_or_params, self.params)  # Guard(opt): step() by hand

    def _build_monitor(self, sinks: Any, log_every: int,
                       monitor_options: Mapping[str, Any] | None) -> Monitor:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            sinks = sinks_for_rank(sinks, self.log_ranks, _rank())
        options = dict(monitor_options or {})
        # skip/raise read the flag on the host: the Guard notes those steps itself
        options.setdefault("host_nonfinite_events", self.nonfinite in ("skip", "raise"))
        meta = {"policy": repr(self.policy), "nonfinite": self.nonfinite,
                "norm_type": self.norm_type}
        if self.sync.world > 1:
            meta.update(world_size=self.sync.world, log_ranks=self.log_ranks)
        meta.update(options.pop("meta", {}))
        return Monitor(self.names, log_every=log_every, sinks=sinks, device=self._device,
                       rank=_rank(), meta=meta, **options)

    # ----------------------------------------------------------------------------------
    # Wiring
    # ----------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> Guard:
        """Run the Guard inside every ``optimizer.step()``, before the update.

        ``optimizer.step`` is wrapped on this instance (a pre-step hook cannot cancel a
        step, and ``nonfinite="skip"`` must). It works with ``GradScaler.step`` (which
        calls ``optimizer.step`` only for steps it does not skip, after unscaling; for
        fused optimizers the Guard receives the scale and unscales its norms itself),
        LR schedulers (created before or after ``attach``), gradient accumulation (one
        Guard step per optimizer step), closures and accelerate. Attached to several
        optimizers that share one backward pass, it runs once per backward pass (in the
        first ``step()``), and the other optimizers follow its decision; under a
        GradScaler, call ``scaler.unscale_`` on each of them before the first
        ``scaler.step``, so that the Guard sees every gradient unscaled.

        **Closures.** ``optimizer.step(closure)`` first evaluates the closure, with
        gradients enabled (also under an outer ``torch.no_grad()``), then runs the Guard
        on those fresh gradients, then the update. The closure's loss is the step's loss
        (as if given to :meth:`observe_loss`, unless the closure called
        :meth:`observe_loss` itself), and ``step`` returns it as torch does, on a skipped
        step too: the closure always runs exactly once before the Guard decides (the
        frameworks require it). The optimizer then receives a closure whose first call
        returns that loss without a second forward/backward when no parameter changed
        in place, and whose later calls evaluate the real closure:

        * optimizers that evaluate the closure once (SGD, Adam, ...) cost one
          evaluation, as without a Guard;
        * **LBFGS** makes as many evaluations as without a Guard. The Guard checks and
          clips the *first* one (the gradient at the current parameters): a non-finite
          first gradient skips the whole step (one evaluation, no update); the line
          search's later evaluations are not guarded (half an LBFGS step cannot be
          cancelled). Clipping changes LBFGS's first direction: prefer ``clip=None``
          (monitoring and the non-finite skip) with it;
        * optimizers that move the parameters before evaluating (SAM-like) get a real
          evaluation at the moved point.

        ``GradScaler.step(optimizer, closure=...)`` is refused by torch itself.

        **accelerate.** Attach to the *prepared* optimizer (``accelerator.prepare``'s):
        on micro-batches whose gradients are not synchronised (inside
        ``accelerator.accumulate``) its ``step()`` passes straight through, so the
        Guard runs once per real optimizer step, on the accumulated gradient. A Guard
        skip shows in ``optimizer.step_was_skipped`` (and
        ``accelerator.optimizer_step_was_skipped``) for that step only. Under its
        GradScaler the gradients are unscaled first (unless already done, as the
        Hugging Face Trainer does), and an overflow goes to the scaler, which skips the
        step and lowers its scale; it is not a Guard step. DeepSpeed is refused.

        **Skipped steps, schedulers and step counters** (:attr:`last_step_skipped`):

        * plain torch: the loop's own counters; an LR scheduler steps when the loop
          steps it (the Guard never steps schedulers), and a skip at the first step
          does not trigger torch's "``lr_scheduler.step()`` before
          ``optimizer.step()``" warning;
        * accelerate and the Hugging Face Trainer: the skip shows in
          ``step_was_skipped``, so a prepared scheduler and the Trainer hold the
          learning rate for that step, as on a GradScaler overflow; the Trainer's
          ``global_step`` counts the step;
        * Lightning: ``global_step`` counts the step and step-interval schedulers step,
          as on a GradScaler overflow (to hold the learning rate, override
          ``lr_scheduler_step`` and check :attr:`last_step_skipped`).

        **Fused optimizers.** When every attached optimizer is a torch fused Adam,
        AdamW, SGD or Adagrad (``fused=True``), ``nonfinite="skip"`` has no remedies and
        no GradScaler is in the way, the skip costs no host synchronisation: the
        non-finite flag goes to the optimizer as a ``found_inf`` device tensor, the way
        GradScaler drives these optimizers, and the fused kernel leaves parameters,
        moments and ``step`` bitwise unchanged. Other optimizers read the flag on the
        host once per step.

        Args:
            optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, AdamW, LBFGS, ...
                foreach or fused), or accelerate's ``AcceleratedOptimizer``.

        Returns:
            ``self``, so that ``guard = Guard(model).attach(opt)`` reads naturally.

        Raises:
            TypeError: not an optimizer, or one whose ``step`` cannot be guarded
                (accelerate's DeepSpeed wrapper).
            ValueError: the optimizer updates none of the Guard's parameters.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        check_attachable(optimizer)
        if any(ref() is optimizer for ref, _ in self._attached):
            return self
        covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not covered & {id(p) for p in self.params}:  # checked before anything changes
            raise ValueError("optimizer updates none of the Guard's parameters")
        original = optimizer.step
        guard = self

        @functools.wraps(original)
        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            return guard._guarded_step(opt, original, args, kwargs)

        step.__gradguard_original__ = original  # type: ignore[attr-defined]
        # A bound method, as torch's LR schedulers expect (they wrap ``step.__func__``).
        optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
        self._attached.append((weakref.ref(optimizer), original))
        if self.monitor is not None:  # Adam-family optimizers: per-layer signals at intervals
            self.monitor.watch_optimizer(optimizer, self.params)
        if self.remedies is not None and optimizer not in self._state_optimizers:
            self._state_optimizers.append(optimizer)
        self._update_fused()
        return self

    def _update_fused(self) -> None:
        """Whether non-finite steps are skipped on the device (see :meth:`attach`)."""
        optimizers = self.optimizers
        self._fused = (self.nonfinite == "skip" and self.scaler is None
                       and self.remedies is None and bool(optimizers)
                       and all(takes_found_inf(o) for o in optimizers))
        if self.monitor is not None and self.monitor.host_nonfinite_events:
            # the host no longer sees these steps: the interval reports them
            self.monitor.detectors["nonfinite"].interval_events = self._fused

    def _guarded_step(self, optimizer: torch.optim.Optimizer, original: Callable,
                      args: tuple, kwargs: dict[str, Any]) -> Any:
        """An attached ``optimizer.step(*args, **kwargs)``: the closure, the Guard, then
        the update (with the remedies' LR factor for this step), or nothing on a skipped
        step (see :meth:`attach`)."""
        if accumulating(optimizer):  # accelerate: no update on this micro-batch
            return original(*args, **kwargs)
        call = StepCall(original, args, kwargs)
        loss = None if call.closure is None else self._evaluate_closure(call.closure)
        scaler = accelerate_scaler(optimizer)
        if scaler is not None:
            unscale_once(scaler, optimizer.optimizer)  # type: ignore[attr-defined]
        decision = self._run_once_per_gradient(optimizer, scaled=scaler is not None)
        skipped = decision is False
        self._last_skipped = decision if isinstance(decision, Tensor) else skipped
        mark_step(optimizer, skipped)
        if skipped:
            return loss
        replay = None if call.closure is None else \
            ReplayClosure(call.closure, loss, self.params)
        flag = decision if isinstance(decision, Tensor) else None
        observed = self._loss
        try:
            with _scaled_lr(optimizer, self._lr_factor), passing_found_inf(optimizer, flag):
                return call(replay)
        finally:
            self._loss = observed  # losses of the optimizer's own re-evaluations (LBFGS)

    def _evaluate_closure(self, closure: Callable) -> Any:
        """The closure's first evaluation, with gradients enabled; its loss is observed
        unless the closure reported one itself."""
        before = self._loss_calls
        with torch.enable_grad():
            loss = closure()
        if self._loss_calls == before and (
                (isinstance(loss, Tensor) and loss.numel() == 1)
                or (isinstance(loss, (int, float)) and not isinstance(loss, bool))):
            self.observe_loss(loss)
        return loss

    def _run_once_per_gradient(self, optimizer: torch.optim.Optimizer, *,
                               scaled: bool = False) -> bool | Tensor:
        """The Guard's step for an attached ``optimizer.step()``.

        With several attached optimizers (e.g. one for the encoder, one for the decoder),
        the first to step after a backward pass runs the Guard over all its parameters;
        the others reuse that decision, so gradients are clipped once and the statistics
        see one step. "The same gradients" means the same tensors at the same version.

        Returns:
            Whether to update, or (fused optimizers, see :meth:`attach`) a ``found_inf``
            device flag for the update.
        """
        # GradScaler hands fused optimizers the scale and the overflow flag as
        # attributes (their gradients are still scaled); None otherwise.
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        on_device = self._fused and found_inf is None and not scaled
        if len(self._attached) < 2:
            return self._run(grad_scale=grad_scale, found_inf=found_inf, scaled=scaled,
                             on_device=on_device)
        seen = self._last_gradients
        grads = [p.grad for p in self.params]
        if seen is not None and len(seen[0]) == len(grads) and all(
            (g is None and r is None) or (r is not None and r() is g and g._version == v)
            for g, r, v in zip(grads, seen[0], seen[1], strict=True)
        ):
            return seen[2]
        proceed = self._run(grad_scale=grad_scale, found_inf=found_inf, scaled=scaled,
                            on_device=on_device)
        grads = [p.grad for p in self.params]
        self._last_gradients = (
            [None if g is None else weakref.ref(g) for g in grads],
            [0 if g is None else g._version for g in grads],
            proceed,
        )
        return proceed

    def detach(self) -> None:
        """Undo :meth:`attach` on every optimizer."""
        for ref, original in self._attached:
            opt = ref()
            if opt is not None:
                opt.step = original  # type: ignore[method-assign]
        self._attached.clear()
        self._update_fused()

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers this Guard is attached to."""
        return [o for o in (ref() for ref, _ in self._attached) if o is not None]

    # ----------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------

    def observe_loss(self, loss: Tensor | float, *, reduction: str = "mean") -> None:
        """Give the Guard a loss of this step (for the record and loss-spike remedies).

        Call it any time before the optimizer step, once per step or once per
        micro-batch under gradient accumulation: the values accumulate on the device
        (no host read) until the Guard's step, whose loss is their mean
        (``reduction="mean"``, for each micro-batch's own loss) or their sum
        (``reduction="sum"``, for values that are already the micro-batch's share of the
        step, such as a loss divided by the accumulation count). A NaN or inf in any
        micro-batch makes the step's loss non-finite (recorded as inf), so the record
        and the remedies see it. With a closure (``optimizer.step(closure)``) the
        closure's loss is observed for you.

        Args:
            loss: a scalar tensor (detached here) or a number.
            reduction: ``"mean"`` (default) or ``"sum"``; one per step.

        Example:
            >>> import torch, gradguard as gg
            >>> model = torch.nn.Linear(4, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> guard = gg.Guard(model, sinks=[]).attach(opt)
            >>> for micro in range(4):             # 4 micro-batches, one step
            ...     loss = model(torch.randn(8, 4)).pow(2).mean()
            ...     guard.observe_loss(loss)       # the raw micro-batch loss
            ...     (loss / 4).backward()
            >>> opt.step()                         # records the mean of the 4 losses
        """
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got a tensor of shape "
                                 f"{tuple(loss.shape)}")
            value = loss.detach().reshape(()).float()
        else:
            value = torch.tensor(float(loss), device=self._device)
        acc = self._loss
        self._loss = StepLoss.first(value, reduction) if acc is None \
            else acc.add(value, reduction)
        self._loss_calls += 1
        # a non-finite micro-batch loss names this rank (kept per call)
        self.sync.observe_loss(torch.where(torch.isnan(value), math.inf, value))

    @property
    def pending_loss(self) -> Tensor | None:
        """The step's loss observed so far (see :meth:`observe_loss`; NaN recorded as
        inf), or ``None``."""
        return None if self._loss is None else self._loss.value()

    @property
    def last_step_skipped(self) -> bool:
        """Whether the Guard skipped the last optimizer step it ran on (a host bool).

        Free after a step whose skip decision was read on the host (``"skip"`` with
        non-fused optimizers, and ``"zero"``/``"ignore"``, where only a remedy skips).
        With the fused device-side skip (see :meth:`attach`) the decision stays on the
        device until this property reads it: one synchronisation. A GradScaler overflow
        is the scaler's skip, not the Guard's: ``False``. Micro-batches that pass
        through (accelerate) leave it as it was.
        """
        skipped = self._last_skipped
        return bool(skipped) if isinstance(skipped, Tensor) else skipped

    def step(self) -> bool:
        """Clip and check the gradients now (the explicit form of :meth:`attach`).

        Call it between ``loss.backward()`` (after ``scaler.unscale_(optimizer)`` when
        using a GradScaler) and ``optimizer.step()``.

        Returns:
            Whether the optimizer should step: ``False`` only when ``nonfinite="skip"``
            (or a remedy) decided to skip. With ``"zero"``/``"ignore"`` this is always
            ``True`` and nothing is read on the host.
        """
        proceed = self._run()
        assert not isinstance(proceed, Tensor)
        self._last_skipped = not proceed
        return proceed

    def _run(self, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
             *, scaled: bool = False, on_device: bool = False) -> bool | Tensor:
        self.step_count += 1
        if self._skip_next > 0:  # a rollback asked to skip the batches that follow it
            self._skip_next -= 1  # (on every rank alike: remedies decide on shared data)
            # No collective on these steps, so a rank's own loss must not reach the
            # record: remedies acting on it would part the ranks.
            self._loss = None
            result = self._steps.skip(self.step_count, "rollback")
        else:
            result = self._steps.run(self.step_count, loss=self.pending_loss,
                                     optimizers=self.optimizers, grad_scale=grad_scale,
                                     found_inf=found_inf, scaled=scaled,
                                     on_device=on_device)
            if result.stats is not None:  # recorded: the loss belongs to this step
                self._loss = None
        if result.found_inf is not None:  # skipped or not, on the device
            return result.found_inf
        return self._act(result)

    def _act(self, result: StepResult) -> bool:
        """The remedies decide from the interval and the step; the Guard applies it."""
        remedies = self.remedies
        if remedies is None or result.stats is None:
            return result.proceed
        interval_abort = None
        dropped = False
        if result.interval is not None:
            action = remedies.on_interval(result.interval)
            interval_abort = self._apply(action)
            dropped = action.restore and result.proceed  # rolled back: no update now
        skipped = result.skipped or ("dropped" if dropped else None)
        abort = self._apply(remedies.on_step(StepOutcome(self.step_count, skipped)))
        if dropped:
            self._steps.count_dropped()
        if abort or interval_abort:  # once the interval and the events are logged
            raise TrainingDiverged(abort or interval_abort)
        return result.proceed and not dropped

    def _apply(self, action: Action) -> str | None:
        """Carry out a remedies :class:`Action`; returns its abort message, if any."""
        self._lr_factor = action.lr_factor
        if action.snapshot:
            self._take_snapshot()
        if action.restore and self._snapshot is not None:
            self._snapshot.restore(self.params, self._state_optimizers, self.policy)
        if action.skip_next is not None:
            self._skip_next = action.skip_next
        if self.monitor is not None:
            for event in action.events:
                self.monitor.emit(event)
        return action.abort

    def _take_snapshot(self) -> None:
        if not self._state_optimizers and not self._warned_no_optimizer:
            self._warned_no_optimizer = True
            warnings.warn(
                "gradguard: rollback snapshots hold the parameters but no optimizer state, "
                "because the Guard knows no optimizer: use guard.attach(optimizer), or "
                "Guard(optimizer, ...), so that a rollback restores its state too",
                stacklevel=2,
            )
        self._snapshot = Snapshot.take(self.params, self._state_optimizers, self.policy)

    # ----------------------------------------------------------------------------------
    # Introspection
    # ----------------------------------------------------------------------------------

    @property
    def last(self) -> dict[str, Tensor]:
        """The last step's record, as device tensors (no sync): ``pre_norm``,
        ``post_norm``, ``threshold``, ``coef``, ``clipped``, ``nonfinite``, ``skipped``,
        ``loss``."""
        last = self._steps.last
        return {} if last is None else dict(last.record)

    def stats(self) -> dict[str, int]:
        """Exact counters since the start: steps, clipped, nonfinite, skipped (one sync)."""
        return dict(zip(COUNTERS, self._steps.counters.tolist(), strict=True))

    def flush(self) -> list[Event]:
        """Flush the monitor now (e.g. at the end of training); returns the new events.

        The remedies see the interval as at any flush.
        """
        interval = None if self.monitor is None else self.monitor.flush_interval()
        if interval is None:
            return []
        if self.remedies is not None:
            abort = self._apply(self.remedies.on_interval(interval))
            if abort:
                raise TrainingDiverged(abort)
        return interval.events

    @property
    def events(self) -> list[Event]:
        """Recent events (bounded), oldest first."""
        return [] if self.monitor is None else list(self.monitor.events)

    def close(self) -> None:
        """Flush and close the sinks, and detach from optimizers.

        The last partial interval is logged, but the remedies no longer act on it: closing
        never rolls the model back or raises :class:`TrainingDiverged`.
        """
        if self.remedies is not None:
            self.remedies.deactivate()
        try:
            if self.monitor is not None:
                self.monitor.close()
        finally:
            self.detach()

    # ----------------------------------------------------------------------------------
    # Checkpointing
    # ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bitwise: policy statistics, counters, monitor and
        remedies state, the rollback snapshot."""
        return {
            "version": 1,
            "step_count": self.step_count,
            "skip_next": self._skip_next,
            "counters": self._steps.counters.detach().clone(),
            "names": list(self.names),
            "policy": None if self.policy is None else self.policy.state_dict(),
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
            "remedies": None if self.remedies is None else self.remedies.state_dict(),
            "snapshot": None if self._snapshot is None else self._snapshot.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same parameters, same policy)."""
        if list(state_dict["names"]) != self.names:
            raise ValueError(
                "state_dict was saved for different parameters "
                f"({len(state_dict['names'])} tensors, first {state_dict['names'][:3]}); "
                f"this Guard has {len(self.names)} (first {self.names[:3]})"
            )
        if (state_dict["policy"] is None) != (self.policy is None):
            raise ValueError("state_dict and this Guard disagree on whether there is a policy")
        self.step_count = int(state_dict["step_count"])
        self._skip_next = int(state_dict.get("skip_next", 0))
        self._steps.counters = state_dict["counters"].detach().clone().to(self._device)
        if self.policy is not None:
            self.policy.setup(len(self.params), self._device)
            self.policy.load_state_dict(state_dict["policy"])
        if self.monitor is not None and state_dict.get("monitor") is not None:
            self.monitor.load_state_dict(state_dict["monitor"])
        remedies = state_dict.get("remedies")
        if self.remedies is not None and remedies is not None:
            self.remedies.load_state_dict(remedies)
            self._lr_factor = self.remedies.lr_factor
        # (checkpoints before the restructure kept the snapshot in the remedies' state)
        snapshot = state_dict.get("snapshot") or (remedies or {}).get("snapshot")
        self._snapshot = None if snapshot is None else Snapshot.from_state_dict(snapshot)

    def __repr__(self) -> str:
        return (f"Guard({len(self.params)} tensors, clip={self.policy!r}, "
                f"nonfinite={self.nonfinite!r})")
