"""Tests of gradguard.events: Event, JSON encoding, the sinks and read_jsonl."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from gradguard.events import (
    EVENT_KINDS,
    CallbackSink,
    ConsoleSink,
    CSVSink,
    Event,
    JSONLSink,
    Sink,
    TensorBoardSink,
    decode_json_value,
    encode_json_value,
    make_sink,
    read_jsonl,
)

NAN, INF = math.nan, math.inf

# Names a user's model may really produce, and some it may not but we must survive.
NASTY_NAMES = [
    'attn."q_proj".weight',
    "mlp\nfc1\r\n.bias",
    "ln_f.\u00e9\u4e2d\u6587.\U0001f525",
    "</script><script>alert('x')</script>&amp;",
    "comma,semicolon;tab\there",
    "back\\slash",
    "line\u2028separator\u2029para",
    "NaN",
    "Infinity",
]


def _same(a: object, b: object) -> bool:
    """Equality where NaN equals NaN (the round trip must keep NaN, not turn it to None)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _record(names: list[str]) -> dict:
    n = len(names)
    return {
        "step_first": 1,
        "step_last": 100,
        "n_steps": 100,
        "pre_norm_max": INF,
        "pre_norm_mean": NAN,
        "pre_norm_min": -INF,
        "pre_norm_max_step": None,
        "clip_rate": 0.25,
        "layer_norm_mean": [float(i) if i % 3 else NAN for i in range(n)],
        "layer_norm_max": [INF] * n,
        "layer_nonfinite": list(range(n)),
        "top_layer": names[-2],  # the layer literally named "NaN"
    }


# --------------------------------------------------------------------------------------
# Event
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------


def test_encode_decode_nonfinite_values():
    obj = {"a": NAN, "b": [INF, -INF, 1.5], "c": (1, "x"), "t": torch.tensor([1.0, NAN])}
    enc = encode_json_value(obj)
    assert enc == {
        "a": "NaN",
        "b": ["Infinity", "-Infinity", 1.5],
        "c": [1, "x"],
        "t": [1.0, "NaN"],
    }
    json.dumps(enc, allow_nan=False)  # strict JSON
    dec = decode_json_value(enc)
    assert _same(dec, {"a": NAN, "b": [INF, -INF, 1.5], "c": [1, "x"], "t": [1.0, NAN]})
    # Text keys are never decoded: a layer named "NaN" stays a string.
    assert decode_json_value({"layers": ["NaN"], "top_layer": "Infinity"}) == {
        "layers": ["NaN"],
        "top_layer": "Infinity",
    }
    with pytest.raises(TypeError, match="object"):
        encode_json_value(object())


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


def test_closed_sink_refuses_writes(tmp_path):
    sink = JSONLSink(tmp_path / "a.jsonl")
    sink.close()
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.write_record({})


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


def test_csv_quotes_names_and_round_trips(tmp_path):
    path = tmp_path / "run.csv"
    rec = _record(NASTY_NAMES)
    ev = Event(3, "spike", 'msg with "quotes", commas\nand a newline', NASTY_NAMES, {"r": NAN})
    with CSVSink(path) as sink:
        sink.write_meta({"names": NASTY_NAMES})  # ignored
        sink.write_record(rec)
        sink.write_record({**rec, "step_first": 101, "extra": 1})
        sink.write_event(ev)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and list(rows[0]) == list(rec)
    assert rows[0]["top_layer"] == "NaN" and rows[1]["step_first"] == "101"
    assert rows[0]["pre_norm_max"] == "inf" and rows[0]["pre_norm_mean"] == "nan"
    assert float(rows[0]["pre_norm_min"]) == -INF
    assert _same(decode_json_value(json.loads(rows[0]["layer_norm_mean"])), rec["layer_norm_mean"])
    ev_path = tmp_path / "run.events.csv"
    with open(ev_path, newline="", encoding="utf-8") as f:
        erows = list(csv.reader(f))
    assert erows[0] == list(CSVSink.EVENT_COLUMNS)
    step, kind, rank, message, layers, data = erows[1]
    assert (step, kind, rank, message) == ("3", "spike", "0", ev.message)
    assert json.loads(layers) == NASTY_NAMES
    assert json.loads(data) == {"r": "NaN"}


def test_csv_events_path_and_header_once_on_append(tmp_path):
    ev_path = tmp_path / "ev.csv"
    for _ in range(2):
        with CSVSink(tmp_path / "rec.csv", events_path=ev_path, mode="a") as sink:
            sink.write_record({"a": 1})
            sink.write_event(Event(1, "skip", "s"))
    assert (tmp_path / "rec.csv").read_text().splitlines() == ["a", "1", "1"]
    assert len(ev_path.read_text().splitlines()) == 3


