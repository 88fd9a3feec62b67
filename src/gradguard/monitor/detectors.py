"""The monitor's event detectors: small classes that each declare their own state.

Each detector looks at one flushed interval (:class:`~gradguard.monitor.record.IntervalRows`)
on the host and returns the events it finds. State that must survive a checkpoint is
declared once with :meth:`Detector.add_state` (the torchmetrics ``add_state`` idea), so
``state_dict``/``load_state_dict``/``reset`` are derived from the declarations, for each
detector and for the :class:`~gradguard.monitor.Monitor` that holds them. Thresholds are
constructor arguments, validated there.

``spike`` (:class:`Spike`)
    A step whose pre-clip global norm exceeds ``spike_factor`` (default 10) times a
    robust running baseline: an exponential moving average (``spike_beta`` = 0.98, a
    half-life of ~34 steps) of the *log* norm over earlier finite steps, each update
    winsorised to +-log(spike_factor) so that a spike barely moves the baseline while a
    lasting level shift is still absorbed within ~50-100 steps. No detection during the
    first ``spike_warmup`` (20) finite steps, while the baseline settles. Healthy runs
    have step-to-step log-norm noise of roughly 0.1-0.5, so 10x (2.3 in log) is 5-20
    standard deviations away: it does not fire on noise, and a factor of 10 is what
    practitioners call a spike. A spike step opens an *episode*, and the spike steps of
    the next ``spike_cooldown`` (50) steps belong to it: one event per episode (at its
    first step; its data counts the episode's spike steps and its peak within the
    interval), so at most one spike event per 50 steps, even while norms keep climbing
    (an explosion then reports again every 50 steps rather than going quiet). Every
    spike step is counted in the record's ``spikes`` field. The event names the layers with
    the largest growth over their own running baseline, among the layers that carry at
    least an average share (1/N) of the spike's squared norm (so a tiny bias that grew
    100x from nothing does not outrank the matrix that blew up).
``nonfinite`` (:class:`NonFinite`)
    A step counts as non-finite when its ``nonfinite`` flag is set or its pre-clip norm
    or any per-tensor norm is NaN/inf. One event per interval, at the first such step,
    naming the first non-finite layers in model order (``max_layers`` of them) and
    counting all non-finite steps of the interval: with fp16 loss scaling, overflow
    steps are routine and one event per step would drown everything else.
``skip`` (:class:`Skip`)
    One event per interval with the number of skipped steps and the first of them, for
    the same reason. The record's ``skipped`` count is exact in any case.
``vanishing`` (:class:`Vanishing`)
    A layer (parameter tensor) whose norm was below ``max(vanishing_abs, vanishing_rel x
    the median layer norm of that step)`` on every finite step of the interval on which
    it had a gradient, while at least one other layer was not. Defaults 1e-5 and 1e-10:
    healthy per-tensor norms spread over ~3 orders of magnitude (tensor sizes alone
    explain up to ~2), so five orders below the median is far outside healthy. A norm of
    exactly 0 means "no gradient this step" (the Guard writes 0 for ``None`` grads) and
    is ignored, so unused parameters never fire. An event is emitted when layers *enter*
    the vanishing set; they leave it when an interval sees them above the floor.
``high_clip_rate`` (:class:`ClipRate`)
    More than ``clip_rate_threshold`` (0.5) of the interval's finite steps were clipped:
    the threshold is too tight or the learning rate too high (heavy clipping silently
    turns the learning rate down). Emitted when the rate crosses the threshold and
    re-armed once an interval falls below half of it, so a run that clips steadily gets
    one event, not one per interval. Its advice depends on the clip policy (``policy``):
    for a fixed threshold, raise it or let it adapt; for ``"auto"``, its trust cap binds
    at this learning rate (SGD-type optimizers; expected when it is high) or its
    Adam-family rule clips at the typical norm by design; AutoClip, AdaGC and AGC clip
    most steps by design. Disable it (None) for policies that clip most steps by design.

``update_spike`` (:class:`UpdateSpike`)
    With an Adam-family optimizer watched, the monitor samples two per-layer signals at
    the last step of every interval (:mod:`gradguard.monitor.optim_signals`): the RMS of
    the gradient relative to Adam's second moment (``grad_v_rms``) and the update-to-weight
    ratio per unit of learning rate (``update_ratio_per_lr``: a warm-up or decay schedule
    does not move it). Each layer and signal keeps a running mean and variance of the
    *log* value over its samples (EMA with ``update_spike_beta`` = 0.9 per sample, a
    plain running mean/variance over the first samples; NaN values and samples of
    non-finite or skipped steps are left out). After ``update_spike_warmup`` (5) samples,
    a value is a jump when its log exceeds the mean by more than
    ``max(update_spike_z x std, log(update_spike_factor))`` (defaults z = 4, factor = 3,
    i.e. at least 3x the running level): the z-score adapts the band to each layer's own noise
    (a one-entry bias has a log-std of ~1, a large matrix ~0.05), the factor keeps
    quiet layers from firing on a meaningless 20% move. Updates of the statistics are
    winsorised to that band, so a spike barely moves them. One event per sample naming
    the layers that newly jumped (a layer stays flagged, without new events, until a
    sample is back inside its band). Update spikes relative to an out-of-date second
    moment precede loss spikes in large runs (Wortsman et al. 2023, arXiv:2309.14322).

The interval detectors (vanishing, high_clip_rate) need at least ``min_steps`` finite
steps in the interval, so that an explicit flush after a handful of steps does not judge
on too little evidence.

Non-finite and skipped steps the host already knows about (the Guard reads the flag to
skip a step) are reported by the same two detectors, at once, through
:meth:`NonFinite.note` and :meth:`Skip.note`; a detector built with
``interval_events=False`` then leaves those steps out of its interval events (the record
counts stay exact).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradguard._validation import (
    check_fraction,
    check_int,
    check_open_interval,
    check_threshold,
)
from gradguard.log.events import Event
from gradguard.monitor.optim_signals import SIGNALS
from gradguard.monitor.record import IntervalRows

__all__ = [
    "CLIP_RATE_ADVICE",
    "ClipRate",
    "Detector",
    "NonFinite",
    "Skip",
    "Spike",
    "UpdateSpike",
    "Vanishing",
    "describe_origin",
    "policy_name",
]


# --------------------------------------------------------------------------------------
# The base: state declared once
# --------------------------------------------------------------------------------------


def _fresh(default: Any) -> Any:
    if isinstance(default, Tensor):
        return default.clone()
    if isinstance(default, set):
        return set(default)
    return default  # None, bool, int, float: immutable


def _export(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, set):
        return sorted(value)
    return value


def _restore(value: Any, default: Any) -> Any:
    """A saved value back in the type of the state's default."""
    if isinstance(default, Tensor):
        return value.detach().to("cpu", default.dtype).clone()
    if isinstance(default, set):
        return set(value)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(value)
    return value  # a default of None: a float or None as saved


