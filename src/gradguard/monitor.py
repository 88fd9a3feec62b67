"""Per-step gradient statistics at (almost) no cost: an on-device ring buffer, flushed
to the host once every ``log_every`` steps.

The Guard calls :meth:`Monitor.observe` after every optimizer step with two device
vectors it already has: ``fields``, the step's scalars in the order of :data:`FIELDS`,
and ``per_tensor``, the per-parameter-tensor gradient norms. ``observe`` copies them into
one row of a preallocated ``(log_every, len(FIELDS) + len(names))`` fp32 buffer with a
single ``torch.cat(..., out=row)`` (one kernel on an accelerator) and reads nothing back.
The row counter and the step numbers are Python ints: the host knows how many steps it
observed, so it never asks the device.

Every ``log_every`` observed steps (and on :meth:`Monitor.flush`) the rows since the last
flush move to the host in **one** transfer; that is the monitor's only synchronisation.
On the host it then builds one interval *record* (min/max/mean over every step of the
interval, so a spike between two log steps is never lost) and runs the event detectors,
and hands both to the sinks (:mod:`gradguard.events`). Memory is bounded (one buffer, a
bounded deque of records and events) and the cost per step is O(1) whatever the run
length: O(number of tensors) device work per step, O(log_every x number of tensors) host
work per flush.

Detectors (all on the host, at flush; thresholds are constructor arguments):

``spike``
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
``nonfinite``
    A step counts as non-finite when its ``nonfinite`` flag is set or its pre-clip norm
    or any per-tensor norm is NaN/inf. One event per interval, at the first such step,
    naming the first non-finite layers in model order (``max_layers`` of them) and
    counting all non-finite steps of the interval: with fp16 loss scaling, overflow
    steps are routine and one event per step would drown everything else.
``skip``
    One event per interval with the number of skipped steps and the first of them, for
    the same reason. The record's ``skipped`` count is exact in any case.
``vanishing``
    A layer (parameter tensor) whose norm was below ``max(vanishing_abs, vanishing_rel x
    the median layer norm of that step)`` on every finite step of the interval on which
    it had a gradient, while at least one other layer was not. Defaults 1e-5 and 1e-10:
    healthy per-tensor norms spread over ~3 orders of magnitude (tensor sizes alone
    explain up to ~2), so five orders below the median is far outside healthy. A norm of
    exactly 0 means "no gradient this step" (the Guard writes 0 for ``None`` grads) and
    is ignored, so unused parameters never fire. An event is emitted when layers *enter*
    the vanishing set; they leave it when an interval sees them above the floor.
``high_clip_rate``
    More than ``clip_rate_threshold`` (0.5) of the interval's finite steps were clipped:
    the threshold is too tight or the learning rate too high (heavy clipping silently
    turns the learning rate down). Emitted when the rate crosses the threshold and
    re-armed once an interval falls below half of it, so a run that clips steadily gets
    one event, not one per interval. Its advice depends on the clip policy (``policy``):
    for a fixed threshold, raise it or let it adapt; for ``"auto"``, the trust cap binds
    at this learning rate (expected when it is high); AutoClip, AdaGC and AGC clip most
    steps by design. Disable it (None) for policies that clip most steps by design.

The interval detectors (vanishing, high_clip_rate) need at least ``min_interval_steps``
(10, or ``log_every`` if smaller) finite steps in the interval, so that an explicit
``flush()`` after a handful of steps does not judge on too little evidence.

When the Guard already reads the non-finite flag on the host (to skip a step) it emits
"nonfinite" and "skip" events itself; pass ``host_nonfinite_events=True`` and the monitor
does not emit them a second time (the record counts stay exact).
"""

from __future__ import annotations

import math
import operator
import os
import re
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.events import Event, make_sink

__all__ = ["CLIP_RATE_ADVICE", "FIELDS", "RECORD_KEYS", "Monitor", "policy_name"]

#: The scalars of one step, in the order of the ``fields`` vector passed to
#: :meth:`Monitor.observe`. ``clipped``/``nonfinite``/``skipped`` are 0.0/1.0;
#: ``loss`` is NaN when unknown; ``threshold`` may be inf (no clipping).
FIELDS: tuple[str, ...] = (
    "pre_norm",
    "post_norm",
    "threshold",
    "coef",
    "clipped",
    "nonfinite",
    "skipped",
    "loss",
)
_NF = len(FIELDS)

