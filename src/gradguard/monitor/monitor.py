"""The Monitor: per-step gradient statistics at (almost) no cost, flushed every
``log_every`` steps into an interval record and events.

The Guard calls :meth:`Monitor.observe` after every optimizer step with two device
vectors it already has: ``fields``, the step's scalars in the order of
:data:`~gradguard.monitor.record.FIELDS`, and ``per_tensor``, the per-parameter-tensor
gradient norms. ``observe`` writes them as one row of the device buffer
(:mod:`gradguard.monitor.buffer`: one kernel, no host read). Every ``log_every`` observed
steps (and on :meth:`Monitor.flush`) the rows since the last flush move to the host in
**one** transfer, the monitor's only synchronisation; the host then builds one interval
record (:mod:`gradguard.monitor.record`), runs the detectors
(:mod:`gradguard.monitor.detectors`) and hands both to the sinks
(:mod:`gradguard.log.sinks`). Memory is bounded (one buffer, a bounded deque of records
and events) and the cost per step is O(1) whatever the run length: O(number of tensors)
device work per step, O(log_every x number of tensors) host work per flush.

With an Adam-family optimizer watched (:meth:`Monitor.watch_optimizer`, one call at
attach time), the step that completes an interval also computes, on the device, each
layer's gradient relative to Adam's second moment and its update-to-weight ratio
(:mod:`gradguard.monitor.optim_signals`), into auxiliary rows of the same buffer: they
ride the interval's one transfer. Other steps, and monitors that watch no such optimizer,
cost exactly what they did.

When the Guard already reads the non-finite flag on the host (to skip a step), it tells
the monitor at once with :meth:`Monitor.note_step`; the detectors emit the event then.
Built with ``host_nonfinite_events=True`` (the Guard's ``nonfinite="skip"``/``"raise"``),
the monitor leaves those steps out of the interval's "nonfinite" and "skip" events (the
record counts stay exact): one producer, one event per step.
"""

from __future__ import annotations

import operator
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard._validation import check_int, check_str_sequence
from gradguard._version import __version__
from gradguard.log.events import Event
from gradguard.log.sinks import make_sink, sink_specs
from gradguard.monitor.buffer import RingBuffer
from gradguard.monitor.detectors import (
    ClipRate,
    Detector,
    NonFinite,
    Skip,
    Spike,
    UpdateSpike,
    Vanishing,
)
from gradguard.monitor.optim_signals import SIGNALS, OptimizerWatch
from gradguard.monitor.record import FIELDS, Interval, IntervalRows, build_record

__all__ = ["Monitor"]

_NF = len(FIELDS)
_STATE_VERSION = 1
#: Kinds :meth:`Monitor.note_step` accepts.
NOTE_KINDS = ("nonfinite", "skip")