class Detector:
    """Base class of the detectors: one event kind, host state declared with
    :meth:`add_state`.

    Args:
        names: one name per parameter tensor, in the order of the per-tensor norms.
        rank: the distributed rank stamped on the events.
        max_layers: at most this many layer names per event.
    """

    #: The kind of the events this detector emits.
    kind: ClassVar[str] = ""

    def __init__(self, names: Sequence[str], *, rank: int = 0, max_layers: int = 5) -> None:
        self.names = list(names)
        self.rank = rank
        self.max_layers = max_layers
        self._defaults: dict[str, Any] = {}

    def add_state(self, name: str, default: Any) -> None:
        """Declare a piece of state: an attribute ``name`` set to (a copy of) ``default``,
        saved by :meth:`state_dict`, restored by :meth:`load_state_dict` in the type of
        ``default`` and reset by :meth:`reset`.

        Args:
            name: the attribute and state key.
            default: its initial value: None, a bool, int or float, a set (saved as a
                sorted list) or a tensor (kept on the CPU, in its dtype).

        Raises:
            ValueError: if ``name`` is already declared or is an attribute.
        """
        if name in self._defaults or hasattr(self, name):
            raise ValueError(f"{type(self).__name__}: state {name!r} is already declared")
        self._defaults[name] = default
        setattr(self, name, _fresh(default))

    @property
    def state_names(self) -> tuple[str, ...]:
        """The declared state, in declaration order."""
        return tuple(self._defaults)

    def reset(self) -> None:
        """Every declared state back to its default."""
        for name, default in self._defaults.items():
            setattr(self, name, _fresh(default))

    def state_dict(self) -> dict[str, Any]:
        """The declared state (tensors cloned, sets as sorted lists)."""
        return {name: _export(getattr(self, name)) for name in self._defaults}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the declared state from ``state`` (other keys are ignored).

        Raises:
            KeyError: if a declared state is missing.
        """
        for name, default in self._defaults.items():
            setattr(self, name, _restore(state[name], default))

    def config(self) -> dict[str, Any]:
        """The detector's options, for the monitor's meta."""
        return {}

    def update(self, rows: IntervalRows) -> list[Event]:
        """Look at one interval, update the state, return the new events."""
        raise NotImplementedError


def _more(shown: int, total: int) -> str:
    return f" (+{total - shown} more)" if total > shown else ""


# --------------------------------------------------------------------------------------
# Spikes
# --------------------------------------------------------------------------------------


class Spike(Detector):
    """Pre-clip norms far above a robust running baseline, one event per episode (see the
    module docstring).

    Args:
        names, rank, max_layers: as for :class:`Detector`.
        factor: a step is a spike when its pre-clip norm exceeds the running baseline by
            this factor (None: no detection; the baselines are still kept).
        warmup: finite steps before detection starts.
        beta: EMA coefficient of the log-norm baseline (per step).
        cooldown: spike steps less than this many steps after the step that opened an
            episode belong to it (one event per episode).

    Attributes:
        last_count: the spike steps of the last interval (for the record's ``spikes``).
    """

    kind = "spike"

    def __init__(
        self,
        names: Sequence[str],
        *,
        factor: float | None = 10.0,
        warmup: int = 20,
        beta: float = 0.98,
        cooldown: int = 50,
        rank: int = 0,
        max_layers: int = 5,
    ) -> None:
        super().__init__(names, rank=rank, max_layers=max_layers)
        self.factor = None if factor is None else check_open_interval(
            factor, "spike_factor", 1.0, math.inf)
        self.warmup = check_int(warmup, "spike_warmup", 0)
        self.beta = check_fraction(beta, "spike_beta")
        self.cooldown = check_int(cooldown, "spike_cooldown", 1)
        self.add_state("log_base", None)  # EMA of the log pre-clip norm
        self.add_state("n_base", 0)  # finite steps folded into it
        self.add_state("episode_start", None)  # step of the last spike episode's onset
        # EMA of each layer's log norm over baseline steps (NaN: not seen yet).
        self.add_state("layer_base", torch.full((len(self.names),), math.nan,
                                                dtype=torch.float64))
        self.last_count = 0

    def config(self) -> dict[str, Any]:
        return {"spike_factor": self.factor, "spike_warmup": self.warmup,
                "spike_beta": self.beta, "spike_cooldown": self.cooldown}

    def update(self, rows: IntervalRows) -> list[Event]:
        spike_rows, episodes = self._detect(rows)
        self.last_count = len(spike_rows)
        interval_log_mean, bcnt = self._baseline_log_means(rows, set(spike_rows))
        # Reference for spike attribution: the baseline from earlier intervals, else this
        # interval's own baseline steps.
        ref = torch.where(torch.isnan(self.layer_base), interval_log_mean, self.layer_base)
        events = [self._event(ep, rows, ref) for ep in episodes]
        # Fold this interval into the per-layer baselines: as if each baseline step had
        # been an EMA update with beta (1 - beta**k of weight for k steps).
        w = 1.0 - torch.pow(torch.full_like(interval_log_mean, self.beta), bcnt)
        upd = torch.where(
            torch.isnan(self.layer_base),
            interval_log_mean,
            self.layer_base + w * (interval_log_mean - self.layer_base),
        )
        self.layer_base = torch.where(bcnt > 0, upd, self.layer_base)
        return events

    def _detect(self, rows: IntervalRows) -> tuple[list[int], list[dict[str, Any]]]:
        """Run the detector over the interval's rows, in order (host floats only).

        Returns the spike rows and the episodes *opened* in this interval.
        """
        spike_rows: list[int] = []
        episodes: list[dict[str, Any]] = []
        if self.factor is None:
            return spike_rows, episodes
        pre, bad, steps = rows.pre, rows.bad, rows.steps
        log_factor = math.log(self.factor)
        open_ep: dict[str, Any] | None = None
        for i, x in enumerate(pre):
            if bad[i] or not x > 0:  # non-finite steps have their own detector
                continue
            lx = math.log(x)
            if self.log_base is None:
                self.log_base, self.n_base = lx, 1
                continue
            dev = lx - self.log_base
            if self.n_base >= self.warmup and dev > log_factor:
                spike_rows.append(i)
                start = self.episode_start
                if start is None or steps[i] - start >= self.cooldown:
                    open_ep = {"row": i, "n": 1, "peak_row": i, "base": self.log_base}
                    episodes.append(open_ep)
                    self.episode_start = steps[i]
                elif open_ep is not None:  # continues an episode opened in this interval
                    open_ep["n"] += 1
                    if x > pre[open_ep["peak_row"]]:
                        open_ep["peak_row"] = i
                # else: continues an episode reported at an earlier flush (counted only)
            # Winsorised EMA update; during warm-up beta grows from 0 (a running mean), so
            # the baseline is not stuck at the first step's norm.
            beta = min(self.beta, self.n_base / (self.n_base + 1))
            self.log_base += (1.0 - beta) * max(-log_factor, min(log_factor, dev))
            self.n_base += 1
        return spike_rows, episodes

    @staticmethod
    def _baseline_log_means(rows: IntervalRows, spikes: set[int]) -> tuple[Tensor, Tensor]:
        """Per layer: the log of the interval's mean norm over its baseline rows (finite
        steps that are not spikes; NaN without any), and the count of those rows."""
        base_row = torch.tensor(
            [not rows.bad[i] and i not in spikes for i in range(rows.n)], dtype=torch.bool
        )
        bvalid = rows.valid & base_row.unsqueeze(1)
        bcnt = bvalid.sum(dim=0)
        zero = torch.zeros((), dtype=torch.float64)
        nan = torch.full((), math.nan, dtype=torch.float64)
        # log of the interval's mean norm, not the mean of logs: one log per layer instead
        # of one per element (elementwise transcendental ops on the whole block are the
        # most expensive part of a flush; spike steps are excluded, so this is robust).
        bmean = torch.where(bvalid, rows.layers, zero).sum(dim=0) / bcnt.clamp(min=1)
        return torch.where(bcnt > 0, bmean.clamp(min=1e-300).log(), nan), bcnt

    def _largest_growth(self, row: Tensor, ref: Tensor) -> tuple[list[str], list[float]]:
        """The layers of a spike step that grew most over their baseline, among those with
        at least an average share of the step's squared norm, and their growth."""
        if not row.numel():
            return [], []
        ok = torch.isfinite(row) & (row > 0) & torch.isfinite(ref)
        sq = torch.where(torch.isfinite(row), row, 0.0).square()
        share_ok = sq >= sq.sum() / row.numel()  # at least an average share
        cand = ok & share_ok if bool((ok & share_ok).any()) else ok
        g = torch.where(cand, row.clamp(min=1e-300).log() - ref, -math.inf)
        k = min(self.max_layers, int(cand.sum()))
        if not k:
            return [], []
        top = torch.topk(g, k).indices.tolist()
        return [self.names[j] for j in top], [math.exp(float(g[j])) for j in top]

    def _event(self, ep: dict[str, Any], rows: IntervalRows, ref: Tensor) -> Event:
        i, steps, pre = ep["row"], rows.steps, rows.pre
        norm, base = pre[i], math.exp(ep["base"])
        layers, growth = self._largest_growth(rows.layers[i], ref)
        ratio = norm / base
        what = (
            f"gradient norm {norm:.4g} at step {steps[i]} is {ratio:.1f}x its running baseline "
            f"{base:.4g}"
        )
        if ep["n"] > 1:
            what += f" ({ep['n']} spike steps in this episode, peak {pre[ep['peak_row']]:.4g} "
            what += f"at step {steps[ep['peak_row']]})"
        if layers:
            what += f"; largest growth in {', '.join(layers[:3])}"
            what += f" ({', '.join(f'{x:.3g}x' for x in growth[:3])})"
        if rows.skipped[i]:
            what += "; the step was skipped"
        elif rows.clipped[i]:
            what += f"; clipped to {rows.post[i]:.4g}"
        else:
            what += "; it was NOT clipped"
        what += (
            ". If spikes recur: lower the learning rate or lengthen its warm-up, use an "
            "adaptive clip threshold, and look at the named layers (normalisation, init)."
        )
        data = {
            "norm": norm, "baseline": base, "ratio": ratio, "factor": self.factor,
            "post_norm": rows.post[i], "coef": rows.coef[i], "clipped": rows.clipped[i],
            "skipped": rows.skipped[i], "loss": rows.loss[i], "layer_growth": growth,
            "n_spike_steps": ep["n"], "peak_norm": pre[ep["peak_row"]],
            "peak_step": steps[ep["peak_row"]],
        }
        return Event(step=steps[i], kind="spike", message=what, layers=layers, rank=self.rank,
                     data=data)


