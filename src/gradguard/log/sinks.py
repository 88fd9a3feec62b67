"""Sinks: where the monitor's meta, interval records and events leave the training loop.

Three kinds of payload leave gradguard, always on the host and never in the per-step path:

* one **meta** dict per run (parameter names, options, version),
* one **record** dict per log interval (see :data:`gradguard.monitor.RECORD_KEYS`),
* **events** (:class:`~gradguard.log.events.Event`).

A sink is any object with ``write_meta``, ``write_record``, ``write_event`` and ``close``
(:class:`Sink` gives no-op defaults). :func:`make_sink` turns a short spec into one;
:func:`parse_sink_spec` is the one parser of specs, which the per-rank naming of
distributed runs (:func:`sinks_for_rank`) uses too:

>>> from gradguard.log.sinks import make_sink
>>> sink = make_sink("console")                # events, one line each, to stderr
>>> sink = make_sink(lambda kind, payload: None)   # a callback

The JSON Lines file written by :class:`JSONLSink` is the canonical log (see
:mod:`gradguard.log.jsonvalues` for its non-finite floats); read it back with
:func:`gradguard.log.readback.read_jsonl`.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from gradguard.log.events import Event
from gradguard.log.jsonvalues import dumps

__all__ = [
    "LOG_RANKS",
    "CSVSink",
    "CallbackSink",
    "ConsoleSink",
    "JSONLSink",
    "Sink",
    "SinkSpec",
    "TensorBoardSink",
    "is_sink",
    "make_sink",
    "parse_sink_spec",
    "rank_path",
    "sink_specs",
    "sinks_for_rank",
]

#: Values of ``Guard(log_ranks=...)``: which ranks of a distributed run write to the sinks.
LOG_RANKS = ("zero", "all")


class Sink:
    """Base class of sinks: every method is a no-op, override the ones you need.

    Sinks are called on the host only: once with the run's meta, then at every flush of
    the :class:`~gradguard.monitor.Monitor` with its interval record and new events,
    and immediately for events noted or emitted between flushes. Usable as a context
    manager.
    """

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write the run's meta dict (called once, when the sink is attached)."""

    def write_record(self, record: dict[str, Any]) -> None:
        """Write one interval record."""

    def write_event(self, event: Event) -> None:
        """Write one event."""

    def close(self) -> None:
        """Flush and release resources; further writes are errors. Idempotent."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_text(path: str | os.PathLike[str], mode: str, **kwargs: Any) -> TextIO:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    return open(p, mode, encoding="utf-8", **kwargs)  # closed by the sink


def _check_mode(mode: str) -> str:
    if mode not in ("w", "a"):
        raise ValueError(f"mode must be 'w' (truncate) or 'a' (append), got {mode!r}")
    return mode


class JSONLSink(Sink):
    """The canonical log: one JSON object per line (``"type"``: meta, record or event).

    Each line is flushed to the OS as soon as it is written: a run that crashes keeps
    everything logged up to its last flush. Read it back with
    :func:`~gradguard.log.readback.read_jsonl`.

    Args:
        path: the file; parent directories are created.
        mode: ``"w"`` truncates, ``"a"`` appends (resuming a run into the same file;
            :func:`~gradguard.log.readback.read_jsonl` merges repeated meta lines).
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "w") -> None:
        self.path = Path(path)
        self._file: TextIO | None = _open_text(self.path, _check_mode(mode))

    def _write(self, obj: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"JSONLSink({str(self.path)!r}) is closed")
        self._file.write(dumps(obj) + "\n")
        self._file.flush()

    def write_meta(self, meta: dict[str, Any]) -> None:
        self._write({"type": "meta", **meta})

    def write_record(self, record: dict[str, Any]) -> None:
        self._write({"type": "record", **record})

    def write_event(self, event: Event) -> None:
        self._write({"type": "event", **event.to_dict()})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JSONLSink({str(self.path)!r})"


