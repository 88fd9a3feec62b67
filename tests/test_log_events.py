"""Tests of gradguard.log.events: Event, its kinds and severities."""

from __future__ import annotations

import pytest
import torch

from gradguard.log.events import EVENT_KINDS, EVENT_SEVERITY, Event


def test_event_kinds_cover_the_contract():
    for kind in (
        "spike",
        "nonfinite",
        "vanishing",
        "high_clip_rate",
        "skip",
        "lr_backoff",
        "lr_restore",
        "rollback",
        "abort",
    ):
        assert kind in EVENT_KINDS
    assert set(EVENT_SEVERITY) == set(EVENT_KINDS)


def test_event_dict_round_trip_and_defaults():
    e = Event(12, "spike", "norm 50 is 20x baseline", ["a", "b"], {"norm": 50.0}, rank=3)
    assert Event.from_dict(e.to_dict()) == e
    assert Event.from_dict({"type": "event", **e.to_dict(), "extra": 1}) == e
    bare = Event(1, "abort", "stopped")
    assert bare.layers == [] and bare.data == {} and bare.rank == 0
    assert bare.severity == "error" and Event(1, "lr_restore", "").severity == "info"
    assert Event(1, "my_remedy", "").severity == "warning"  # custom kinds are allowed


def test_event_validation():
    with pytest.raises(TypeError, match="step"):
        Event(1.5, "spike", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        Event(1, "", "x")
    with pytest.raises(TypeError, match="layers"):
        Event(1, "spike", "x", "fc.weight")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data"):
        Event(1, "spike", "x", [], [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing"):
        Event.from_dict({"kind": "spike"})
    assert Event(torch.tensor(5).numpy()[()], "skip", "x").step == 5  # numpy ints ok


def test_event_format_is_one_line():
    e = Event(1234, "spike", "in layer\nfc1\r", ["x"])
    assert e.format() == "[gradguard] step 1234 spike: in layer\\nfc1\\r"
    assert Event(5, "skip", "s", rank=2).format().startswith("[gradguard rank 2] step 5 skip:")