# --------------------------------------------------------------------------------------
# Non-finite and skipped steps
# --------------------------------------------------------------------------------------


def describe_origin(info: Mapping[str, Any]) -> str:
    """A phrase for event messages: where a non-finite step of a distributed run came from.

    Args:
        info: ``first_rank`` (``None``: no rank saw it first), ``world_size`` and
            ``evidence`` (``"loss"``, ``"gradient"`` or ``"local"``).
    """
    first = info["first_rank"]
    n = info["world_size"]
    if first is None:
        return f"skipped on all {n} ranks"
    why = {
        "loss": "its loss was non-finite",
        "gradient": "its own gradient was non-finite before the all-reduce",
        "local": "its gradients were non-finite at the Guard step",
    }[info["evidence"]]
    return f"first seen on rank {first} ({why}); every one of the {n} ranks took the same decision"


class NonFinite(Detector):
    """Non-finite steps: one event per interval, or one per step the host noted.

    Args:
        names, rank, max_layers: as for :class:`Detector`.
        interval_events: report the interval's non-finite steps at flush; ``False`` when
            the host notes every one of them as it happens (:meth:`note`).
    """

    kind = "nonfinite"

    def __init__(self, names: Sequence[str], *, interval_events: bool = True, rank: int = 0,
                 max_layers: int = 5) -> None:
        super().__init__(names, rank=rank, max_layers=max_layers)
        self.interval_events = bool(interval_events)

    def update(self, rows: IntervalRows) -> list[Event]:
        if not self.interval_events or not rows.n_bad:
            return []
        steps = rows.steps
        bad_rows = [i for i, b in enumerate(rows.bad) if b]
        i = bad_rows[0]
        finite = rows.layer_finite
        offenders = (~finite[i]).nonzero().flatten().tolist() if finite.shape[1] else []
        layers = [self.names[j] for j in offenders[: self.max_layers]]
        where = (
            f"first non-finite layers in model order: {', '.join(layers)}"
            + _more(len(layers), len(offenders))
            if layers
            else "no per-tensor norm is non-finite (the flag or total norm is)"
        )
        n_skipped = sum(1 for r in bad_rows if rows.skipped[r])
        msg = (
            f"non-finite gradient at step {steps[i]} ({len(bad_rows)} non-finite step(s) in "
            f"steps {steps[0]}-{steps[-1]}, {n_skipped} skipped); {where}. Try: a lower "
            "learning rate or longer warm-up, bf16 instead of fp16 (or a GradScaler), and "
            "check the loss and inputs for NaN/inf."
        )
        data = {"count": len(bad_rows), "steps": [steps[r] for r in bad_rows[:10]],
                "n_layers_nonfinite": len(offenders), "pre_norm": rows.pre[i],
                "skipped": n_skipped}
        return [Event(step=steps[i], kind="nonfinite", message=msg, layers=layers,
                      rank=self.rank, data=data)]

    def note(self, step: int, *, layers: Sequence[str] = (),
             origin: Mapping[str, Any] | None = None, rank: int | None = None) -> Event:
        """The event of one non-finite step the host skipped as it happened.

        Args:
            step: the step.
            layers: every layer whose gradient was non-finite, in model order.
            origin: in a distributed run, which rank saw it first (``first_rank``,
                ``evidence``, ``world_size``, ...: copied into the event's data); the
                event then carries that rank.
            rank: the rank that saw it (default: this detector's).

        Returns:
            The event (``data``: ``n_layers`` and the origin).
        """
        bad = list(layers)
        data: dict[str, Any] = {"n_layers": len(bad)}
        rank = self.rank if rank is None else rank
        where = ""
        if origin is not None:
            data.update(origin)
            rank = data["first_rank"] if data["first_rank"] is not None else rank
            where = "; " + describe_origin(data)
        shown = bad[: self.max_layers]
        message = (f"non-finite gradient in {', '.join(shown)}"
                   f"{' and more' if len(bad) > len(shown) else ''}; step skipped{where}")
        return Event(step=step, kind="nonfinite", message=message, layers=shown, data=data,
                     rank=rank)