class Monitor:
    """On-device ring buffer of per-step gradient statistics, flushed every ``log_every``
    steps into interval records and events (see :mod:`gradguard.monitor.detectors`).

    Args:
        names: one name per parameter tensor, in the order of ``per_tensor``.
        log_every: observed steps per interval; every ``log_every`` steps ``observe``
            flushes (the one device->host transfer). Also the buffer's row count.
        sinks: sink specs for :func:`gradguard.log.sinks.make_sink` (a path ``*.jsonl`` or
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
        update_spike_z: with an Adam-family optimizer watched, a layer's optimizer signal
            jumps when its log exceeds its running mean by this many running standard
            deviations (None disables the detector; see
            :class:`~gradguard.monitor.detectors.UpdateSpike`).
        update_spike_factor: ... and by at least this factor.
        update_spike_beta: EMA coefficient of those statistics, per sampled interval.
        update_spike_warmup: samples a layer needs before it is judged.
        host_nonfinite_events: the host reports every non-finite and skipped step with
            :meth:`note_step` as it happens; the interval's "nonfinite" and "skip" events
            then leave them out. (The one place this is decided.)
        max_layers: at most this many layer names per event.
        max_events: length of the :attr:`events` deque (recent events).
        max_records: length of the :attr:`records` deque (recent interval records).
        meta: extra entries for the meta dict written to the sinks (e.g. the clip
            policy); must be JSON-serialisable.
        policy: the clip policy of the monitored run, for the advice of ``high_clip_rate``
            (see :func:`~gradguard.monitor.detectors.policy_name`); default:
            ``meta["policy"]``, where the Guard writes it.

    Raises:
        TypeError, ValueError: for bad arguments, naming the argument and value.

    Example:
        >>> mon = Monitor(["w", "b"], log_every=2, sinks=[])
        >>> mon.observe(1, torch.tensor([3.0, 1.0, 1.0, 0.33, 1, 0, 0, 2.5]),
        ...             torch.tensor([2.9, 0.5]))
        >>> interval = mon.observe(2, torch.tensor([2.0, 1.0, 1.0, 0.5, 1, 0, 0, 2.4]),
        ...                        torch.tensor([1.9, 0.4]))   # flushes
        >>> interval.record["pre_norm_max"], mon.totals["clipped"]
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
        update_spike_z: float | None = 4.0,
        update_spike_factor: float = 3.0,
        update_spike_beta: float = 0.9,
        update_spike_warmup: int = 5,
        host_nonfinite_events: bool = False,
        max_layers: int = 5,
        max_events: int = 1000,
        max_records: int = 1000,
        meta: Mapping[str, Any] | None = None,
        policy: Any = None,
    ) -> None:
        self.names: list[str] = check_str_sequence(names, "names")
        self.log_every: int = check_int(log_every, "log_every", 1)
        self.rank: int = check_int(rank, "rank", 0)
        self.min_interval_steps: int = check_int(min_interval_steps, "min_interval_steps", 1)
        self.max_layers: int = check_int(max_layers, "max_layers", 1)
        self.host_nonfinite_events = bool(host_nonfinite_events)
        meta = dict(meta or {})
        common = {"rank": self.rank, "max_layers": self.max_layers}
        min_steps = min(self.min_interval_steps, self.log_every)
        interval_events = not self.host_nonfinite_events
        #: The detectors by event kind, in the order their events are gathered.
        self.detectors: dict[str, Detector] = {
            d.kind: d for d in (
                Spike(self.names, factor=spike_factor, warmup=spike_warmup, beta=spike_beta,
                      cooldown=spike_cooldown, **common),
                NonFinite(self.names, interval_events=interval_events, **common),
                Skip(self.names, interval_events=interval_events, **common),
                Vanishing(self.names, rel=vanishing_rel, abs_floor=vanishing_abs,
                          min_steps=min_steps, **common),
                ClipRate(self.names, threshold=clip_rate_threshold, min_steps=min_steps,
                         policy=policy if policy is not None else meta.get("policy"),
                         **common),
                UpdateSpike(self.names, z=update_spike_z, factor=update_spike_factor,
                            beta=update_spike_beta, warmup=update_spike_warmup, **common),
            )
        }
        _check_unique_state(self.detectors.values())

        #: Recent events (detector events and those noted or emitted), oldest first.
        self.events: deque[Event] = deque(maxlen=check_int(max_events, "max_events", 1))
        #: Recent interval records, oldest first.
        self.records: deque[dict[str, Any]] = deque(
            maxlen=check_int(max_records, "max_records", 1))
        #: Exact counts over the whole run, updated at each flush.
        self.totals: dict[str, int] = dict.fromkeys(
            ("steps", "clipped", "nonfinite", "skipped", "spikes", "flushes"), 0)
        #: Exact number of events of each kind over the whole run (emitted ones included).
        self.event_counts: Counter[str] = Counter()
        #: The device buffer of the rows not yet flushed.
        self.buffer = RingBuffer(_NF + len(self.names), self.log_every, device)
        self._fields_shape = torch.Size([_NF])
        self._per_tensor_shape = torch.Size([len(self.names)])
        self._closed = False
        # The Adam-family optimizers watched (None until one is): see watch_optimizer.
        self._optim: OptimizerWatch | None = None
        self._optim_fields: Tensor | None = None  # the NaN prefix of the auxiliary rows

        self.meta: dict[str, Any] = self._meta(meta)
        self.sinks: list[Any] = []
        for spec in sink_specs(sinks):
            self.add_sink(spec)

    def _meta(self, extra: dict[str, Any]) -> dict[str, Any]:
        detectors: dict[str, Any] = {}
        for d in self.detectors.values():
            detectors.update(d.config())
        detectors.update(min_interval_steps=self.min_interval_steps,
                         host_nonfinite_events=self.host_nonfinite_events)
        return {
            "gradguard_version": __version__,
            "names": list(self.names),
            "fields": list(FIELDS),
            "log_every": self.log_every,
            "rank": self.rank,
            "detectors": detectors,
            "time": time.time(),
            **extra,
        }

    # ----------------------------------------------------------------------------------
    # Read-only views
    # ----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device | None:
        """Where the buffer lives (``None`` until the first ``observe`` when not given)."""
        return self.buffer.device

    @property
    def pending(self) -> int:
        """Rows observed since the last flush."""
        return self.buffer.pending

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def watches_optimizer(self) -> bool:
        """Whether an Adam-family optimizer is watched (records then have
        :data:`~gradguard.monitor.record.OPTIM_RECORD_KEYS`)."""
        return self._optim is not None

    @property
    def policy(self) -> str | None:
        """The clip policy's name, which the ``high_clip_rate`` advice depends on."""
        clip_rate = self.detectors["high_clip_rate"]
        assert isinstance(clip_rate, ClipRate)
        return clip_rate.policy

    # ----------------------------------------------------------------------------------
    # The per-step path
    # ----------------------------------------------------------------------------------

    def observe(self, step: int, fields: Tensor, per_tensor: Tensor) -> Interval | None:
        """Record one optimizer step, without reading any tensor value on the host.

        One ``torch.cat`` into a preallocated row; every ``log_every``-th call also
        flushes (the one synchronisation, see :meth:`flush_interval`).

        Args:
            step: the optimizer step number (a Python int: the host knows it).
            fields: fp32 vector of ``len(FIELDS)`` values in ``FIELDS`` order, on the
                monitor's device.
            per_tensor: fp32 vector of per-tensor gradient norms, one per name, on the
                same device (0 for a parameter without gradient).

        Returns:
            The flushed :class:`~gradguard.monitor.record.Interval` when this step
            completed one, else ``None``.

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
        if self.buffer.write(step, fields, per_tensor) >= self.log_every:
            if self._optim is not None:
                self._sample_optimizer()
            return self.flush_interval()
        return None

    def watch_optimizer(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> int:
        """Compute Adam-aware signals from ``optimizer`` at the last step of every interval.

        At each step that completes an interval, before the optimizer steps, the monitor
        computes per layer (on the device, no host read) the gradient's RMS relative to
        Adam's second moment and the update-to-weight ratio of the update about to be
        applied (:mod:`gradguard.monitor.optim_signals`), writes them beside the step rows
        (they travel with the interval's one transfer), adds
        :data:`~gradguard.monitor.record.OPTIM_RECORD_KEYS` to the records and feeds the
        ``update_spike`` detector. Call it once per optimizer (and again after
        ``add_param_group``). Optimizers other than Adam, AdamW, NAdam, RAdam and Adamax
        (and their subclasses) are ignored, and the monitor then costs what it did.

        Args:
            optimizer: the optimizer that updates (some of) the parameters.
            params: the monitored parameters, one per name, in the order of the names
                (the Guard's ``params``).

        Returns:
            How many of ``params`` the optimizer updates and the monitor now watches (0
            for an optimizer of another family).

        Raises:
            TypeError: if ``optimizer`` is not a ``torch.optim.Optimizer``.
            ValueError: if ``params`` does not have one tensor per name.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = torch.optim.AdamW([w], lr=1e-3)
            >>> mon = Monitor(["w"], log_every=10, sinks=[])
            >>> mon.watch_optimizer(opt, [w])
            1
        """
        watch = self._optim if self._optim is not None else OptimizerWatch(len(self.names))
        count = watch.add(optimizer, params)
        if count and self._optim is None:
            self._optim = watch
            self.buffer.set_aux_rows(len(SIGNALS))
        return count

    def _sample_optimizer(self) -> None:
        """The optimizer signals of this step into the buffer's auxiliary rows (device
        work only: no host read)."""
        assert self._optim is not None and self.buffer.device is not None
        device = self.buffer.device
        values = self._optim.compute(device)
        if self._optim_fields is None or self._optim_fields.device != device:
            self._optim_fields = torch.full((len(SIGNALS), _NF), float("nan"), device=device)
        self.buffer.write_aux(self._optim_fields, values)

    # ----------------------------------------------------------------------------------
    # Flush: the one device->host transfer, then host-side record and detectors
    # ----------------------------------------------------------------------------------

    def flush_interval(self) -> Interval | None:
        """Move the rows since the last flush to the host, summarise them, detect events.

        This is the monitor's one synchronisation with the device (one transfer of a
        ``(pending, len(FIELDS) + len(names))`` fp32 block). The interval record is
        appended to :attr:`records`, the events to :attr:`events`, and both are written
        to the sinks (events first, in step order).

        Returns:
            The :class:`~gradguard.monitor.record.Interval` (its record and new events,
            not those noted or emitted), or ``None`` without pending rows.
        """
        block = self.buffer.read_with_aux()
        if block is None:
            return None
        values, steps, aux = block
        rows = IntervalRows(values, steps, None if aux is None else aux[:, _NF:])
        events = [e for d in self.detectors.values() for e in d.update(rows)]
        events.sort(key=lambda e: e.step)
        spike = self.detectors["spike"]
        assert isinstance(spike, Spike)
        record = build_record(rows, self.names, spikes=spike.last_count, rank=self.rank,
                              optim_keys=self._optim is not None)
        for key, n in (("steps", rows.n), ("clipped", rows.n_clipped),
                       ("nonfinite", rows.n_bad), ("skipped", rows.n_skipped),
                       ("spikes", spike.last_count), ("flushes", 1)):
            self.totals[key] += n
        for e in events:
            self._store_event(e)
        self.records.append(record)
        for sink in self.sinks:
            sink.write_record(record)
        return Interval(record, events)

    def flush(self) -> list[Event]:
        """:meth:`flush_interval`, returning only the new events of the interval (not those
        noted or emitted); ``[]`` without pending rows."""
        interval = self.flush_interval()
        return [] if interval is None else interval.events

    # ----------------------------------------------------------------------------------
    # Host-side events, sinks, state
    # ----------------------------------------------------------------------------------

    def _store_event(self, event: Event) -> None:
        self.events.append(event)
        self.event_counts[event.kind] += 1
        for sink in self.sinks:
            sink.write_event(event)

    def note_step(
        self,
        step: int,
        kind: str,
        *,
        layers: Sequence[str] = (),
        origin: Mapping[str, Any] | None = None,
        reason: str | None = None,
        rank: int | None = None,
    ) -> Event:
        """Report a step the host already knows was non-finite or skipped; its detector
        emits the event now (to :attr:`events` and the sinks).

        Call it after :meth:`observe` of that step. The step's row still counts in the
        interval record; with ``host_nonfinite_events=True`` the interval's own
        "nonfinite"/"skip" events leave such steps to these.

        Args:
            step: the step.
            kind: ``"nonfinite"`` (a step skipped for non-finite gradients) or ``"skip"``
                (a step skipped for another ``reason``).
            layers: ``"nonfinite"``: every layer whose gradient was non-finite, in model
                order.
            origin: ``"nonfinite"``, distributed runs: which rank saw it first
                (``first_rank``, ``evidence``, ``world_size``, ...); the event then
                carries that rank and says so.
            reason: ``"skip"``: why (e.g. ``"rollback"``); required.
            rank: the rank that saw it (default: the monitor's).

        Returns:
            The event.

        Raises:
            ValueError: for another ``kind``, or a "skip" without ``reason``.
        """
        if kind == "nonfinite":
            detector = self.detectors["nonfinite"]
            assert isinstance(detector, NonFinite)
            event = detector.note(step, layers=layers, origin=origin, rank=rank)
        elif kind == "skip":
            if reason is None:
                raise ValueError("note_step(kind='skip') needs a reason, e.g. 'rollback'")
            skip = self.detectors["skip"]
            assert isinstance(skip, Skip)
            event = skip.note(step, reason=reason, rank=rank)
        else:
            raise ValueError(f"kind must be one of {NOTE_KINDS}, got {kind!r}")
        self._store_event(event)
        return event

    def emit(self, event: Event, *, keep_rank: bool = False) -> None:
        """Record a host-side event (from the Guard or a remedy) and write it now.

        Args:
            event: the event; its ``rank`` is set to the monitor's if left at 0.
            keep_rank: keep ``event.rank`` as given (an event whose rank names the rank
                that saw the problem, which may be 0 on another rank's log).

        Raises:
            TypeError: if ``event`` is not an :class:`~gradguard.log.events.Event`.
        """
        if not isinstance(event, Event):
            raise TypeError(f"event must be a gradguard Event, got {type(event).__name__}")
        if not keep_rank and event.rank == 0 and self.rank != 0:
            event = Event(
                event.step, event.kind, event.message, event.layers, event.data, self.rank
            )
        self._store_event(event)

    def add_sink(self, spec: Any) -> Any:
        """Attach one more sink (any :func:`~gradguard.log.sinks.make_sink` spec); the meta
        is written to it at once.

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

        The detectors' declared state is saved under its names (derived, not listed
        here). The pending rows are a clone on the monitor's device (no synchronisation
        here); ``torch.save`` moves them. Load them back with :meth:`load_state_dict` and
        the next flush gives exactly the record and events it would have given.
        """
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "names": list(self.names),
            "totals": dict(self.totals),
            "event_counts": dict(self.event_counts),
        }
        for detector in self.detectors.values():
            state.update(detector.state_dict())
        state["pending_steps"] = self.buffer.steps
        state["pending"] = self.buffer.pending_rows()
        return state

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
        if pending.shape != (len(steps), self.buffer.width):
            raise ValueError(f"Monitor state: pending rows have shape {tuple(pending.shape)}")
        self.totals = {**self.totals, **{k: int(v) for k, v in state["totals"].items()}}
        self.event_counts = Counter({k: int(v) for k, v in state["event_counts"].items()})
        for detector in self.detectors.values():
            detector.load_state_dict(state)
        self.buffer.load(pending, steps)
        if self.buffer.pending >= self.log_every:  # saved with a larger log_every
            self.flush()

    def __repr__(self) -> str:
        return (
            f"Monitor({len(self.names)} tensors, log_every={self.log_every}, "
            f"pending={self.pending}, steps={self.totals['steps']}, sinks={self.sinks!r})"
        )


def _check_unique_state(detectors: Any) -> None:
    """The detectors' state shares one flat namespace in the state dict: no name twice."""
    seen: dict[str, str] = {}
    reserved = {"version", "names", "totals", "event_counts", "pending_steps", "pending"}
    for d in detectors:
        for name in d.state_names:
            if name in seen or name in reserved:
                raise ValueError(f"detector state {name!r} of {type(d).__name__} is "
                                 f"declared twice (also {seen.get(name, 'the Monitor')})")
            seen[name] = type(d).__name__
