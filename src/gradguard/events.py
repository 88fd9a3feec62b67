"""Event records and the sinks that carry monitoring output out of the training loop.

Three kinds of payload leave gradguard, always on the host and never in the per-step path:

* one **meta** dict per run (parameter names, options, version),
* one **record** dict per log interval (see :mod:`gradguard.monitor` for its keys),
* **events** (:class:`Event`): something happened at a step and here is what to try.

A sink is any object with ``write_meta``, ``write_record``, ``write_event`` and ``close``
(:class:`Sink` gives no-op defaults). :func:`make_sink` turns a short spec into one:

>>> from gradguard.events import make_sink
>>> sink = make_sink("console")                # events, one line each, to stderr
>>> sink = make_sink(lambda kind, payload: None)   # a callback

The JSON Lines file written by :class:`JSONLSink` is the canonical log: every line is one
JSON object with a ``"type"`` of ``"meta"``, ``"record"`` or ``"event"``. JSON has no
NaN or infinity, so non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (the spellings of JavaScript's ``Number()`` and
Python's ``float()``); :func:`read_jsonl` turns them back into floats everywhere except
in the text fields (names, messages), so a parameter literally named ``"NaN"`` survives.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "EVENT_KINDS",
    "EVENT_SEVERITY",
    "CSVSink",
    "CallbackSink",
    "ConsoleSink",
    "Event",
    "JSONLSink",
    "RunLog",
    "Sink",
    "TensorBoardSink",
    "decode_json_value",
    "encode_json_value",
    "make_sink",
    "read_jsonl",
]

#: Every event kind gradguard itself emits. The first five come from the monitor's
#: detectors (see :mod:`gradguard.monitor`), the rest from the Guard and its remedies.
#: Other kinds are accepted (a user's remedy may add its own), these are the known ones.
EVENT_KINDS: tuple[str, ...] = (
    "spike",  # pre-clip norm far above its running baseline
    "nonfinite",  # NaN/inf gradient norm
    "vanishing",  # some layers' gradients are orders of magnitude below the rest
    "high_clip_rate",  # most steps of an interval were clipped
    "skip",  # an optimizer step was skipped
    "lr_backoff",  # a remedy lowered the learning rate
    "lr_restore",  # ... and restored it
    "rollback",  # parameters restored from an earlier snapshot
    "abort",  # training stopped
)

#: How bad each known kind is: "error" (the run is in trouble), "warning" (look at it),
#: "info" (a remedy did its job). Unknown kinds are "warning".
EVENT_SEVERITY: dict[str, str] = {
    "spike": "warning",
    "nonfinite": "error",
    "vanishing": "warning",
    "high_clip_rate": "warning",
    "skip": "warning",
    "lr_backoff": "info",
    "lr_restore": "info",
    "rollback": "error",
    "abort": "error",
}

# Non-finite floats in JSON. Keys whose values are free text (parameter names, messages)
# are never decoded, so a layer named "NaN" stays a string.
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_TEXT_KEYS = frozenset({"type", "kind", "message", "names", "layers", "top_layer"})


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------


@dataclass
class Event:
    """Something that happened at a training step, with advice.

    Args:
        step: the optimizer step it refers to (for interval events: the step that opened
            the episode, see each detector).
        kind: what happened; one of :data:`EVENT_KINDS` for gradguard's own events.
        message: one human-readable sentence or two: what happened and what to try.
        layers: the offending parameter names, most relevant first (or in model order,
            as the detector documents); at most a few, may be empty.
        data: the numbers behind the message (JSON-serialisable: numbers, strings, lists).
        rank: the distributed rank that saw it.

    Example:
        >>> e = Event(120, "spike", "norm 52 is 14x its baseline", ["fc1.weight"], {"norm": 52.0})
        >>> e.format()
        '[gradguard] step 120 spike: norm 52 is 14x its baseline'
    """

    step: int
    kind: str
    message: str
    layers: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    rank: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int):
            try:
                self.step = int(self.step.__index__())  # numpy ints; never a float
            except AttributeError:
                raise TypeError(
                    f"Event step must be an int, got {type(self.step).__name__} {self.step!r}"
                ) from None
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"Event kind must be a non-empty str, got {self.kind!r}")
        if not isinstance(self.message, str):
            raise TypeError(f"Event message must be a str, got {type(self.message).__name__}")
        if isinstance(self.layers, str):
            raise TypeError(f"Event layers must be a list of str, got the str {self.layers!r}")
        self.layers = [str(n) for n in self.layers]
        if not isinstance(self.data, Mapping):
            raise TypeError(f"Event data must be a dict, got {type(self.data).__name__}")
        self.data = dict(self.data)
        self.rank = int(self.rank)

    @property
    def severity(self) -> str:
        """``"error"``, ``"warning"`` or ``"info"`` (see :data:`EVENT_SEVERITY`)."""
        return EVENT_SEVERITY.get(self.kind, "warning")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (floats stay floats, NaN included; sinks encode them)."""
        return {
            "step": self.step,
            "kind": self.kind,
            "message": self.message,
            "layers": list(self.layers),
            "data": dict(self.data),
            "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        """The inverse of :meth:`to_dict`; a ``"type"`` key and unknown keys are ignored.

        Raises:
            ValueError: if ``step``, ``kind`` or ``message`` is missing.
        """
        missing = [k for k in ("step", "kind", "message") if k not in d]
        if missing:
            raise ValueError(f"Event.from_dict: missing key(s) {missing} in {dict(d)!r}")
        return cls(
            step=d["step"],
            kind=d["kind"],
            message=d["message"],
            layers=list(d.get("layers") or []),
            data=dict(d.get("data") or {}),
            rank=d.get("rank", 0),
        )

    def format(self) -> str:
        """One line: ``[gradguard] step 1234 spike: ...`` (rank shown when not 0).

        Line breaks inside the message or names are shown as ``\\n`` so that one event
        is always one line.
        """
        who = "[gradguard]" if self.rank == 0 else f"[gradguard rank {self.rank}]"
        line = f"{who} step {self.step} {self.kind}: {self.message}"
        return line.replace("\r", "\\r").replace("\n", "\\n")


# --------------------------------------------------------------------------------------
# JSON encoding of non-finite floats
# --------------------------------------------------------------------------------------


def encode_json_value(obj: Any) -> Any:
    """Make ``obj`` strict-JSON serialisable: non-finite floats become strings.

    Dicts, lists and tuples are walked; :class:`Event` and dataclasses become dicts;
    0-d tensors and numpy scalars become Python numbers (``.item()``: a host read, which
    is fine here because sinks only ever run on the host at flush time).

    Returns:
        A structure of dict/list/str/int/float/bool/None with only finite floats.
    """
    if isinstance(obj, float):  # numpy float64 too (a float subclass)
        if math.isfinite(obj):
            return float(obj)
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): encode_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_json_value(v) for v in obj]
    if isinstance(obj, Event):
        return encode_json_value(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return encode_json_value(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return encode_json_value(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON: {obj!r}")


def decode_json_value(obj: Any, key: str | None = None) -> Any:
    """The inverse of :func:`encode_json_value` for values read back from JSON.

    The strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` become floats, except
    under the text keys (``names``, ``layers``, ``message``, ``kind``, ``top_layer``).
    """
    if key in _TEXT_KEYS:
        return obj
    if isinstance(obj, str):
        return _STR_TO_NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: decode_json_value(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_json_value(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str:
    # ensure_ascii=False: names stay readable; JSON itself escapes quotes, backslashes
    # and control characters (so a newline in a name never splits a line).
    return json.dumps(encode_json_value(obj), ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------------------
# Sinks
# --------------------------------------------------------------------------------------


class Sink:
    """Base class of sinks: every method is a no-op, override the ones you need.

    Sinks are called on the host only: once with the run's meta, then at every flush of
    the :class:`~gradguard.monitor.Monitor` with its interval record and new events,
    and immediately for events that the Guard emits itself. Usable as a context manager.
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
    everything logged up to its last flush. Read it back with :func:`read_jsonl`.

    Args:
        path: the file; parent directories are created.
        mode: ``"w"`` truncates, ``"a"`` appends (resuming a run into the same file;
            :func:`read_jsonl` merges repeated meta lines).
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "w") -> None:
        self.path = Path(path)
        self._file: TextIO | None = _open_text(self.path, _check_mode(mode))

    def _write(self, obj: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"JSONLSink({str(self.path)!r}) is closed")
        self._file.write(_dumps(obj) + "\n")
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
            return _dumps(v)
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
                _dumps(event.layers),
                _dumps(event.data),
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
            ``gradguard/layer_norm_max/<name>`` (one curve per parameter tensor: off by
            default, it clutters TensorBoard on large models).
        writer: an existing ``SummaryWriter`` to write to instead of creating one.

    Raises:
        ImportError: if ``tensorboard`` is not installed, with the command to install it.
    """

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

    def write_meta(self, meta: dict[str, Any]) -> None:
        self._names = [str(n) for n in meta.get("names", [])]
        self._writer.add_text("gradguard/meta", "```\n" + _dumps(meta) + "\n```", 0)

    def write_record(self, record: dict[str, Any]) -> None:
        step = int(record.get("step_last", 0))
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key in ("step_first", "step_last", "rank", "time"):
                continue
            self._writer.add_scalar(f"gradguard/{key}", value, step)
        if self.per_layer:
            for name, value in zip(self._names, record.get("layer_norm_max", []), strict=False):
                self._writer.add_scalar(f"gradguard/layer_norm_max/{name}", value, step)
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


_SINK_METHODS = ("write_meta", "write_record", "write_event", "close")


def _is_sink(obj: object) -> bool:
    return all(callable(getattr(obj, m, None)) for m in _SINK_METHODS)


def make_sink(spec: Any) -> Any:
    """Turn a sink spec into a sink.

    Args:
        spec: one of

            * a sink (any object with ``write_meta``, ``write_record``, ``write_event``
              and ``close``): returned as is;
            * a path (str or ``os.PathLike``) ending ``.jsonl`` -> :class:`JSONLSink`,
              or ``.csv`` -> :class:`CSVSink`;
            * ``"console"`` -> :class:`ConsoleSink` on stderr;
            * ``"tensorboard:DIR"`` -> :class:`TensorBoardSink` writing to ``DIR``;
            * a callable ``fn(kind, payload)`` -> :class:`CallbackSink`.

    Returns:
        The sink.

    Raises:
        ValueError: for a string that is none of the above.
        TypeError: for any other type.
    """
    if _is_sink(spec):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s == "console":
            return ConsoleSink()
        if s.startswith("tensorboard:"):
            log_dir = s[len("tensorboard:") :]
            if not log_dir:
                raise ValueError(f"sink spec {s!r}: give a directory, e.g. 'tensorboard:runs/a'")
            return TensorBoardSink(log_dir)
        low = s.lower()
        if low.endswith(".jsonl"):
            return JSONLSink(s)
        if low.endswith(".csv"):
            return CSVSink(s)
        raise ValueError(
            f"unknown sink spec {s!r}: expected a path ending .jsonl or .csv, 'console', "
            "'tensorboard:DIR', a callable or a Sink"
        )
    if callable(spec):
        return CallbackSink(spec)
    raise TypeError(
        f"sink spec must be a Sink, a path string, 'console', 'tensorboard:DIR' or a "
        f"callable, got {type(spec).__name__} {spec!r}"
    )


# --------------------------------------------------------------------------------------
# Reading a log back
# --------------------------------------------------------------------------------------


@dataclass
class RunLog:
    """A JSON Lines log read back by :func:`read_jsonl`.

    Attributes:
        meta: the meta dict (repeated meta lines, e.g. from a resumed run appending to the
            same file, are merged in order: later keys win).
        records: the interval records, in file order.
        events: the events, in file order.
    """

    meta: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """The parameter names the per-layer lists of each record are aligned with."""
        return list(self.meta.get("names", []))


def read_jsonl(path: str | os.PathLike[str]) -> RunLog:
    """Read a log written by :class:`JSONLSink`.

    Non-finite floats come back as floats (see the module docstring). A torn last line
    (the process died mid-write) is skipped; lines of an unknown ``type`` are ignored
    (forward compatibility).

    Args:
        path: the ``.jsonl`` file.

    Returns:
        A :class:`RunLog`.

    Raises:
        ValueError: on a line that is not a JSON object, other than a torn last line,
            naming the file and line number.
    """
    log = RunLog()
    with open(path, encoding="utf-8") as f:
        # Iterating the file splits on "\n" only, never on U+2028 or other characters
        # that str.splitlines() would treat as line breaks (JSON leaves them unescaped).
        lines = list(f)
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) and not line.endswith("\n"):
                break  # torn final write
            raise ValueError(f"{os.fspath(path)}:{i}: not a gradguard log line ({e})") from e
        obj = decode_json_value(obj)
        kind = obj.pop("type", None)
        try:
            if kind == "meta":
                if not isinstance(obj.get("names", []), list):
                    raise TypeError(f"names must be a list, got {obj['names']!r}")
                log.meta.update(obj)
            elif kind == "record":
                log.records.append(obj)
            elif kind == "event":
                log.events.append(Event.from_dict(obj))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{os.fspath(path)}:{i}: malformed {kind} line ({e})") from e
    return log