class Skip(Detector):
    """Skipped steps: one event per interval, or one per step the host noted.

    Args:
        names, rank, max_layers: as for :class:`Detector`.
        interval_events: report the interval's skipped steps at flush; ``False`` when the
            host notes them as they happen (:meth:`note`, :meth:`NonFinite.note`).
    """

    kind = "skip"

    def __init__(self, names: Sequence[str], *, interval_events: bool = True, rank: int = 0,
                 max_layers: int = 5) -> None:
        super().__init__(names, rank=rank, max_layers=max_layers)
        self.interval_events = bool(interval_events)

    def update(self, rows: IntervalRows) -> list[Event]:
        if not self.interval_events or not rows.n_skipped:
            return []
        steps = rows.steps
        skip_rows = [i for i, s in enumerate(rows.skipped) if s]
        n_bad = sum(1 for r in skip_rows if rows.bad[r])
        msg = (
            f"{len(skip_rows)} of {len(steps)} steps skipped in steps {steps[0]}-{steps[-1]} "
            f"(first at step {steps[skip_rows[0]]}; {n_bad} of them non-finite). Occasional "
            "skips are harmless; if they are frequent, lower the learning rate or raise the "
            "skip threshold."
        )
        data = {"count": len(skip_rows), "steps": [steps[r] for r in skip_rows[:10]],
                "nonfinite": n_bad, "n_steps": len(steps)}
        return [Event(step=steps[skip_rows[0]], kind="skip", message=msg, layers=[],
                      rank=self.rank, data=data)]

    def note(self, step: int, *, reason: str, rank: int | None = None) -> Event:
        """The event of one step the host skipped for ``reason`` (e.g. ``"rollback"``).

        Returns:
            The event (``data``: ``{"reason": reason}``).
        """
        return Event(step=step, kind="skip", message=f"step skipped ({reason})",
                     data={"reason": reason}, rank=self.rank if rank is None else rank)


