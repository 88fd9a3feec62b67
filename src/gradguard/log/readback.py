"""Reading a JSON Lines log back: :func:`read_jsonl` gives a :class:`RunLog`.

The reverse of :class:`~gradguard.log.sinks.JSONLSink`: meta lines are merged, records and
events kept in file order, non-finite floats decoded (:mod:`gradguard.log.jsonvalues`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from gradguard.log.events import Event
from gradguard.log.jsonvalues import decode_json_value

__all__ = ["RunLog", "read_jsonl"]


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
    """Read a log written by :class:`~gradguard.log.sinks.JSONLSink`.

    Non-finite floats come back as floats (see :mod:`gradguard.log.jsonvalues`). A torn
    last line (the process died mid-write) is skipped; lines of an unknown ``type`` are
    ignored (forward compatibility).

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
            _add_line(log, kind, obj)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{os.fspath(path)}:{i}: malformed {kind} line ({e})") from e
    return log


def _add_line(log: RunLog, kind: Any, obj: dict[str, Any]) -> None:
    if kind == "meta":
        if not isinstance(obj.get("names", []), list):
            raise TypeError(f"names must be a list, got {obj['names']!r}")
        log.meta.update(obj)
    elif kind == "record":
        log.records.append(obj)
    elif kind == "event":
        log.events.append(Event.from_dict(obj))