class CSVSink(Sink):
    """Interval records as a CSV table, and events in a second CSV beside it.

    The records header is taken from the first record (the monitor's records all have
    the same keys; keys a later record lacks are left empty, extra keys are dropped).
    List values (the per-layer norms) are written as one JSON array per cell, non-finite
    floats as ``nan``/``inf`` in plain cells and ``"NaN"``/``"Infinity"`` inside JSON.
    Every cell is quoted as CSV requires, so names with commas, quotes or line breaks are
    safe. The meta is not written (it is in the JSON Lines log).

    Args:
        path: the records CSV (parent directories are created).
        events_path: the events CSV; default: ``<path without .csv>.events.csv``. Columns:
            step, kind, rank, message, layers (JSON array), data (JSON object).
        mode: ``"w"`` or ``"a"`` (append: no header is written to a non-empty file).
    """

    EVENT_COLUMNS = ("step", "kind", "rank", "message", "layers", "data")

    def __init__(
        self,
        path: str | os.PathLike[str],
        events_path: str | os.PathLike[str] | None = None,
        mode: str = "w",
    ) -> None:
        self.path = Path(path)
        if events_path is None:
            name = self.path.name
            stem = name[:-4] if name.lower().endswith(".csv") else name
            events_path = self.path.with_name(stem + ".events.csv")
        self.events_path = Path(events_path)
        self._mode = _check_mode(mode)
        self._rec_file: TextIO | None = None
        self._rec_writer: csv.DictWriter[str] | None = None
        # newline="": the csv module writes its own line endings (and quotes embedded ones).
        self._ev_file: TextIO | None = _open_text(self.events_path, self._mode, newline="")
        self._ev_writer = csv.writer(self._ev_file)
        if self._ev_file.tell() == 0:
            self._ev_writer.writerow(self.EVENT_COLUMNS)
            self._ev_file.flush()
        self._closed = False

    @staticmethod
    def _cell(v: Any) -> Any:
        if isinstance(v, (list, tuple, dict)):
            return dumps(v)
        return v

    def write_record(self, record: dict[str, Any]) -> None:
        if self._closed:
            raise ValueError(f"CSVSink({str(self.path)!r}) is closed")
        if self._rec_writer is None:
            self._rec_file = _open_text(self.path, self._mode, newline="")
            self._rec_writer = csv.DictWriter(
                self._rec_file, fieldnames=list(record), restval="", extrasaction="ignore"
            )
            if self._rec_file.tell() == 0:
                self._rec_writer.writeheader()
        assert self._rec_file is not None
        self._rec_writer.writerow({k: self._cell(v) for k, v in record.items()})
        self._rec_file.flush()

    def write_event(self, event: Event) -> None:
        if self._closed or self._ev_file is None:
            raise ValueError(f"CSVSink({str(self.path)!r}) is closed")
        self._ev_writer.writerow(
            [
                event.step,
                event.kind,
                event.rank,
                event.message,
                dumps(event.layers),
                dumps(event.data),
            ]
        )
        self._ev_file.flush()

    def close(self) -> None:
        for f in (self._rec_file, self._ev_file):
            if f is not None:
                f.close()
        self._rec_file = self._ev_file = None
        self._closed = True

    def __repr__(self) -> str:
        return f"CSVSink({str(self.path)!r})"