# --------------------------------------------------------------------------------------
# Vanishing layers
# --------------------------------------------------------------------------------------


class Vanishing(Detector):
    """Layers orders of magnitude below the rest on every step of an interval (see the
    module docstring); one event when layers enter the vanishing set.

    Args:
        names, rank, max_layers: as for :class:`Detector`.
        rel: a layer is vanishing below this fraction of the step's median layer norm
            (None: no detection).
        abs_floor: ... or below this absolute norm.
        min_steps: finite steps an interval needs to be judged.
    """

    kind = "vanishing"

    def __init__(self, names: Sequence[str], *, rel: float | None = 1e-5,
                 abs_floor: float = 1e-10, min_steps: int = 10, rank: int = 0,
                 max_layers: int = 5) -> None:
        super().__init__(names, rank=rank, max_layers=max_layers)
        self.rel = None if rel is None else check_open_interval(
            rel, "vanishing_rel", 0.0, math.inf)
        self.abs_floor = check_threshold(abs_floor, "vanishing_abs")
        self.min_steps = check_int(min_steps, "min_steps", 1)
        self.add_state("vanishing", set())  # indices of the layers in the vanishing set

    def config(self) -> dict[str, Any]:
        return {"vanishing_rel": self.rel, "vanishing_abs": self.abs_floor}

    def update(self, rows: IntervalRows) -> list[Event]:
        if self.rel is None or rows.n_good < self.min_steps or not rows.layers.shape[1]:
            return []
        lay = rows.layers
        good = torch.tensor([not b for b in rows.bad], dtype=torch.bool)
        v = rows.valid & good.unsqueeze(1)  # finite, non-zero norms on finite steps
        med = torch.nanmedian(torch.where(v, lay, math.nan), dim=1).values  # per step
        floor = torch.clamp(med * self.rel, min=self.abs_floor)
        below = lay < floor.unsqueeze(1)
        seen = v.any(dim=0)
        low = seen & ~(v & ~below).any(dim=0)  # below the floor on every step it was seen
        if int((seen & ~low).sum()) == 0:  # every layer is tiny: nothing is vanishing
            return []  # *relative to the others*
        low_set = set(low.nonzero().flatten().tolist())
        seen_set = set(seen.nonzero().flatten().tolist())
        entered = sorted(low_set - self.vanishing)
        # Layers seen above the floor leave the set; layers without gradient keep their state.
        self.vanishing = (self.vanishing - seen_set) | low_set
        if not entered:
            return []
        shown = entered[: self.max_layers]
        layers = [self.names[j] for j in shown]
        lmax = torch.where(v, lay, -math.inf).amax(dim=0)
        norms = [float(lmax[j]) for j in shown]
        median = float(torch.nanmedian(med)) if bool(torch.isfinite(med).any()) else math.nan
        steps = rows.steps
        msg = (
            f"{len(entered)} layer(s) had vanishing gradients on every step of steps "
            f"{steps[0]}-{steps[-1]}: {', '.join(layers)}{_more(len(shown), len(entered))}, "
            f"max norm {max(norms):.3g} vs a median layer norm of {median:.3g}. Check the "
            "initialisation (gradguard.probe / init_model), normalisation or residual "
            "connections, saturated activations, and whether these parameters are used."
        )
        data = {"n_layers": len(entered), "n_vanishing": len(self.vanishing),
                "layer_norm_max": norms, "median_layer_norm": median, "rel_floor": self.rel,
                "abs_floor": self.abs_floor}
        return [Event(step=steps[-1], kind="vanishing", message=msg, layers=layers,
                      rank=self.rank, data=data)]