#: What a ``high_clip_rate`` event advises, for each clip policy (``ThresholdPolicy.name``);
#: ``None``: a policy the monitor does not know.
CLIP_RATE_ADVICE: dict[str | None, str] = {
    "fixed": (
        "the fixed clip threshold is too tight for this learning rate, and heavy clipping "
        "silently lowers the effective learning rate: raise the threshold, let it adapt "
        "(clip='auto'), or lower the learning rate."
    ),
    "auto": (
        "with clip='auto' this is its trust cap binding: at this learning rate an unclipped "
        "SGD step would move the parameters by more than rho (default 0.2%) of their norm, "
        "so the Guard caps the step size instead. Expected at a high learning rate and "
        "harmless while the loss falls; to clip less, lower the learning rate."
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
        policy: a :class:`~gradguard.thresholds.ThresholdPolicy` (its ``name``), a policy
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

#: The keys of an interval record, in order. Norm statistics are over finite values;
#: a statistic with no finite value is NaN (a step: None). Per-layer lists are aligned
#: with ``meta["names"]``; per-layer statistics also leave out exact zeros (no gradient).
RECORD_KEYS: tuple[str, ...] = (
    "step_first",  # first and last step of the interval, and the number of steps
    "step_last",
    "n_steps",
    "pre_norm_min",
    "pre_norm_max",
    "pre_norm_mean",
    "pre_norm_last",  # the last finite pre-clip norm of the interval
    "pre_norm_max_step",  # the step of pre_norm_max
    "post_norm_mean",
    "post_norm_max",
    "threshold_last",  # the threshold of the interval's last step (inf: no clipping)
    "coef_min",
    "clipped",  # counts of steps
    "nonfinite",
    "skipped",
    "spikes",  # steps the spike detector flagged (events are per episode, this is exact)
    "clip_rate",  # clipped / finite steps (NaN when there are none)
    "loss_mean",  # over finite losses; NaN when unknown
    "loss_last",
    "loss_nonfinite",
    "layer_norm_mean",  # list, one per tensor
    "layer_norm_max",  # list, one per tensor
    "layer_nonfinite",  # list of counts of NaN/inf norms, one per tensor
    "top_layer",  # name of the tensor with the largest norm of the interval (or None)
    "top_layer_norm",
    "rank",
    "time",  # wall-clock time.time() of the flush
)

# Above this many rows, row views are made on the fly instead of cached (a cached view is
# a Python object of a few hundred bytes; 4096 rows is well under 2 MB).
_MAX_CACHED_ROWS = 4096
_STATE_VERSION = 1


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x)]


def _check_positive(
    name: str, value: Any, *, integer: bool = False, allow_none: bool = False
) -> Any:
    if value is None and allow_none:
        return None
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return value


