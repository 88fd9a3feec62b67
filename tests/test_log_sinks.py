"""Tests of gradguard.log.sinks: the sinks, the one spec parser, per-rank naming."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest

from gradguard.log.events import Event
from gradguard.log.jsonvalues import decode_json_value
from gradguard.log.sinks import (
    CallbackSink,
    ConsoleSink,
    CSVSink,
    JSONLSink,
    Sink,
    SinkSpec,
    TensorBoardSink,
    make_sink,
    parse_sink_spec,
    rank_path,
    sink_specs,
    sinks_for_rank,
)
from log_utils import NASTY_NAMES
from log_utils import record as _record
from log_utils import same as _same

NAN, INF = math.nan, math.inf


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
    assert sink.writer is None  # released by close


def test_tensorboard_sink_per_layer_adam_signals_finite_only():
    record = {"step_last": 7, "layer_norm_max": [1.0, math.nan],
              "layer_update_ratio": [0.01, math.nan], "layer_grad_v_rms": [None, 2.5],
              "update_ratio_max": 0.01}
    w = _FakeWriter()
    sink = TensorBoardSink("unused", per_layer=True, writer=w)
    sink.write_meta({"names": ["a", "b"]})
    sink.write_record(record)
    per_layer = sorted((t, v) for t, v, _ in w.scalars if t.count("/") == 2)
    assert per_layer == [("gradguard/layer_grad_v_rms/b", 2.5),
                         ("gradguard/layer_norm_max/a", 1.0),
                         ("gradguard/layer_update_ratio/a", 0.01)]
    assert ("gradguard/update_ratio_max", 0.01, 7) in w.scalars
    w = _FakeWriter()  # off by default: the interval scalars only
    sink = TensorBoardSink("unused", writer=w)
    sink.write_meta({"names": ["a", "b"]})
    sink.write_record(record)
    assert [t for t, _, _ in w.scalars] == ["gradguard/update_ratio_max"]


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
    assert isinstance(sink, TensorBoardSink) and sink.writer.log_dir == f"{tmp_path}/tb"


# --------------------------------------------------------------------------------------
# make_sink and the one spec parser
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


def test_parse_sink_spec_reads_every_kind():
    fn = lambda kind, payload: None  # noqa: E731
    mine = Sink()
    assert parse_sink_spec("console") == SinkSpec("console", None)
    assert parse_sink_spec("tensorboard:runs/a") == SinkSpec("tensorboard", "runs/a")
    assert parse_sink_spec("logs/RUN.JSONL") == SinkSpec("jsonl", "logs/RUN.JSONL")
    assert parse_sink_spec(Path("r.csv")) == SinkSpec("csv", Path("r.csv"))  # type kept
    assert parse_sink_spec(fn) == SinkSpec("callback", fn)
    assert parse_sink_spec(mine) == SinkSpec("sink", mine)
    with pytest.raises(ValueError, match=r"run\.txt"):
        parse_sink_spec("run.txt")


def test_sink_specs_wraps_a_single_spec():
    fn = lambda kind, payload: None  # noqa: E731
    mine = Sink()
    assert sink_specs("run.jsonl") == ["run.jsonl"]
    assert sink_specs(Path("r.csv")) == [Path("r.csv")]
    assert sink_specs(fn) == [fn] and sink_specs(mine) == [mine]
    assert sink_specs(("console", fn)) == ["console", fn] and sink_specs(()) == []


# --------------------------------------------------------------------------------------
# Per-rank naming
# --------------------------------------------------------------------------------------


def test_rank_paths_and_sinks_for_rank():
    assert rank_path("logs/run.jsonl", 0) == "logs/run.jsonl"
    assert rank_path("logs/run.jsonl", 3) == os.path.join("logs", "run.rank3.jsonl")
    assert rank_path(Path("a/run.csv"), 1) == Path("a/run.rank1.csv")
    fn = lambda kind, payload: None  # noqa: E731
    sinks = ["run.jsonl", "console", "tensorboard:tb", fn]
    assert sinks_for_rank(sinks, "zero", 0) == sinks
    assert sinks_for_rank(sinks, "zero", 2) == []
    assert sinks_for_rank(sinks, "all", 2) == [
        "run.rank2.jsonl", "console", f"tensorboard:{os.path.join('tb', 'rank2')}", fn]
    assert sinks_for_rank("run.csv", "all", 1) == ["run.rank1.csv"]
    with pytest.raises(ValueError, match="log_ranks"):
        sinks_for_rank(sinks, "some", 1)


def test_sinks_for_rank_parses_with_make_sinks_parser():
    mine = Sink()
    assert sinks_for_rank([mine, "RUN.JSONL"], "all", 1) == [mine, "RUN.rank1.JSONL"]
    with pytest.raises(ValueError, match=r"run\.txt"):  # the same error make_sink gives
        sinks_for_rank(["run.txt"], "all", 1)