# --------------------------------------------------------------------------------------
# Clip rate
# --------------------------------------------------------------------------------------

#: What a ``high_clip_rate`` event advises, for each clip policy (``ThresholdPolicy.name``);
#: ``None``: a policy the monitor does not know.
CLIP_RATE_ADVICE: dict[str | None, str] = {
    "fixed": (
        "the fixed clip threshold is too tight for this learning rate, and heavy clipping "
        "silently lowers the effective learning rate: raise the threshold, let it adapt "
        "(clip='auto'), or lower the learning rate."
    ),
    "auto": (
        "with clip='auto' and an SGD-type optimizer this is its trust cap binding: at this "
        "learning rate an unclipped SGD step would move the parameters by more than rho "
        "(default 0.2%) of their norm, so the Guard caps the step size instead. Expected at "
        "a high learning rate and harmless while the loss falls; to clip less, lower the "
        "learning rate. With an Adam-family optimizer clip='auto' clips at the running "
        "typical norm (ramped in over the first 2 / (1 - beta2) steps), so a quarter or "
        "more of the steps are clipped by design, most of them early in training and "
        "while the norm rises; harmless while the loss falls."
    ),
    "zclip": (
        "ZClip clips norms more than z_thresh standard deviations above its running mean, "
        "so clipping most steps means the gradient norm keeps rising faster than its "
        "statistics follow: lower the learning rate or lengthen its warm-up (a larger "
        "z_thresh would only hide the trend)."
    ),
    "autoclip": (
        "expected: AutoClip clips at the p-th percentile of past norms, so about "
        "(100 - p)% of steps are clipped by design (p = 10: 90%). To clip less, raise the "
        "percentile; to silence this event, set clip_rate_threshold=None."
    ),
    "adagc": (
        "expected: AdaGC clips each tensor whose norm exceeds rel (1.05) times its running "
        "average, and a step counts as clipped when any tensor was, so most steps of a "
        "model with many tensors are. If the loss falls, nothing is wrong; to clip less, "
        "raise rel or lower the learning rate."
    ),
    "agc": (
        "AGC clips each unit whose gradient norm exceeds `clipping` times its weight norm, "
        "and a step counts as clipped when any unit was: on most steps some gradients are "
        "large relative to their weights. If the loss falls, this is AGC at work; to clip "
        "less, raise clipping (NFNets: 0.01-0.16, smaller for larger batches) or lower the "
        "learning rate."
    ),
    None: (
        "the clip threshold is too tight or the learning rate too high, and heavy clipping "
        "silently lowers the effective learning rate: loosen the threshold or lower the "
        "learning rate."
    ),
}


