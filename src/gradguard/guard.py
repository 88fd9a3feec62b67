"""The Guard: clipping, non-finite protection, monitoring and remedies in one object.

One step, in a single pass over the gradients::

    norms (one foreach norm per dtype group)  ->  finite flag (from the norms)
      ->  threshold policy (device tensors)   ->  scale gradients once
      ->  record into the monitor's ring buffer  ->  remedies

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

import functools
import math
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import distributed as _dist
from gradguard import norms as _norms
from gradguard.clip import AgcUnits
from gradguard.log.events import Event
from gradguard.log.sinks import LOG_RANKS, sinks_for_rank
from gradguard.monitor import FIELDS, Monitor
from gradguard.monitor.detectors import describe_origin
from gradguard.remedies import Remedies
from gradguard.thresholds import StepNorms, ThresholdPolicy, make_policy

__all__ = ["NONFINITE_POLICIES", "Guard", "NonFiniteGradientError"]

NONFINITE_POLICIES = ("skip", "zero", "raise", "ignore")
_COUNTERS = ("steps", "clipped", "nonfinite", "skipped")


class NonFiniteGradientError(RuntimeError):
    """Raised by ``Guard(nonfinite="raise")`` when a gradient contains NaN or inf."""


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
    items = list(model_or_params)
    params: list[nn.Parameter] = []
    names: list[str] = []
    seen: set[int] = set()
    for gi, item in enumerate(items):
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


class Guard:
    """Protect a training run: clip gradients, survive NaN/inf, monitor, and act.

    Args:
        model_or_params: an ``nn.Module`` (its trainable parameters, with their names), an
            iterable of parameters or of param-group dicts, or an optimizer.
        clip: the threshold policy: a float (fixed threshold on the total norm), a name
            (``"auto"``, ``"autoclip"``, ``"zclip"``, ``"adagc"``, ``"agc"``,
            ``"fixed:<t>"``), a :class:`~gradguard.thresholds.ThresholdPolicy`, or ``None``
            to monitor only.
        nonfinite: what to do when a gradient holds NaN or inf:

            * ``"skip"`` (default): the optimizer step does not happen; parameters,
              optimizer state (moments, step counts) and statistics stay exactly as they
              were. Deciding to skip reads one flag on the host: **one device
              synchronisation per step** (free on CPU).
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
        remedies: a :class:`gradguard.remedies.Remedies` ladder (LR backoff, rollback,
            abort) or ``None``.
        scaler: the ``torch.amp.GradScaler`` in use, if any, when calling :meth:`step` by
            hand: non-finite gradients are then the scaler's overflow steps, which it
            skips itself; they are neither observations nor events. (With
            :meth:`attach` and ``scaler.step(optimizer)``, overflow steps never reach the
            Guard and nothing is needed.)
        process_group: reduce norms over this group (ranks holding disjoint parameters).
        sync_group: the ranks that take the same decisions (clip coefficient, skip,
            remedies), with **one** all-reduce per step whatever the policy (see
            :mod:`gradguard.distributed`). ``None`` (default): every rank, when
            ``torch.distributed`` is initialised with several; a process group: those
            ranks; ``False``: each rank on its own. Works unchanged under DDP (``no_sync``
            accumulation included) and FSDP2 (``fully_shard``; build the Guard after it).
        log_ranks: under ``torch.distributed``, ``"zero"`` (default): only rank 0 writes to
            the sinks; ``"all"``: every rank does, into per-rank files (``run.jsonl``,
            ``run.rank1.jsonl``, ...). Events carry the rank that saw the problem first.
        monitor_options: extra keyword arguments for :class:`gradguard.monitor.Monitor`.

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
        self.norm_type = _norms.validate_norm_type(norm_type)
        if self.policy is not None and self.policy.unitwise and self.norm_type != 2.0:
            raise ValueError(f"clip='agc' uses L2 unit norms; got norm_type={norm_type!r}")
        self.scaler = scaler
        self.process_group = process_group
        if log_ranks not in LOG_RANKS:
            raise ValueError(f"log_ranks must be one of {LOG_RANKS}, got {log_ranks!r}")
        self.log_ranks = log_ranks
        self.step_count = 0  # Guard steps taken (observed or not)
        self._device = self.params[0].device
        self._counters = torch.zeros(len(_COUNTERS), dtype=torch.int64, device=self._device)
        self._last: dict[str, Tensor] = {}
        self._pending_loss: Tensor | None = None
        self._attached: list[tuple[weakref.ref, Callable]] = []
        # (weakrefs to the gradients, their versions, decision) of the last Guard step
        self._last_gradients: tuple[list, list[int], bool] | None = None
        self._skip_next = 0  # steps to skip after a rollback (set by remedies)
        # Distributed: the step's one collective, identical decisions on every rank.
        self._sync = _dist.GuardSync.create(sync_group, norm_type=self.norm_type,
                                            device=self._device, process_group=process_group)
        if _dist.is_distributed() and torch.distributed.get_world_size() > 1:
            sinks = sinks_for_rank(sinks, log_ranks, _rank(process_group))
        if monitor:
            options = dict(monitor_options or {})
            options.setdefault("host_nonfinite_events", nonfinite in ("skip", "raise"))
            meta = {"policy": repr(self.policy), "nonfinite": nonfinite,
                    "norm_type": self.norm_type}
            if self._sync is not None:
                meta.update(world_size=self._sync.world, log_ranks=log_ranks)
            meta.update(options.pop("meta", {}))
            self.monitor: Monitor | None = Monitor(
                self.names, log_every=log_every, sinks=sinks, device=self._device,
                rank=_rank(process_group), meta=meta, **options,
            )
        else:
            self.monitor = None
        if remedies is not None and not isinstance(remedies, Remedies):
            raise TypeError(f"remedies must be a gradguard.Remedies or None, got {remedies!r}")
        self.remedies = remedies
        if remedies is not None:
            remedies.bind(self)
            if isinstance(model_or_params, torch.optim.Optimizer):  # its state rolls back too
                remedies.attach_optimizer(model_or_params)

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
        Guard step per optimizer step) and closures. Attached to several optimizers
        that share one backward pass, it runs once per backward pass (in the first
        ``step()``), and the other optimizers follow its decision; under a GradScaler,
        call ``scaler.unscale_`` on each of them before the first ``scaler.step``, so
        that the Guard sees every gradient unscaled.

        Args:
            optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, AdamW, ... foreach or
                fused).

        Returns:
            ``self``, so that ``guard = Guard(model).attach(opt)`` reads naturally.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        if any(ref() is optimizer for ref, _ in self._attached):
            return self
        covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not covered & {id(p) for p in self.params}:  # checked before anything changes
            raise ValueError("optimizer updates none of the Guard's parameters")
        original = optimizer.step
        guard = self

        @functools.wraps(original)
        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if not guard._run_once_per_gradient(opt):
                return None
            if guard.remedies is None:
                return original(*args, **kwargs)
            with guard.remedies.scaled_lr(opt):  # LR backoff for this step only
                return original(*args, **kwargs)

        step.__gradguard_original__ = original  # type: ignore[attr-defined]
        # A bound method, as torch's LR schedulers expect (they wrap ``step.__func__``).
        optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
        self._attached.append((weakref.ref(optimizer), original))
        if self.remedies is not None:
            self.remedies.attach_optimizer(optimizer)
        return self

    def _run_once_per_gradient(self, optimizer: torch.optim.Optimizer) -> bool:
        """The Guard's step for an attached ``optimizer.step()``.

        With several attached optimizers (e.g. one for the encoder, one for the decoder),
        the first to step after a backward pass runs the Guard over all its parameters;
        the others reuse that decision, so gradients are clipped once and the statistics
        see one step. "The same gradients" means the same tensors at the same version.
        """
        # GradScaler hands fused optimizers the scale and the overflow flag as
        # attributes (their gradients are still scaled); None otherwise.
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        if len(self._attached) < 2:
            return self._run(grad_scale=grad_scale, found_inf=found_inf)
        seen = self._last_gradients
        grads = [p.grad for p in self.params]
        if seen is not None and len(seen[0]) == len(grads) and all(
            (g is None and r is None) or (r is not None and r() is g and g._version == v)
            for g, r, v in zip(grads, seen[0], seen[1], strict=True)
        ):
            return seen[2]
        proceed = self._run(grad_scale=grad_scale, found_inf=found_inf)
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

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers this Guard is attached to."""
        return [o for o in (ref() for ref, _ in self._attached) if o is not None]

    # ----------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------

    def observe_loss(self, loss: Tensor | float) -> None:
        """Give the Guard this step's loss (for the record and loss-spike remedies).

        Call it any time before the optimizer step; the value stays on the device.
        """
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got a tensor of shape "
                                 f"{tuple(loss.shape)}")
            value = loss.detach().reshape(()).float()
        else:
            value = torch.tensor(float(loss), device=self._device)
        # NaN in the monitor means "no loss given": an observed NaN is recorded as inf.
        self._pending_loss = torch.where(torch.isnan(value), math.inf, value)
        if self._sync is not None:  # a non-finite loss names this rank in events
            self._sync.observe_loss(self._pending_loss)

    def step(self) -> bool:
        """Clip and check the gradients now (the explicit form of :meth:`attach`).

        Call it between ``loss.backward()`` (after ``scaler.unscale_(optimizer)`` when
        using a GradScaler) and ``optimizer.step()``.

        Returns:
            Whether the optimizer should step: ``False`` only when ``nonfinite="skip"``
            (or a remedy) decided to skip. With ``"zero"``/``"ignore"`` this is always
            ``True`` and nothing is read on the host.
        """
        return self._run()

    @torch.no_grad()
    def _run(self, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> bool:
        self.step_count += 1
        step_no = self.step_count
        if self._skip_next > 0:  # a rollback asked to skip the batches that follow it
            self._skip_next -= 1  # (on every rank alike: remedies decide on shared data)
            # No collective on these steps, so a rank's own loss must not reach the
            # record: remedies acting on it would part the ranks.
            self._pending_loss = None
            if self._sync is not None:
                self._sync.discard()
            self._record_skip(step_no, reason="rollback")
            return False

        params = self.params
        grads = [p.grad for p in params]
        present_idx = [i for i, g in enumerate(grads) if g is not None]
        if not present_idx:
            if self._sync is not None:
                self._sync.discard()
            return True
        grads_present = [grads[i] for i in present_idx]
        groups = _norms.TensorGroups(grads_present, what="parameters[{}].grad")
        if groups.partial and (self.policy is not None or self.nonfinite == "zero"):
            groups.writable()  # raises: clipping would miss the pending sum
        p = self.norm_type
        all_present = len(present_idx) == len(params)

        unit = measured = param_norm = None
        wants = getattr(self.policy, "wants_param_norm", None)
        want_param_norm = callable(wants) and bool(wants(self.optimizers))
        if self._sync is not None:
            # Distributed: every statistic of the step in ONE all-reduce; the results
            # (and so every decision below) are identical on all ranks.
            measured = self._sync.measure(
                groups, [params[i] for i in present_idx], policy=self.policy,
                loss=self._pending_loss, grad_scale=grad_scale, found_inf=found_inf,
                repair=self.nonfinite == "zero",
                all_params=params if want_param_norm else None)
            present_norms, unit, g_units = measured.norms, measured.unit, measured.g_units
            self._pending_loss, param_norm = measured.loss, measured.param_norm
        elif self.policy is not None and self.policy.unitwise:
            # AGC: unit norms give the per-tensor norms for free (one read of the grads).
            unit = AgcUnits(groups.local, groups.shards)
            g_units = _norms.grouped_unit_norms(groups.local, unit.groups)
            grouped = torch.cat([torch.linalg.vector_norm(n.flatten(1), dim=1) for n in g_units])
            order = [i for idx in unit.groups for i in idx]
            if order == sorted(order):
                present_norms = grouped
            else:  # back to parameter order
                inverse = sorted(range(len(order)), key=order.__getitem__)
                present_norms = grouped.index_select(0, self._device_index(inverse, grouped))
            if groups.shards:  # shard norms (before units are completed) -> full norms
                present_norms = _norms._reduce_shard_norms(present_norms, groups.shards, 2.0)
                g_units = unit._complete(g_units, groups.local)
        else:
            present_norms = groups.norms(p)
        if measured is None:
            present_norms = present_norms.to(device=self._device, dtype=torch.float32)
            if grad_scale is not None:  # fused optimizer under GradScaler: grads are scaled
                inv = (1.0 / grad_scale.to(self._device, torch.float32)).reshape(())
                present_norms = present_norms * inv
            if want_param_norm:
                param_norm = torch.linalg.vector_norm(_norms.TensorGroups(params).norms(2.0))
        if all_present:
            norms, present = present_norms, None
        else:
            norms = torch.zeros(len(params), device=self._device)
            index = self._device_index(present_idx, norms)
            norms = norms.index_copy(0, index, present_norms)
            present = torch.zeros(len(params), dtype=torch.bool, device=self._device)
            present = present.index_fill(0, index, True)
        if measured is not None:
            total, finite = measured.total, measured.finite
        else:
            total = _norms.total_norm(present_norms, p, process_group=self.process_group)
            finite = torch.isfinite(total)
        if found_inf is not None:  # fused optimizer under GradScaler: overflow is its call
            overflow = found_inf.reshape(()).to(self._device) != 0
            if measured is not None and measured.overflow is not None:
                overflow = measured.overflow  # any rank's overflow
            ok = torch.logical_not(overflow)  # logical_not, not ~: FakeTensorMode lacks it
            observed = finite & ok
            nonfinite_flag = torch.logical_not(finite) & ok
        else:
            observed, nonfinite_flag = finite, torch.logical_not(finite)

        # ---- non-finite gradients ----------------------------------------------------
        scaler_mode = self.scaler is not None or found_inf is not None
        if self.nonfinite in ("skip", "raise") or self.scaler is not None:
            if not bool(finite):  # the one host read of these modes
                if scaler_mode:
                    # The GradScaler skips this step and lowers its scale: not an
                    # observation, not an event. (A fused optimizer skips it by itself.)
                    return found_inf is not None
                bad = self._nonfinite_names(norms, present)
                if self.nonfinite == "raise":
                    where = ("" if measured is None else
                             "; " + describe_origin(self._sync.origin(measured.codes)))
                    raise NonFiniteGradientError(
                        f"step {step_no}: non-finite gradient in {', '.join(bad[:5])}"
                        f"{' and more' if len(bad) > 5 else ''}{where}. Lower the learning rate, "
                        "check the inputs and the loss for NaN/inf, or use "
                        "Guard(nonfinite='skip') to skip such steps."
                    )
                self._record_nonfinite_skip(step_no, norms, total, bad, measured)
                return False
        elif self.nonfinite == "zero" and measured is None:  # (distributed: done in measure)
            repaired = self._zero_nonfinite(groups, finite)
            if repaired is not None:
                present_norms = repaired.to(device=self._device, dtype=torch.float32)
                if present is None:
                    norms = present_norms
                else:
                    norms = norms.index_copy(0, index, present_norms)
                total = _norms.total_norm(present_norms, p, process_group=self.process_group)
                if unit is not None:  # AGC clips the repaired units, not the NaN ones
                    g_units = _norms.grouped_unit_norms(groups.local, unit.groups)

        # ---- threshold and scaling ---------------------------------------------------
        info = StepNorms(norms=norms, total=total, finite=observed, present=present,
                         params=params, optimizers=self.optimizers)
        if want_param_norm:  # the policy asked for ||theta|| (no collective of its own)
            info.param_norm = param_norm
        one = torch.ones((), device=self._device)
        nan = torch.full((), math.nan, device=self._device)
        if self.policy is None:
            coef, threshold, post = one, nan, total
        elif unit is not None:
            if measured is not None:
                w_units = measured.w_units
            else:
                w_local, _ = _norms._localize([params[i] for i in present_idx])
                w_units = unit.norms(w_local)
            coefs = self.policy.unit_coefficients(g_units, w_units)  # type: ignore[attr-defined]
            if self.nonfinite == "ignore":
                coefs = [torch.where(finite, c, 1.0) for c in coefs]
            unit.mul_(groups.local, coefs)
            threshold = nan
            if measured is not None:  # over every rank's units
                coef, post = measured.agc_summary(
                    coefs, ones_if_nonfinite=self.nonfinite == "ignore")
            else:
                mins = [c.amin() for c in coefs if c.numel()]  # (FSDP2: shards may be empty)
                coef = torch.stack(mins).amin().to(self._device) if mins else one
                post_sq = torch.stack([
                    (n * c).square().sum().to(self._device) for n, c in zip(g_units, coefs,
                                                                             strict=True)
                ]).sum()
                post = post_sq.sqrt() if not groups.shards else total * coef
        else:
            self.policy.setup(len(params), self._device)
            coef, threshold = self.policy.compute(info)
            if self.nonfinite == "ignore" or found_inf is not None:
                coef = torch.where(observed, coef, torch.ones_like(coef))
            if self.policy.per_tensor:
                apply = coef if present is None else coef.index_select(0, index)
                groups.mul_(apply)
                post = torch.linalg.vector_norm(norms * coef, p)
                coef = coef.amin() if coef.numel() else one
                threshold = threshold.amin() if threshold.numel() else nan
            else:
                groups.mul_(coef)
                post = total * coef
        clipped = (coef < 1) & observed

        self._finish(step_no, total, post, threshold, coef, clipped, nonfinite_flag,
                     torch.zeros((), dtype=torch.bool, device=self._device), norms)
        if self.remedies is not None:
            self.remedies.raise_pending_abort()  # decided in this step's monitor flush
        if self.remedies is not None and not self.remedies.after_step(step_no):
            self._counters[3] += 1  # a rollback at this step: its update is dropped too
            return False
        return True

    # ----------------------------------------------------------------------------------
    # Pieces of the step
    # ----------------------------------------------------------------------------------

    def _finish(
        self, step_no: int, total: Tensor, post: Tensor, threshold: Tensor, coef: Tensor,
        clipped: Tensor, nonfinite: Tensor, skipped: Tensor, norms: Tensor,
    ) -> None:
        f32 = torch.float32
        loss = self._pending_loss
        self._pending_loss = None
        if loss is None:
            loss = torch.full((), math.nan, device=self._device)
        last = {
            "pre_norm": total.to(f32), "post_norm": post.to(f32),
            "threshold": threshold.to(f32), "coef": coef.to(f32),
            "clipped": clipped, "nonfinite": nonfinite, "skipped": skipped,
            "loss": loss.to(self._device, f32),
        }
        self._last = last
        flags = torch.stack([torch.ones_like(clipped), clipped, nonfinite, skipped])
        self._counters += flags.to(torch.int64)
        if self.monitor is not None:
            fields = torch.stack([last[k].to(f32).reshape(()) for k in FIELDS])
            self.monitor.observe(step_no, fields, norms.to(f32))

    def _nonfinite_names(self, norms: Tensor, present: Tensor | None) -> list[str]:
        bad = torch.logical_not(torch.isfinite(norms)).tolist()
        return [n for n, b in zip(self.names, bad, strict=True) if b]

    def _record_nonfinite_skip(
        self, step_no: int, norms: Tensor, total: Tensor, bad: list[str],
        measured: _dist.Measured | None = None,
    ) -> None:
        nan = torch.full((), math.nan, device=self._device)
        true = torch.ones((), dtype=torch.bool, device=self._device)
        false = torch.zeros((), dtype=torch.bool, device=self._device)
        self._finish(step_no, total, nan, nan, nan, false, true, true, norms)
        if self.monitor is not None:
            data: dict[str, Any] = {"n_layers": len(bad)}
            rank, where = _rank(self.process_group), ""
            if measured is not None:  # which rank saw it first (a host read: skipping anyway)
                assert self._sync is not None
                data.update(self._sync.origin(measured.codes))
                rank = data["first_rank"] if data["first_rank"] is not None else rank
                where = "; " + describe_origin(data)
            event = Event(
                step=step_no, kind="nonfinite",
                message=(f"non-finite gradient in {', '.join(bad[:5])}"
                         f"{' and more' if len(bad) > 5 else ''}; step skipped{where}"),
                layers=bad[:5], data=data, rank=rank,
            )
            self.monitor.emit(event, keep_rank=True)  # the rank that saw it, even rank 0
        if self.remedies is not None:
            self.remedies.on_skip(step_no, reason="nonfinite")
            self.remedies.raise_pending_abort()

    def _record_skip(self, step_no: int, reason: str) -> None:
        nan = torch.full((), math.nan, device=self._device)
        true = torch.ones((), dtype=torch.bool, device=self._device)
        false = torch.zeros((), dtype=torch.bool, device=self._device)
        zeros = torch.zeros(len(self.params), device=self._device)
        self._finish(step_no, nan, nan, nan, nan, false, false, true, zeros)
        if self.monitor is not None:
            self.monitor.emit(Event(step=step_no, kind="skip",
                                    message=f"step skipped ({reason})", data={"reason": reason},
                                    rank=_rank(self.process_group)))
        if self.remedies is not None:
            self.remedies.step_dropped()
            self.remedies.raise_pending_abort()

    def _device_index(self, indices: list[int], like: Tensor) -> Tensor:
        """A cached int64 index tensor on ``like``'s device (one host->device copy ever)."""
        key = (tuple(indices), like.device)
        cache = self.__dict__.setdefault("_index_cache", {})
        index = cache.get(key)
        if index is None:
            if len(cache) > 64:
                cache.clear()
            index = cache[key] = torch.tensor(indices, dtype=torch.int64, device=like.device)
        return index

    def _zero_nonfinite(self, groups: _norms.TensorGroups, finite: Tensor) -> Tensor | None:
        """Replace NaN/inf entries by 0; return the repaired per-tensor norms (or None)."""
        if groups.all_cpu and bool(finite):
            return None  # free check on CPU: nothing to repair
        for g in groups.local:
            g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return groups.norms(self.norm_type)

    # ----------------------------------------------------------------------------------
    # Introspection
    # ----------------------------------------------------------------------------------

    @property
    def last(self) -> dict[str, Tensor]:
        """The last step's record, as device tensors (no sync): ``pre_norm``,
        ``post_norm``, ``threshold``, ``coef``, ``clipped``, ``nonfinite``, ``skipped``,
        ``loss``."""
        return dict(self._last)

    def stats(self) -> dict[str, int]:
        """Exact counters since the start: steps, clipped, nonfinite, skipped (one sync)."""
        return dict(zip(_COUNTERS, self._counters.tolist(), strict=True))

    def flush(self) -> list[Event]:
        """Flush the monitor now (e.g. at the end of training); returns the new events."""
        events = [] if self.monitor is None else self.monitor.flush()
        if self.remedies is not None:
            self.remedies.raise_pending_abort()
        return events

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
        remedies state."""
        return {
            "version": 1,
            "step_count": self.step_count,
            "skip_next": self._skip_next,
            "counters": self._counters.detach().clone(),
            "names": list(self.names),
            "policy": None if self.policy is None else self.policy.state_dict(),
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
            "remedies": None if self.remedies is None else self.remedies.state_dict(),
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
        self._counters = state_dict["counters"].detach().clone().to(self._device)
        if self.policy is not None:
            self.policy.setup(len(self.params), self._device)
            self.policy.load_state_dict(state_dict["policy"])
        if self.monitor is not None and state_dict.get("monitor") is not None:
            self.monitor.load_state_dict(state_dict["monitor"])
        if self.remedies is not None and state_dict.get("remedies") is not None:
            self.remedies.load_state_dict(state_dict["remedies"])

    def __repr__(self) -> str:
        return (f"Guard({len(self.params)} tensors, clip={self.policy!r}, "
                f"nonfinite={self.nonfinite!r})")


def _rank(process_group: Any) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