class Monitor:
    """On-device ring buffer of per-step gradient statistics, flushed every ``log_every``
    steps into interval records and events (see the module docstring for the detectors).

    Args:
        names: one name per parameter tensor, in the order of ``per_tensor``.
        log_every: observed steps per interval; every ``log_every`` steps ``observe``
            flushes (the one device->host transfer). Also the buffer's row count.
        sinks: sink specs for :func:`gradguard.events.make_sink` (a path ``*.jsonl`` or
            ``*.csv``, ``"console"``, ``"tensorboard:DIR"``, a callable or a Sink); a
            single spec is accepted too. The meta is written to each at construction.
        device: where the buffer lives; default: the device of the first ``fields``.
        rank: distributed rank, stamped on records and events.
        spike_factor: a step is a spike when its pre-clip norm exceeds the running
            baseline by this factor (None disables the detector).
        spike_warmup: finite steps before spike detection starts.
        spike_beta: EMA coefficient of the log-norm baseline (per step).
        spike_cooldown: spike steps less than this many steps after the step that opened
            an episode belong to it (one event per episode).
        vanishing_rel: a layer is vanishing below this fraction of the step's median
            layer norm (None disables the detector).
        vanishing_abs: ... or below this absolute norm.
        clip_rate_threshold: fraction of clipped steps above which ``high_clip_rate``
            fires (None disables it).
        min_interval_steps: finite steps an interval needs for the interval detectors
            (capped at ``log_every``).
        host_nonfinite_events: the Guard emits "nonfinite" and "skip" events itself;
            the monitor then does not.
        max_layers: at most this many layer names per event.
        max_events: length of the :attr:`events` deque (recent events).
        max_records: length of the :attr:`records` deque (recent interval records).
        meta: extra entries for the meta dict written to the sinks (e.g. the clip
            policy); must be JSON-serialisable.
        policy: the clip policy of the monitored run, for the advice of ``high_clip_rate``
            (see :func:`policy_name`); default: ``meta["policy"]``, where the Guard
            writes it.

    Raises:
        TypeError, ValueError: for bad arguments, naming the argument and value.

    Example:
        >>> mon = Monitor(["w", "b"], log_every=2, sinks=[])
        >>> mon.observe(1, torch.tensor([3.0, 1.0, 1.0, 0.33, 1, 0, 0, 2.5]),
        ...             torch.tensor([2.9, 0.5]))
        >>> mon.observe(2, torch.tensor([2.0, 1.0, 1.0, 0.5, 1, 0, 0, 2.4]),
        ...             torch.tensor([1.9, 0.4]))   # flushes
        >>> mon.records[-1]["pre_norm_max"], mon.totals["clipped"]
        (3.0, 2)
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        log_every: int = 100,
        sinks: Any = (),
        device: torch.device | str | None = None,
        rank: int = 0,
        spike_factor: float | None = 10.0,
        spike_warmup: int = 20,
        spike_beta: float = 0.98,
        spike_cooldown: int = 50,
        vanishing_rel: float | None = 1e-5,
        vanishing_abs: float = 1e-10,
        clip_rate_threshold: float | None = 0.5,
        min_interval_steps: int = 10,
        host_nonfinite_events: bool = False,
        max_layers: int = 5,
        max_events: int = 1000,
        max_records: int = 1000,
        meta: Mapping[str, Any] | None = None,
        policy: Any = None,
    ) -> None:
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise TypeError(
                f"names must be a sequence of str (one per parameter tensor), got "
                f"{type(names).__name__}"
            )
        for i, n in enumerate(names):
            if not isinstance(n, str):
                raise TypeError(f"names[{i}] must be a str, got {type(n).__name__} {n!r}")
        self.names: list[str] = list(names)
        self.log_every: int = _check_positive("log_every", log_every, integer=True)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        self.rank = rank
        self.device = None if device is None else torch.device(device)

        self.spike_factor = _check_positive("spike_factor", spike_factor, allow_none=True)
        if self.spike_factor is not None and self.spike_factor <= 1:
            raise ValueError(f"spike_factor must be > 1, got {spike_factor!r}")
        if (
            isinstance(spike_warmup, bool)
            or not isinstance(spike_warmup, int)
            or (spike_warmup < 0)
        ):
            raise ValueError(f"spike_warmup must be a non-negative int, got {spike_warmup!r}")
        self.spike_warmup = spike_warmup
        if not (isinstance(spike_beta, (int, float)) and 0.0 <= spike_beta < 1.0):
            raise ValueError(f"spike_beta must be in [0, 1), got {spike_beta!r}")
        self.spike_beta = float(spike_beta)
        self.spike_cooldown = _check_positive("spike_cooldown", spike_cooldown, integer=True)
        self.vanishing_rel = _check_positive("vanishing_rel", vanishing_rel, allow_none=True)
        if (
            isinstance(vanishing_abs, bool)
            or not isinstance(vanishing_abs, (int, float))
            or (not 0 <= vanishing_abs < math.inf)
        ):
            raise ValueError(f"vanishing_abs must be a finite number >= 0, got {vanishing_abs!r}")
        self.vanishing_abs = float(vanishing_abs)
        if clip_rate_threshold is not None and not (
            isinstance(clip_rate_threshold, (int, float)) and 0.0 < clip_rate_threshold < 1.0
        ):
            raise ValueError(
                f"clip_rate_threshold must be in (0, 1) or None, got {clip_rate_threshold!r}"
            )
        self.clip_rate_threshold = clip_rate_threshold
        self.min_interval_steps = _check_positive(
            "min_interval_steps", min_interval_steps, integer=True
        )
        self.host_nonfinite_events = bool(host_nonfinite_events)
        self.max_layers = _check_positive("max_layers", max_layers, integer=True)
        _check_positive("max_events", max_events, integer=True)
        _check_positive("max_records", max_records, integer=True)

        #: Recent events (detector events and those passed to :meth:`emit`), oldest first.
        self.events: deque[Event] = deque(maxlen=max_events)
        #: Recent interval records, oldest first.
        self.records: deque[dict[str, Any]] = deque(maxlen=max_records)
        #: Exact counts over the whole run, updated at each flush.
        self.totals: dict[str, int] = {
            "steps": 0,
            "clipped": 0,
            "nonfinite": 0,
            "skipped": 0,
            "spikes": 0,
            "flushes": 0,
        }
        #: Exact number of events of each kind over the whole run (emitted ones included).
        self.event_counts: Counter[str] = Counter()

        # --- device buffer (allocated lazily when no device is given) ---
        self._width = _NF + len(self.names)
        self._fields_shape = torch.Size([_NF])
        self._per_tensor_shape = torch.Size([len(self.names)])
        self._buf: Tensor | None = None
        self._rows: tuple[Tensor, ...] | None = None
        self._row = 0  # rows written since the last flush (a host int: never read back)
        self._steps: list[int] = []  # their step numbers
        if self.device is not None:
            self._allocate(self.device, self.log_every)

        # --- detector state (host) ---
        self._log_base: float | None = None  # EMA of log pre-clip norm
        self._n_base = 0  # finite steps folded into it
        self._episode_start: int | None = None  # step of the last spike episode's onset
        # EMA of each layer's log norm over baseline steps (NaN: not seen yet).
        self._layer_base = torch.full((len(self.names),), math.nan, dtype=torch.float64)
        self._vanishing: set[int] = set()
        self._clip_rate_flagged = False
        self._closed = False

        self.meta: dict[str, Any] = {
            "gradguard_version": _version(),
            "names": list(self.names),
            "fields": list(FIELDS),
            "log_every": self.log_every,
            "rank": self.rank,
            "detectors": {
                "spike_factor": self.spike_factor,
                "spike_warmup": self.spike_warmup,
                "spike_beta": self.spike_beta,
                "spike_cooldown": self.spike_cooldown,
                "vanishing_rel": self.vanishing_rel,
                "vanishing_abs": self.vanishing_abs,
                "clip_rate_threshold": self.clip_rate_threshold,
                "min_interval_steps": self.min_interval_steps,
                "host_nonfinite_events": self.host_nonfinite_events,
            },
            "time": time.time(),
            **dict(meta or {}),
        }
        #: The clip policy's name (:func:`policy_name`), which the advice depends on.
        self.policy: str | None = policy_name(
            policy if policy is not None else self.meta.get("policy"))
        self.sinks: list[Any] = []
        # A single spec (a path is a str, itself a Sequence) is wrapped in a list.
        single = (str, bytes, os.PathLike)
        if isinstance(sinks, single) or callable(sinks) or hasattr(sinks, "write_event"):
            sinks = [sinks]
        for spec in sinks:
            self.add_sink(spec)

    # ----------------------------------------------------------------------------------
    # The per-step path
    # ----------------------------------------------------------------------------------

    def _allocate(self, device: torch.device, rows: int) -> None:
        # NaN-filled so that a row that was never written cannot pass for real data.
        self._buf = torch.full((rows, self._width), math.nan, dtype=torch.float32, device=device)
        # Views of each row, made once: building a view costs more than the copy itself.
        # (unbind/select, not Python indexing: the latter is unsupported in FakeTensorMode.)
        self._rows = self._buf.unbind(0) if rows <= _MAX_CACHED_ROWS else None
        self.device = device

    def observe(self, step: int, fields: Tensor, per_tensor: Tensor) -> None:
        """Record one optimizer step, without reading any tensor value on the host.

        One ``torch.cat`` into a preallocated row; every ``log_every``-th call also
        flushes (the one synchronisation, see :meth:`flush`).

        Args:
            step: the optimizer step number (a Python int: the host knows it).
            fields: fp32 vector of ``len(FIELDS)`` values in :data:`FIELDS` order, on the
                monitor's device.
            per_tensor: fp32 vector of per-tensor gradient norms, one per name, on the
                same device (0 for a parameter without gradient).

        Raises:
            TypeError: if ``step`` is not an int (a tensor step would need a host read).
            ValueError: if a vector has the wrong shape.
            RuntimeError: after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError("Monitor.observe() after close()")
        if isinstance(step, Tensor):
            raise TypeError("step must be a Python int, not a Tensor (reading it would sync)")
        step = operator.index(step)
        # Shape checks read metadata only, never values.
        if fields.shape != self._fields_shape:
            raise ValueError(
                f"fields must have shape ({_NF},) in the order {FIELDS}, got {tuple(fields.shape)}"
            )
        if per_tensor.shape != self._per_tensor_shape:
            raise ValueError(
                f"per_tensor must have shape ({len(self.names)},) (one norm per name), got "
                f"{tuple(per_tensor.shape)}"
            )
        if fields.requires_grad or per_tensor.requires_grad:  # backward(create_graph=True)
            fields, per_tensor = fields.detach(), per_tensor.detach()  # cat(out=) refuses them
        if self._buf is None:
            self._allocate(fields.device, self.log_every)
        assert self._buf is not None
        r = self._row
        row = self._rows[r] if self._rows is not None else self._buf.select(0, r)
        torch.cat((fields, per_tensor), out=row)  # one kernel; casts to fp32 if needed
        self._steps.append(step)
        self._row = r + 1
        if self._row >= self.log_every:
            self.flush()

    # ----------------------------------------------------------------------------------
    # Flush: the one device->host transfer, then host-side statistics and detectors
    # ----------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Rows observed since the last flush."""
        return self._row

    def flush(self) -> list[Event]:
        """Move the rows since the last flush to the host, summarise them, detect events.

        This is the monitor's one synchronisation with the device (one transfer of a
        ``(pending, len(FIELDS) + len(names))`` fp32 block). The interval record is
        appended to :attr:`records`, the events to :attr:`events`, and both are written
        to the sinks (events first, in step order). Does nothing without pending rows.

        Returns:
            The new events of this interval (not those passed to :meth:`emit`).
        """
        n = self._row
        if n == 0 or self._buf is None:
            return []
        # The one sync: a single contiguous block. float64 on the host for the statistics.
        block = self._buf.narrow(0, 0, n).to("cpu").double()
        steps = self._steps
        self._row = 0
        self._steps = []
        record, events = self._summarise(block, steps)
        events.sort(key=lambda e: e.step)
        for e in events:
            self._store_event(e)
        self.records.append(record)
        for sink in self.sinks:
            sink.write_record(record)
        return events

    def _summarise(self, block: Tensor, steps: list[int]) -> tuple[dict[str, Any], list[Event]]:
        n = block.shape[0]
        f = block[:, :_NF]
        lay = block[:, _NF:]
        cols = [f[:, i].tolist() for i in range(_NF)]
        pre, post, thr, coef, clip, nonf, skip, loss = cols

        lay_finite = torch.isfinite(lay)
        row_layer_nonfinite = (~lay_finite).any(dim=1).tolist() if lay.shape[1] else [False] * n
        clipped = [c > 0.5 for c in clip]
        skipped = [s > 0.5 for s in skip]
        # A step is non-finite if flagged, or if any of its norms is NaN/inf; a step skipped
        # for another reason (the batches after a rollback) has no norms and is not.
        bad = [
            nonf[i] > 0.5
            or (not skipped[i] and (not math.isfinite(pre[i]) or row_layer_nonfinite[i]))
            for i in range(n)
        ]
        n_bad, n_clip, n_skip = sum(bad), sum(clipped), sum(skipped)
        n_good = n - n_bad

        spike_rows, episodes = self._detect_spikes(pre, bad, steps)
        spike_set = set(spike_rows)

        # --- per-layer statistics (exact zeros = no gradient, left out) ---
        valid = lay_finite & (lay > 0)
        cnt = valid.sum(dim=0)
        zero = torch.zeros((), dtype=torch.float64)
        nan = torch.full((), math.nan, dtype=torch.float64)
        l_mean = torch.where(
            cnt > 0, torch.where(valid, lay, zero).sum(dim=0) / cnt.clamp(min=1), nan
        )
        l_max = torch.where(cnt > 0, torch.where(valid, lay, -math.inf).amax(dim=0), nan)
        l_nonfinite = (~lay_finite).sum(dim=0)

        # Baseline rows for the per-layer baselines: finite steps that are not spikes.
        base_row = torch.tensor(
            [not bad[i] and i not in spike_set for i in range(n)], dtype=torch.bool
        )
        bvalid = valid & base_row.unsqueeze(1)
        bcnt = bvalid.sum(dim=0)
        # log of the interval's mean norm, not the mean of logs: one log per layer instead
        # of one per element (elementwise transcendental ops on the whole block are the
        # most expensive part of a flush; spike steps are excluded, so this is robust).
        bmean = torch.where(bvalid, lay, zero).sum(dim=0) / bcnt.clamp(min=1)
        interval_log_mean = torch.where(bcnt > 0, bmean.clamp(min=1e-300).log(), nan)
        # Reference for spike attribution: the baseline from earlier intervals, else this
        # interval's own baseline steps.
        ref = torch.where(torch.isnan(self._layer_base), interval_log_mean, self._layer_base)

        events: list[Event] = []
        for ep in episodes:
            events.append(
                self._spike_event(ep, lay, ref, pre, post, coef, clipped, skipped, loss, steps)
            )

        # Fold this interval into the per-layer baselines: as if each baseline step had
        # been an EMA update with spike_beta (1 - beta**k of weight for k steps).
        w = 1.0 - torch.pow(torch.full_like(interval_log_mean, self.spike_beta), bcnt)
        upd = torch.where(
            torch.isnan(self._layer_base),
            interval_log_mean,
            self._layer_base + w * (interval_log_mean - self._layer_base),
        )
        self._layer_base = torch.where(bcnt > 0, upd, self._layer_base)

        min_steps = min(self.min_interval_steps, self.log_every)
        if not self.host_nonfinite_events:
            if n_bad:
                events.append(self._nonfinite_event(bad, lay_finite, pre, skipped, steps))
            if n_skip:
                events.append(self._skip_event(skipped, bad, steps))
        if self.vanishing_rel is not None and n_good >= min_steps and lay.shape[1]:
            ev = self._vanishing_event(lay, valid, bad, steps)
            if ev is not None:
                events.append(ev)
        clip_rate = (
            sum(1 for i in range(n) if clipped[i] and not bad[i]) / n_good if n_good else math.nan
        )
        if self.clip_rate_threshold is not None and n_good >= min_steps:
            ev = self._clip_rate_event(clip_rate, n_good, thr, steps)
            if ev is not None:
                events.append(ev)

        # --- the record ---
        fpre = [(pre[i], steps[i]) for i in range(n) if math.isfinite(pre[i])]
        if fpre:
            imax = max(range(len(fpre)), key=lambda j: fpre[j][0])  # first max on ties
            pmin = min(p for p, _ in fpre)
            pmax, pmax_step = fpre[imax]
            pmean = math.fsum(p for p, _ in fpre) / len(fpre)
            plast = fpre[-1][0]
        else:
            pmin = pmax = pmean = plast = math.nan
            pmax_step = None
        fpost = _finite(post)
        fcoef = _finite(coef)
        floss = _finite(loss)
        top_layer: str | None = None
        top_norm = math.nan
        if lay.shape[1] and bool((cnt > 0).any()):
            k = int(torch.where(cnt > 0, l_max, -math.inf).argmax())
            top_layer, top_norm = self.names[k], float(l_max[k])
        record: dict[str, Any] = {
            "step_first": steps[0],
            "step_last": steps[-1],
            "n_steps": n,
            "pre_norm_min": pmin,
            "pre_norm_max": pmax,
            "pre_norm_mean": pmean,
            "pre_norm_last": plast,
            "pre_norm_max_step": pmax_step,
            "post_norm_mean": math.fsum(fpost) / len(fpost) if fpost else math.nan,
            "post_norm_max": max(fpost) if fpost else math.nan,
            "threshold_last": thr[-1],
            "coef_min": min(fcoef) if fcoef else math.nan,
            "clipped": n_clip,
            "nonfinite": n_bad,
            "skipped": n_skip,
            "spikes": len(spike_rows),
            "clip_rate": clip_rate,
            "loss_mean": math.fsum(floss) / len(floss) if floss else math.nan,
            "loss_last": floss[-1] if floss else math.nan,
            # losses observed non-finite (the Guard records a NaN loss as inf: NaN in the
            # buffer means "no loss given")
            "loss_nonfinite": sum(1 for x in loss if math.isinf(x)),
            "layer_norm_mean": l_mean.tolist(),
            "layer_norm_max": l_max.tolist(),
            "layer_nonfinite": l_nonfinite.tolist(),
            "top_layer": top_layer,
            "top_layer_norm": top_norm,
            "rank": self.rank,
            "time": time.time(),
        }
        self.totals["steps"] += n
        self.totals["clipped"] += n_clip
        self.totals["nonfinite"] += n_bad
        self.totals["skipped"] += n_skip
        self.totals["spikes"] += len(spike_rows)
        self.totals["flushes"] += 1
        return record, events

    # --- detectors ----------------------------------------------------------------------

    def _detect_spikes(
        self, pre: list[float], bad: list[bool], steps: list[int]
    ) -> tuple[list[int], list[dict[str, Any]]]:
        """Run the spike detector over the interval's rows, in order (host floats only).

        Returns the spike rows and the episodes *opened* in this interval.
        """
        spike_rows: list[int] = []
        episodes: list[dict[str, Any]] = []
        if self.spike_factor is None:
            return spike_rows, episodes
        log_factor = math.log(self.spike_factor)
        open_ep: dict[str, Any] | None = None
        for i, x in enumerate(pre):
            if bad[i] or not x > 0:  # non-finite steps have their own detector
                continue
            lx = math.log(x)
            if self._log_base is None:
                self._log_base, self._n_base = lx, 1
                continue
            dev = lx - self._log_base
            if self._n_base >= self.spike_warmup and dev > log_factor:
                spike_rows.append(i)
                start = self._episode_start
                if start is None or steps[i] - start >= self.spike_cooldown:
                    open_ep = {"row": i, "n": 1, "peak_row": i, "base": self._log_base}
                    episodes.append(open_ep)
                    self._episode_start = steps[i]
                elif open_ep is not None:  # continues an episode opened in this interval
                    open_ep["n"] += 1
                    if x > pre[open_ep["peak_row"]]:
                        open_ep["peak_row"] = i
                # else: continues an episode reported at an earlier flush (counted only)
            # Winsorised EMA update; during warm-up beta grows from 0 (a running mean), so
            # the baseline is not stuck at the first step's norm.
            beta = min(self.spike_beta, self._n_base / (self._n_base + 1))
            self._log_base += (1.0 - beta) * max(-log_factor, min(log_factor, dev))
            self._n_base += 1
        return spike_rows, episodes

    def _spike_event(
        self,
        ep: dict[str, Any],
        lay: Tensor,
        ref: Tensor,
        pre: list[float],
        post: list[float],
        coef: list[float],
        clipped: list[bool],
        skipped: list[bool],
        loss: list[float],
        steps: list[int],
    ) -> Event:
        i = ep["row"]
        norm, base = pre[i], math.exp(ep["base"])
        row = lay[i]
        layers: list[str] = []
        growth: list[float] = []
        if row.numel():
            ok = torch.isfinite(row) & (row > 0) & torch.isfinite(ref)
            sq = torch.where(torch.isfinite(row), row, 0.0).square()
            share_ok = sq >= sq.sum() / row.numel()  # at least an average share
            cand = ok & share_ok if bool((ok & share_ok).any()) else ok
            g = torch.where(cand, row.clamp(min=1e-300).log() - ref, -math.inf)
            k = min(self.max_layers, int(cand.sum()))
            if k:
                top = torch.topk(g, k).indices.tolist()
                layers = [self.names[j] for j in top]
                growth = [math.exp(float(g[j])) for j in top]
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
        if skipped[i]:
            what += "; the step was skipped"
        elif clipped[i]:
            what += f"; clipped to {post[i]:.4g}"
        else:
            what += "; it was NOT clipped"
        what += (
            ". If spikes recur: lower the learning rate or lengthen its warm-up, use an "
            "adaptive clip threshold, and look at the named layers (normalisation, init)."
        )
        return Event(
            step=steps[i],
            kind="spike",
            message=what,
            layers=layers,
            rank=self.rank,
            data={
                "norm": norm,
                "baseline": base,
                "ratio": ratio,
                "factor": self.spike_factor,
                "post_norm": post[i],
                "coef": coef[i],
                "clipped": clipped[i],
                "skipped": skipped[i],
                "loss": loss[i],
                "layer_growth": growth,
                "n_spike_steps": ep["n"],
                "peak_norm": pre[ep["peak_row"]],
                "peak_step": steps[ep["peak_row"]],
            },
        )

    def _nonfinite_event(
        self,
        bad: list[bool],
        lay_finite: Tensor,
        pre: list[float],
        skipped: list[bool],
        steps: list[int],
    ) -> Event:
        rows = [i for i, b in enumerate(bad) if b]
        i = rows[0]
        offenders = (~lay_finite[i]).nonzero().flatten().tolist() if lay_finite.shape[1] else []
        layers = [self.names[j] for j in offenders[: self.max_layers]]
        where = (
            f"first non-finite layers in model order: {', '.join(layers)}"
            + (f" (+{len(offenders) - len(layers)} more)" if len(offenders) > len(layers) else "")
            if layers
            else "no per-tensor norm is non-finite (the flag or total norm is)"
        )
        n_skipped = sum(1 for r in rows if skipped[r])
        msg = (
            f"non-finite gradient at step {steps[i]} ({len(rows)} non-finite step(s) in steps "
            f"{steps[0]}-{steps[-1]}, {n_skipped} skipped); {where}. Try: a lower learning rate "
            "or longer warm-up, bf16 instead of fp16 (or a GradScaler), and check the loss and "
            "inputs for NaN/inf."
        )
        return Event(
            step=steps[i],
            kind="nonfinite",
            message=msg,
            layers=layers,
            rank=self.rank,
            data={
                "count": len(rows),
                "steps": [steps[r] for r in rows[:10]],
                "n_layers_nonfinite": len(offenders),
                "pre_norm": pre[i],
                "skipped": n_skipped,
            },
        )

    def _skip_event(self, skipped: list[bool], bad: list[bool], steps: list[int]) -> Event:
        rows = [i for i, s in enumerate(skipped) if s]
        n_bad = sum(1 for r in rows if bad[r])
        msg = (
            f"{len(rows)} of {len(steps)} steps skipped in steps {steps[0]}-{steps[-1]} (first "
            f"at step {steps[rows[0]]}; {n_bad} of them non-finite). Occasional skips are "
            "harmless; if they are frequent, lower the learning rate or raise the skip "
            "threshold."
        )
        return Event(
            step=steps[rows[0]],
            kind="skip",
            message=msg,
            layers=[],
            rank=self.rank,
            data={
                "count": len(rows),
                "steps": [steps[r] for r in rows[:10]],
                "nonfinite": n_bad,
                "n_steps": len(steps),
            },
        )

    def _vanishing_event(
        self, lay: Tensor, valid: Tensor, bad: list[bool], steps: list[int]
    ) -> Event | None:
        assert self.vanishing_rel is not None
        good = torch.tensor([not b for b in bad], dtype=torch.bool)
        v = valid & good.unsqueeze(1)  # finite, non-zero norms on finite steps
        med = torch.nanmedian(torch.where(v, lay, math.nan), dim=1).values  # per step
        floor = torch.clamp(med * self.vanishing_rel, min=self.vanishing_abs)
        below = lay < floor.unsqueeze(1)
        seen = v.any(dim=0)
        low = seen & ~(v & ~below).any(dim=0)  # below the floor on every step it was seen
        n_ok = int((seen & ~low).sum())
        if n_ok == 0:  # every layer is tiny: nothing is vanishing *relative to the others*
            return None
        low_set = set(low.nonzero().flatten().tolist())
        seen_set = set(seen.nonzero().flatten().tolist())
        entered = sorted(low_set - self._vanishing)
        # Layers seen above the floor leave the set; layers without gradient keep their state.
        self._vanishing = (self._vanishing - seen_set) | low_set
        if not entered:
            return None
        shown = entered[: self.max_layers]
        layers = [self.names[j] for j in shown]
        lmax = torch.where(v, lay, -math.inf).amax(dim=0)
        norms = [float(lmax[j]) for j in shown]
        median = float(torch.nanmedian(med)) if bool(torch.isfinite(med).any()) else math.nan
        more = f" (+{len(entered) - len(shown)} more)" if len(entered) > len(shown) else ""
        msg = (
            f"{len(entered)} layer(s) had vanishing gradients on every step of steps "
            f"{steps[0]}-{steps[-1]}: {', '.join(layers)}{more}, max norm "
            f"{max(norms):.3g} vs a median layer norm of {median:.3g}. Check the "
            "initialisation (gradguard.probe / init_model), normalisation or residual "
            "connections, saturated activations, and whether these parameters are used."
        )
        return Event(
            step=steps[-1],
            kind="vanishing",
            message=msg,
            layers=layers,
            rank=self.rank,
            data={
                "n_layers": len(entered),
                "n_vanishing": len(self._vanishing),
                "layer_norm_max": norms,
                "median_layer_norm": median,
                "rel_floor": self.vanishing_rel,
                "abs_floor": self.vanishing_abs,
            },
        )

    def _clip_rate_event(
        self, rate: float, n_good: int, thr: list[float], steps: list[int]
    ) -> Event | None:
        assert self.clip_rate_threshold is not None
        limit = self.clip_rate_threshold
        if self._clip_rate_flagged:
            if rate < limit / 2:  # hysteresis: re-arm only once clearly back to normal
                self._clip_rate_flagged = False
            return None
        if not rate > limit:
            return None
        self._clip_rate_flagged = True
        last = f"; last clip threshold {thr[-1]:.4g}" if math.isfinite(thr[-1]) else ""
        msg = (
            f"{rate:.0%} of steps {steps[0]}-{steps[-1]} were clipped (alarm above "
            f"{limit:.0%}{last}): {CLIP_RATE_ADVICE[self.policy]}"
        )
        return Event(
            step=steps[-1],
            kind="high_clip_rate",
            message=msg,
            layers=[],
            rank=self.rank,
            data={
                "clip_rate": rate,
                "threshold": limit,
                "n_steps": n_good,
                "clip_threshold_last": thr[-1],
                "policy": self.policy,
            },
        )

    # ----------------------------------------------------------------------------------
    # Host-side events, sinks, state
    # ----------------------------------------------------------------------------------

    def _store_event(self, event: Event) -> None:
        self.events.append(event)
        self.event_counts[event.kind] += 1
        for sink in self.sinks:
            sink.write_event(event)

    def emit(self, event: Event, *, keep_rank: bool = False) -> None:
        """Record a host-side event (from the Guard or a remedy) and write it now.

        Args:
            event: the event; its ``rank`` is set to the monitor's if left at 0.
            keep_rank: keep ``event.rank`` as given (an event whose rank names the rank
                that saw the problem, which may be 0 on another rank's log).

        Raises:
            TypeError: if ``event`` is not an :class:`~gradguard.events.Event`.
        """
        if not isinstance(event, Event):
            raise TypeError(f"event must be a gradguard Event, got {type(event).__name__}")
        if not keep_rank and event.rank == 0 and self.rank != 0:
            event = Event(
                event.step, event.kind, event.message, event.layers, event.data, self.rank
            )
        self._store_event(event)

    def add_sink(self, spec: Any) -> Any:
        """Attach one more sink (any :func:`~gradguard.events.make_sink` spec); the meta is
        written to it at once.

        Returns:
            The sink.
        """
        sink = make_sink(spec)
        sink.write_meta(self.meta)
        self.sinks.append(sink)
        return sink

    def close(self) -> None:
        """Flush pending rows and close every sink. Idempotent; ``observe`` then raises."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            errors = []
            for sink in self.sinks:  # every sink gets closed, whatever fails
                try:
                    sink.close()
                except Exception as err:
                    errors.append(err)
            if errors:
                raise errors[0]

    def state_dict(self) -> dict[str, Any]:
        """Counters, detector state and the rows not yet flushed.

        The pending rows are a clone on the monitor's device (no synchronisation here);
        ``torch.save`` moves them. Load them back with :meth:`load_state_dict` and the
        next flush gives exactly the record and events it would have given.
        """
        pending = (
            self._buf.narrow(0, 0, self._row).clone()
            if self._buf is not None
            else torch.empty(0, self._width)
        )
        return {
            "version": _STATE_VERSION,
            "names": list(self.names),
            "totals": dict(self.totals),
            "event_counts": dict(self.event_counts),
            "log_base": self._log_base,
            "n_base": self._n_base,
            "episode_start": self._episode_start,
            "layer_base": self._layer_base.clone(),
            "vanishing": sorted(self._vanishing),
            "clip_rate_flagged": self._clip_rate_flagged,
            "pending_steps": list(self._steps),
            "pending": pending,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            ValueError: if the state was saved for other parameter names or by an
                unknown version.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown Monitor state version {state.get('version')!r}")
        if list(state["names"]) != self.names:
            raise ValueError(
                "Monitor state was saved for other parameters: "
                f"{len(state['names'])} names vs {len(self.names)} here"
            )
        pending: Tensor = state["pending"]
        steps = list(state["pending_steps"])
        if pending.shape != (len(steps), self._width):
            raise ValueError(f"Monitor state: pending rows have shape {tuple(pending.shape)}")
        self.totals = {**self.totals, **{k: int(v) for k, v in state["totals"].items()}}
        self.event_counts = Counter({k: int(v) for k, v in state["event_counts"].items()})
        self._log_base = state["log_base"]
        self._n_base = int(state["n_base"])
        self._episode_start = state["episode_start"]
        self._layer_base = state["layer_base"].detach().to("cpu", torch.float64).clone()
        self._vanishing = set(state["vanishing"])
        self._clip_rate_flagged = bool(state["clip_rate_flagged"])
        n = len(steps)
        device = self.device if self.device is not None else pending.device
        if self._buf is None or self._buf.shape[0] < max(n, self.log_every):
            self._allocate(device, max(n, self.log_every))
        assert self._buf is not None
        if n:
            # _foreach_copy_ rather than copy_: it also works under FakeTensorMode.
            torch._foreach_copy_([self._buf.narrow(0, 0, n)], [pending.to(self._buf.device)])
        self._row = n
        self._steps = steps
        if self._row >= self.log_every:  # saved with a larger log_every
            self.flush()

    def __repr__(self) -> str:
        return (
            f"Monitor({len(self.names)} tensors, log_every={self.log_every}, "
            f"pending={self._row}, steps={self.totals['steps']}, sinks={self.sinks!r})"
        )


def _version() -> str:
    try:
        from gradguard import __version__

        return __version__
    except ImportError:  # pragma: no cover - during a partial install
        return "unknown"