def policy_name(policy: Any) -> str | None:
    """The name of a clip policy as :data:`CLIP_RATE_ADVICE` knows it, or ``None``.

    Args:
        policy: a :class:`~gradguard.ThresholdPolicy` (its ``name``), a policy
            name (``"auto"``, ``"fixed:1.0"``), the policy's repr as the Guard writes it in
            the meta (``"Auto(rho=0.002, ...)"``: the class name), or ``None``.

    Returns:
        One of the keys of :data:`CLIP_RATE_ADVICE` (``None`` for anything else).
    """
    name = getattr(policy, "name", policy)
    if not isinstance(name, str):
        return None
    match = re.match(r"\s*([A-Za-z_]\w*)", name)
    key = match.group(1).lower() if match else None
    return key if key in CLIP_RATE_ADVICE else None


class ClipRate(Detector):
    """Most finite steps of an interval clipped: one event on crossing ``threshold``,
    re-armed once an interval falls below half of it; the advice fits the clip policy.

    Args:
        names, rank, max_layers: as for :class:`Detector`.
        threshold: the clip rate in (0, 1) above which the event fires (None: never).
        policy: the clip policy (anything :func:`policy_name` reads).
        min_steps: finite steps an interval needs to be judged.
    """

    kind = "high_clip_rate"

    def __init__(self, names: Sequence[str], *, threshold: float | None = 0.5,
                 policy: Any = None, min_steps: int = 10, rank: int = 0,
                 max_layers: int = 5) -> None:
        super().__init__(names, rank=rank, max_layers=max_layers)
        self.threshold = None if threshold is None else check_open_interval(
            threshold, "clip_rate_threshold", 0.0, 1.0)
        #: The clip policy's name (:func:`policy_name`), which the advice depends on.
        self.policy: str | None = policy_name(policy)
        self.min_steps = check_int(min_steps, "min_steps", 1)
        self.add_state("clip_rate_flagged", False)

    def config(self) -> dict[str, Any]:
        return {"clip_rate_threshold": self.threshold}

    def update(self, rows: IntervalRows) -> list[Event]:
        limit = self.threshold
        if limit is None or rows.n_good < self.min_steps:
            return []
        rate = rows.clip_rate
        if self.clip_rate_flagged:
            if rate < limit / 2:  # hysteresis: re-arm only once clearly back to normal
                self.clip_rate_flagged = False
            return []
        if not rate > limit:
            return []
        self.clip_rate_flagged = True
        thr, steps = rows.threshold, rows.steps
        last = f"; last clip threshold {thr[-1]:.4g}" if math.isfinite(thr[-1]) else ""
        msg = (
            f"{rate:.0%} of steps {steps[0]}-{steps[-1]} were clipped (alarm above "
            f"{limit:.0%}{last}): {CLIP_RATE_ADVICE[self.policy]}"
        )
        data = {"clip_rate": rate, "threshold": limit, "n_steps": rows.n_good,
                "clip_threshold_last": thr[-1], "policy": self.policy}
        return [Event(step=steps[-1], kind="high_clip_rate", message=msg, layers=[],
                      rank=self.rank, data=data)]


# --------------------------------------------------------------------------------------
# Jumps of Adam's update and gradient/second-moment ratio
# --------------------------------------------------------------------------------------

#: The optimizer signals the :class:`UpdateSpike` detector watches (rows of ``rows.optim``).
WATCHED_SIGNALS: tuple[str, ...] = ("grad_v_rms", "update_ratio_per_lr")


