"""Tests of gradguard.log.readback: read_jsonl and RunLog."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gradguard.log.events import Event
from gradguard.log.readback import RunLog, read_jsonl
from gradguard.log.sinks import JSONLSink, make_sink
from log_utils import NASTY_NAMES
from log_utils import record as _record
from log_utils import same as _same

NAN, INF = math.nan, math.inf


def test_jsonl_round_trip_with_nonfinite_and_nasty_names(tmp_path):
    path = tmp_path / "deep" / "dir" / "run.jsonl"
    meta = {"names": NASTY_NAMES, "log_every": 100, "note": "<b>&</b>", "thr": INF}
    rec = _record(NASTY_NAMES)
    ev = Event(
        57,
        "nonfinite",
        'layer "q"\nexploded <b>',
        NASTY_NAMES[:3],
        {"pre_norm": NAN, "ratio": INF, "steps": [57, 58], "low": -INF},
        rank=1,
    )
    with JSONLSink(path) as sink:
        sink.write_meta(meta)
        sink.write_record(rec)
        sink.write_event(ev)
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")
    assert len(lines) == 4 and lines[-1] == ""  # one object per line
    for line in lines[:-1]:
        obj = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
        assert obj["type"] in ("meta", "record", "event")
    assert "\u4e2d" in raw and "<b>" in raw  # no escaping beyond JSON's own
    log = read_jsonl(path)
    assert log.meta == meta and log.names == NASTY_NAMES
    assert len(log.records) == 1 and _same(log.records[0], rec)
    assert len(log.events) == 1 and _same(log.events[0].to_dict(), ev.to_dict())


def test_read_jsonl_tolerates_torn_last_line_only(tmp_path):
    path = tmp_path / "run.jsonl"
    with JSONLSink(path) as sink:
        sink.write_meta({"names": ["a"]})
        sink.write_record({"step_first": 1, "pre_norm_max": 2.0})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"type": "record", "step_fi')  # the process died mid-write
    log = read_jsonl(path)
    assert len(log.records) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "meta"}\nnot json\n{"type": "record"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(bad)


def test_jsonl_append_merges_meta_and_skips_unknown_types(tmp_path):
    path = tmp_path / "run.jsonl"
    with JSONLSink(path) as s:
        s.write_meta({"names": ["a"], "resumed": False})
        s.write_record({"step_first": 1})
    with JSONLSink(path, mode="a") as s:
        s.write_meta({"resumed": True})
        s.write_record({"step_first": 2})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"type": "future_thing", "x": 1}\n')
    log = read_jsonl(path)
    assert log.meta == {"names": ["a"], "resumed": True}
    assert [r["step_first"] for r in log.records] == [1, 2]
    with pytest.raises(ValueError, match="mode"):
        JSONLSink(path, mode="x")


def test_read_jsonl_accepts_path_objects(tmp_path):
    p = Path(tmp_path) / "r.jsonl"
    with make_sink(p) as s:
        s.write_event(Event(1, "rollback", "to step 0"))
    assert read_jsonl(p).events[0].kind == "rollback"


def test_malformed_lines_name_the_file_and_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"type": "meta", "names": "w"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m.jsonl:1: malformed meta line"):
        read_jsonl(bad)
    bad.write_text('{"type": "event", "kind": "spike"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m.jsonl:1: malformed event line"):
        read_jsonl(bad)
    assert RunLog().names == [] and RunLog(meta={"names": ["a"]}).names == ["a"]