# --------------------------------------------------------------------------------------
# Console, callback, TensorBoard
# --------------------------------------------------------------------------------------


def test_console_sink_one_line_per_event(capsys):
    buf = io.StringIO()
    sink = ConsoleSink(buf, kinds=["spike", "skip"])
    sink.write_meta({"names": ["a"]})
    sink.write_record({"step_first": 1})
    sink.write_event(Event(1234, "spike", "norm 1e4 is 50x baseline;\ntry a lower lr"))
    sink.write_event(Event(1235, "lr_backoff", "filtered out"))
    assert buf.getvalue() == (
        "[gradguard] step 1234 spike: norm 1e4 is 50x baseline;\\ntry a lower lr\n"
    )
    ConsoleSink().write_event(Event(7, "abort", "stopped"))  # stderr, looked up late
    assert capsys.readouterr().err == "[gradguard] step 7 abort: stopped\n"


def test_callback_sink_gets_kind_and_payload():
    seen = []
    sink = CallbackSink(lambda kind, payload: seen.append((kind, payload)))
    ev = Event(1, "skip", "s")
    sink.write_meta({"m": 1})
    sink.write_record({"r": 2})
    sink.write_event(ev)
    sink.close()
    assert seen == [("meta", {"m": 1}), ("record", {"r": 2}), ("event", ev)]
    with pytest.raises(TypeError, match="callable"):
        CallbackSink(3)  # type: ignore[arg-type]


class _FakeWriter:
    def __init__(self, log_dir: str | None = None) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.texts: list[tuple[str, str, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, text, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_sink_writes_scalars_and_events():
    w = _FakeWriter()
    sink = TensorBoardSink("unused", per_layer=True, writer=w)
    sink.write_meta({"names": ["a", "b"]})
    sink.write_record(
        {
            "step_first": 1,
            "step_last": 100,
            "pre_norm_max": 3.0,
            "clipped": 4,
            "top_layer": "a",
            "layer_norm_max": [1.0, 2.0],
            "rank": 0,
        }
    )
    sink.write_event(Event(50, "spike", "boom"))
    sink.close()
    assert ("gradguard/pre_norm_max", 3.0, 100) in w.scalars
    assert ("gradguard/clipped", 4, 100) in w.scalars
    assert ("gradguard/layer_norm_max/b", 2.0, 100) in w.scalars
    assert not any(t.endswith(("step_first", "rank", "top_layer")) for t, _, _ in w.scalars)
    assert ("gradguard/events", "[gradguard] step 50 spike: boom", 50) in w.texts
    assert w.closed


def test_tensorboard_sink_import_error_is_clear(monkeypatch):
    # None in sys.modules makes the import fail, whether tensorboard is installed or not.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardSink("runs/x")


def test_make_sink_tensorboard_spec(monkeypatch, tmp_path):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    sink = make_sink(f"tensorboard:{tmp_path}/tb")
    assert isinstance(sink, TensorBoardSink) and sink._writer.log_dir == f"{tmp_path}/tb"


# --------------------------------------------------------------------------------------
# make_sink
# --------------------------------------------------------------------------------------


def test_make_sink_dispatch(tmp_path):
    s = make_sink(str(tmp_path / "a.jsonl"))
    assert isinstance(s, JSONLSink)
    s.close()
    s = make_sink(tmp_path / "b.CSV")
    assert isinstance(s, CSVSink) and s.events_path == tmp_path / "b.events.csv"
    s.close()
    assert isinstance(make_sink("console"), ConsoleSink)
    assert isinstance(make_sink(lambda k, p: None), CallbackSink)
    mine = Sink()
    assert make_sink(mine) is mine

    class Duck:  # any object with the four methods is a sink, even if callable
        def write_meta(self, m): ...
        def write_record(self, r): ...
        def write_event(self, e): ...
        def close(self): ...
        def __call__(self, *a): ...

    duck = Duck()
    assert make_sink(duck) is duck


@pytest.mark.parametrize(
    ("spec", "exc", "match"),
    [
        ("run.txt", ValueError, "run.txt"),
        ("tensorboard:", ValueError, "directory"),
        ("", ValueError, "unknown sink"),
        (42, TypeError, "int"),
        (None, TypeError, "NoneType"),
    ],
)
def test_make_sink_rejects_bad_specs(spec, exc, match):
    with pytest.raises(exc, match=match):
        make_sink(spec)


def test_read_jsonl_accepts_path_objects(tmp_path):
    p = Path(tmp_path) / "r.jsonl"
    with make_sink(p) as s:
        s.write_event(Event(1, "rollback", "to step 0"))
    assert read_jsonl(p).events[0].kind == "rollback"