class UpdateSpike(Detector):
    """Per-layer jumps of the optimizer signals relative to their own running statistics
    (see the module docstring): one event per sample with new jumps.

    Args:
        names, rank, max_layers: as for :class:`Detector`.
        z: a jump is a log value more than ``z`` running standard deviations above the
            running mean (None: no detection; the statistics are still kept).
        factor: ... and at least ``factor`` times the running level.
        beta: EMA coefficient of the statistics, per sample (one sample per interval).
        warmup: samples a layer's statistics need before it is judged.

    References:
        Wortsman et al., "Small-scale proxies for large-scale Transformer training
        instabilities", arXiv:2309.14322 (2023); Kumar et al., "ZClip", arXiv:2504.02507
        (2025) (the z-score on EMA statistics).
    """

    kind = "update_spike"

    def __init__(self, names: Sequence[str], *, z: float | None = 4.0, factor: float = 3.0,
                 beta: float = 0.9, warmup: int = 5, rank: int = 0,
                 max_layers: int = 5) -> None:
        super().__init__(names, rank=rank, max_layers=max_layers)
        self.z = None if z is None else check_open_interval(z, "update_spike_z", 0.0, math.inf)
        self.factor = check_open_interval(factor, "update_spike_factor", 1.0, math.inf)
        self.beta = check_fraction(beta, "update_spike_beta")
        self.warmup = check_int(warmup, "update_spike_warmup", 1)
        shape = (len(WATCHED_SIGNALS), len(self.names))
        f64 = torch.float64
        # Running mean and variance of each signal's log value, per layer (NaN: no sample).
        self.add_state("optim_log_mean", torch.full(shape, math.nan, dtype=f64))
        self.add_state("optim_log_var", torch.zeros(shape, dtype=f64))
        self.add_state("optim_samples", torch.zeros(shape, dtype=torch.int64))
        self.add_state("optim_flagged", torch.zeros(shape, dtype=torch.bool))

    def config(self) -> dict[str, Any]:
        return {"update_spike_z": self.z, "update_spike_factor": self.factor,
                "update_spike_beta": self.beta, "update_spike_warmup": self.warmup}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """As :meth:`Detector.load_state_dict`; a state saved before this detector existed
        (no ``optim_*`` keys) resets it instead of failing."""
        if not all(name in state for name in self.state_names):
            self.reset()
            return
        super().load_state_dict(state)

    def update(self, rows: IntervalRows) -> list[Event]:
        if rows.optim is None or rows.bad[-1] or rows.skipped[-1] or not len(self.names):
            return []  # no sample, or one of a non-finite or skipped step (no update)
        x = rows.optim[[SIGNALS.index(s) for s in WATCHED_SIGNALS]]
        valid = torch.isfinite(x) & (x > 0)
        logx = torch.where(valid, x, 1.0).log()
        count = self.optim_samples
        mean, var = self.optim_log_mean, self.optim_log_var
        dev = logx - mean  # NaN for a layer's first sample
        band = torch.full_like(var, math.log(self.factor))
        if self.z is not None:
            band = torch.maximum(band, self.z * var.sqrt())
        judged = valid & (count >= self.warmup) & (self.z is not None)
        jump = judged & (dev > band)
        new = jump & ~self.optim_flagged
        # a layer leaves the flagged set once a sample is back inside its band
        self.optim_flagged = torch.where(valid, jump, self.optim_flagged)
        # Running statistics: beta grows from 0 (plain running mean/variance over the first
        # samples), deviations winsorised to the band so that a jump barely moves them.
        b = torch.clamp(count.double() / (count + 1), max=self.beta)
        d = torch.maximum(torch.minimum(dev, band), -band)
        first = valid & (count == 0)
        upd_mean = torch.where(first, logx, mean + (1 - b) * d)
        upd_var = torch.where(first, torch.zeros_like(var), b * (var + (1 - b) * d.square()))
        self.optim_log_mean = torch.where(valid, upd_mean, mean)
        self.optim_log_var = torch.where(valid, upd_var, var)
        self.optim_samples = count + valid.long()
        if not bool(new.any()):
            return []
        return [self._event(rows, x, mean, new)]

    def _event(self, rows: IntervalRows, x: Tensor, mean: Tensor, new: Tensor) -> Event:
        """The event of the jumps ``new`` (signal, layer), largest ratio first."""
        ratio = x / mean.exp()
        jumps = [(float(ratio[s, j]), s, j) for s, j in new.nonzero().tolist()]
        jumps.sort(key=lambda r: -r[0])
        layers: list[str] = []
        for _, _, j in jumps:
            if self.names[j] not in layers:
                layers.append(self.names[j])
        shown = layers[: self.max_layers]
        step = rows.steps[-1]
        parts = [f"{self.names[j]} {WATCHED_SIGNALS[s]} {float(x[s, j]):.3g} "
                 f"({r:.1f}x its running level)" for r, s, j in jumps[: self.max_layers]]
        msg = (
            f"Adam update spike at step {step}: {'; '.join(parts)}"
            f"{_more(min(len(jumps), self.max_layers), len(jumps))}. The gradient outgrew "
            "Adam's second moment or the update outgrew the weights; such jumps often "
            "precede loss spikes. Try: a lower learning rate or longer warm-up, a lower "
            "beta2 (e.g. 0.95), update clipping (StableAdamW) or gradient clipping."
        )
        data = {
            "n_jumps": len(jumps),
            "jumps": [{"layer": self.names[j], "signal": WATCHED_SIGNALS[s],
                       "value": float(x[s, j]), "ratio": r}
                      for r, s, j in jumps[: self.max_layers]],
            "z": self.z, "factor": self.factor,
        }
        return Event(step=step, kind="update_spike", message=msg, layers=shown,
                     rank=self.rank, data=data)