class TensorBoardSink(Sink):
    """Scalars of each interval record and event texts, for TensorBoard.

    Needs the ``tensorboard`` package (imported when the sink is created, not when
    gradguard is). Each scalar record field is written as ``gradguard/<key>`` at the
    interval's last step; events as text under ``gradguard/events``.

    Args:
        log_dir: the TensorBoard run directory.
        per_layer: also write each layer's interval max norm as
            ``gradguard/layer_norm_max/<name>`` and, with an Adam-family optimizer, its
            sampled update-to-weight ratio and gradient against the second moment as
            ``gradguard/layer_update_ratio/<name>`` and
            ``gradguard/layer_grad_v_rms/<name>`` (finite values only; one curve per
            parameter tensor: off by default, it clutters TensorBoard on large models).
        writer: an existing ``SummaryWriter`` to write to instead of creating one.

    Raises:
        ImportError: if ``tensorboard`` is not installed, with the command to install it.
    """

    #: The per-layer list fields of a record written with ``per_layer=True``.
    PER_LAYER_KEYS: tuple[str, ...] = ("layer_norm_max", "layer_update_ratio",
                                       "layer_grad_v_rms")

    def __init__(
        self, log_dir: str | os.PathLike[str], *, per_layer: bool = False, writer: Any = None
    ) -> None:
        self.log_dir = str(log_dir)
        self.per_layer = bool(per_layer)
        self._names: list[str] = []
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "TensorBoardSink needs the tensorboard package: pip install tensorboard "
                    f"(or log to JSON Lines instead: sinks=['run.jsonl']). Import error: {e}"
                ) from e
            writer = SummaryWriter(log_dir=self.log_dir)
        self._writer: Any = writer

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` written to (``None`` once closed)."""
        return self._writer

    def write_meta(self, meta: dict[str, Any]) -> None:
        self._names = [str(n) for n in meta.get("names", [])]
        self._writer.add_text("gradguard/meta", "```\n" + dumps(meta) + "\n```", 0)

    def write_record(self, record: dict[str, Any]) -> None:
        step = int(record.get("step_last", 0))
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key in ("step_first", "step_last", "rank", "time"):
                continue
            self._writer.add_scalar(f"gradguard/{key}", value, step)
        if self.per_layer:
            for key in self.PER_LAYER_KEYS:
                for name, value in zip(self._names, record.get(key) or [], strict=False):
                    if value is not None and math.isfinite(value):
                        self._writer.add_scalar(f"gradguard/{key}/{name}", value, step)
        self._writer.flush()

    def write_event(self, event: Event) -> None:
        self._writer.add_text("gradguard/events", event.format(), event.step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ConsoleSink(Sink):
    """Events, one line each (``[gradguard] step 1234 spike: ...``); records are ignored.

    Args:
        stream: where to write; default ``sys.stderr`` looked up at each write (so
            redirections made after construction are honoured).
        kinds: only these event kinds (default: all).
    """

    def __init__(self, stream: TextIO | None = None, kinds: Iterable[str] | None = None) -> None:
        self.stream = stream
        self.kinds = None if kinds is None else frozenset(kinds)

    def write_event(self, event: Event) -> None:
        if self.kinds is not None and event.kind not in self.kinds:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(event.format() + "\n")
        stream.flush()


class CallbackSink(Sink):
    """Calls ``fn(kind, payload)`` for everything: ``("meta", dict)``, ``("record", dict)``
    and ``("event", Event)``.

    Example:
        >>> seen = []
        >>> sink = CallbackSink(lambda kind, payload: seen.append((kind, payload)))
    """

    def __init__(self, fn: Callable[[str, Any], object]) -> None:
        if not callable(fn):
            raise TypeError(f"CallbackSink fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.fn("meta", meta)

    def write_record(self, record: dict[str, Any]) -> None:
        self.fn("record", record)

    def write_event(self, event: Event) -> None:
        self.fn("event", event)


# --------------------------------------------------------------------------------------
# Specs: the one parser, and what make_sink and the per-rank naming build on it
# --------------------------------------------------------------------------------------

_SINK_METHODS = ("write_meta", "write_record", "write_event", "close")
_TENSORBOARD = "tensorboard:"


def is_sink(obj: object) -> bool:
    """Whether ``obj`` is a sink: it has callable ``write_meta``, ``write_record``,
    ``write_event`` and ``close`` (any such object, a :class:`Sink` subclass or not)."""
    return all(callable(getattr(obj, m, None)) for m in _SINK_METHODS)


@dataclass(frozen=True)
class SinkSpec:
    """A sink spec, parsed by :func:`parse_sink_spec`.

    Attributes:
        kind: ``"sink"`` (an object given as is), ``"callback"``, ``"console"``,
            ``"tensorboard"``, ``"jsonl"`` or ``"csv"``.
        target: the sink or callable; the TensorBoard directory (a str); the file path as
            given (str or ``os.PathLike``); ``None`` for the console.
    """

    kind: str
    target: Any


def parse_sink_spec(spec: Any) -> SinkSpec:
    """Parse one sink spec (the one place that reads specs).

    Args:
        spec: one of

            * a sink (any object with ``write_meta``, ``write_record``, ``write_event``
              and ``close``);
            * a path (str or ``os.PathLike``) ending ``.jsonl`` (JSON Lines) or ``.csv``
              (any case);
            * ``"console"`` (events on stderr);
            * ``"tensorboard:DIR"`` (TensorBoard writing to ``DIR``);
            * a callable ``fn(kind, payload)``.

    Returns:
        The :class:`SinkSpec`.

    Raises:
        ValueError: for a string that is none of the above.
        TypeError: for any other type.
    """
    if is_sink(spec):
        return SinkSpec("sink", spec)
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s == "console":
            return SinkSpec("console", None)
        if s.startswith(_TENSORBOARD):
            log_dir = s[len(_TENSORBOARD) :]
            if not log_dir:
                raise ValueError(f"sink spec {s!r}: give a directory, e.g. 'tensorboard:runs/a'")
            return SinkSpec("tensorboard", log_dir)
        low = s.lower()
        if low.endswith(".jsonl"):
            return SinkSpec("jsonl", spec)
        if low.endswith(".csv"):
            return SinkSpec("csv", spec)
        raise ValueError(
            f"unknown sink spec {s!r}: expected a path ending .jsonl or .csv, 'console', "
            "'tensorboard:DIR', a callable or a Sink"
        )
    if callable(spec):
        return SinkSpec("callback", spec)
    raise TypeError(
        f"sink spec must be a Sink, a path string, 'console', 'tensorboard:DIR' or a "
        f"callable, got {type(spec).__name__} {spec!r}"
    )


def make_sink(spec: Any) -> Any:
    """Turn a sink spec into a sink.

    Args:
        spec: a spec as :func:`parse_sink_spec` reads it: a sink (returned as is), a path
            ending ``.jsonl`` -> :class:`JSONLSink`, or ``.csv`` -> :class:`CSVSink`,
            ``"console"`` -> :class:`ConsoleSink` on stderr, ``"tensorboard:DIR"`` ->
            :class:`TensorBoardSink` writing to ``DIR``, a callable ``fn(kind, payload)``
            -> :class:`CallbackSink`.

    Returns:
        The sink.

    Raises:
        ValueError: for a string that is none of the above.
        TypeError: for any other type.
    """
    parsed = parse_sink_spec(spec)
    kind, target = parsed.kind, parsed.target
    if kind == "sink":
        return target
    if kind == "console":
        return ConsoleSink()
    if kind == "tensorboard":
        return TensorBoardSink(target)
    if kind == "jsonl":
        return JSONLSink(os.fspath(target))
    if kind == "csv":
        return CSVSink(os.fspath(target))
    return CallbackSink(target)


def sink_specs(sinks: Any) -> list[Any]:
    """The list of specs in a ``sinks`` argument: a single spec (a path, which is itself a
    sequence of characters, a callable or a sink) is wrapped in a list.

    Args:
        sinks: one spec or an iterable of specs.

    Returns:
        A new list of the specs (not parsed).
    """
    single = isinstance(sinks, (str, bytes, os.PathLike)) or callable(sinks)
    if single or hasattr(sinks, "write_event"):
        return [sinks]
    return list(sinks)


# --------------------------------------------------------------------------------------
# Per-rank naming: rank 0 by default, per-rank files as an option
# --------------------------------------------------------------------------------------


def rank_path(path: str | os.PathLike[str], rank: int) -> str | os.PathLike[str]:
    """``run.jsonl`` -> ``run.rank1.jsonl`` (rank 0 keeps the name it was given).

    Args:
        path: a file path.
        rank: the rank.

    Returns:
        The path for ``rank``, of the same type (str or Path).
    """
    if rank == 0:
        return path
    p = Path(path)
    out = p.with_name(f"{p.stem}.rank{rank}{p.suffix}")
    return str(out) if isinstance(path, str) else out


def _spec_for_rank(spec: Any, rank: int) -> Any:
    parsed = parse_sink_spec(spec)
    if parsed.kind == "tensorboard":
        return f"{_TENSORBOARD}{os.path.join(parsed.target, f'rank{rank}')}"
    if parsed.kind in ("jsonl", "csv"):
        return rank_path(parsed.target, rank)
    return spec  # "console" (lines carry the rank), callables and sink objects: as given


def sinks_for_rank(sinks: Any, log_ranks: str, rank: int) -> Any:
    """The sinks a rank writes to.

    Args:
        sinks: the Guard's ``sinks`` argument.
        log_ranks: ``"zero"``: only rank 0 writes (every sink is dropped on the others; their
            monitor still runs, for the remedies); ``"all"``: every rank writes, files get
            per-rank names (``run.jsonl``, ``run.rank1.jsonl``, ...; TensorBoard directories
            a ``rank<r>`` subdirectory).
        rank: this rank.

    Returns:
        The sink specs for this rank (``sinks`` itself on rank 0).

    Raises:
        ValueError: if ``log_ranks`` is not one of :data:`LOG_RANKS`, or (``"all"``, on
            ranks other than 0) for a spec :func:`parse_sink_spec` refuses.
        TypeError: for a spec of a type :func:`parse_sink_spec` refuses.
    """
    if log_ranks not in LOG_RANKS:
        raise ValueError(f"log_ranks must be one of {LOG_RANKS}, got {log_ranks!r}")
    if rank == 0:
        return sinks
    if log_ranks == "zero":
        return []
    return [_spec_for_rank(s, rank) for s in sink_specs(sinks)]
