"""Events: something happened at a training step, and here is what to try.

An :class:`Event` is the unit of advice gradguard gives: the monitor's detectors
(:mod:`gradguard.monitor.detectors`) produce ``spike``, ``nonfinite``, ``vanishing``,
``high_clip_rate``, ``skip`` and ``update_spike`` events at each flush; the Guard's remedies add
``lr_backoff``, ``lr_restore``, ``rollback`` and ``abort``. Sinks
(:mod:`gradguard.log.sinks`) carry them out of the training loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EVENT_KINDS", "EVENT_SEVERITY", "Event"]

#: Every event kind gradguard itself emits. The first six come from the monitor's
#: detectors (see :mod:`gradguard.monitor.detectors`), the rest from the Guard and its
#: remedies. Other kinds are accepted (a user's remedy may add its own), these are the
#: known ones.
EVENT_KINDS: tuple[str, ...] = (
    "spike",  # pre-clip norm far above its running baseline
    "nonfinite",  # NaN/inf gradient norm
    "vanishing",  # some layers' gradients are orders of magnitude below the rest
    "high_clip_rate",  # most steps of an interval were clipped
    "skip",  # an optimizer step was skipped
    "update_spike",  # Adam's update or gradient/second-moment ratio jumped in some layers
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
    "update_spike": "warning",
    "lr_backoff": "info",
    "lr_restore": "info",
    "rollback": "error",
    "abort": "error",
}


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
