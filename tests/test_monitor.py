"""Tests of gradguard.monitor.monitor: the Monitor's observe/flush cycle, its intervals,
counters, state, memory, sync-freedom, arguments and sinks."""

from __future__ import annotations

import io
import math
import tracemalloc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gradguard.log.events import Event
from gradguard.log.readback import read_jsonl
from gradguard.monitor import FIELDS, RECORD_KEYS, Interval, Monitor
from monitor_utils import Run
from monitor_utils import fields as _fields
from monitor_utils import nan_equal as _nan_equal
from monitor_utils import strip_time as _strip_time

NAN = math.nan


def test_flush_without_rows_is_a_noop():
    mon = Monitor(["a"], log_every=5)
    assert mon.flush() == [] and len(mon.records) == 0
    mon.observe(1, _fields(1.0), torch.ones(1))
    assert mon.pending == 1
    mon.flush()
    assert mon.pending == 0 and mon.records[-1]["n_steps"] == 1
    assert mon.flush() == [] and len(mon.records) == 1


def test_observe_returns_the_interval_it_completes():
    seen: list[tuple[str, object]] = []
    mon = Monitor(["a", "b"], log_every=3, sinks=lambda k, p: seen.append((k, p)))
    assert mon.observe(1, _fields(1.0), torch.ones(2)) is None
    assert mon.observe(2, _fields(2.0, nonfinite=1), torch.tensor([NAN, 1.0])) is None
    interval = mon.observe(3, _fields(3.0), torch.ones(2))
    assert isinstance(interval, Interval)
    assert interval.record is mon.records[-1] and list(interval.record) == list(RECORD_KEYS)
    assert (interval.record["step_first"], interval.record["step_last"]) == (1, 3)
    assert [e.kind for e in interval.events] == ["nonfinite"]
    assert interval.events == list(mon.events)
    assert [k for k, _ in seen] == ["meta", "event", "record"]  # events first
    assert mon.flush_interval() is None  # nothing pending
    mon.emit(Event(3, "lr_backoff", "halved"))  # emitted events are not the interval's
    mon.observe(4, _fields(1.0), torch.ones(2))
    again = mon.flush_interval()
    assert again is not None and again.events == [] and again.record["n_steps"] == 1


def test_exact_counters_across_irregular_flushes():
    gen = torch.Generator().manual_seed(7)
    mon = Monitor(["a", "b", "c"], log_every=37)
    expect = {"clipped": 0, "nonfinite": 0, "skipped": 0}
    for step in range(1000):
        c, nf, sk = (torch.rand(3, generator=gen) < torch.tensor([0.3, 0.05, 0.1])).tolist()
        per = torch.rand(3, generator=gen) + 0.1
        if nf:
            per[1] = NAN
        mon.observe(step, _fields(NAN if nf else 1.0, clipped=c, nonfinite=nf, skipped=sk), per)
        expect["clipped"] += c
        expect["nonfinite"] += nf
        expect["skipped"] += sk
        if step % 101 == 0:
            mon.flush()
    mon.flush()
    assert mon.totals["steps"] == 1000
    assert {k: mon.totals[k] for k in expect} == expect
    assert sum(r["n_steps"] for r in mon.records) == 1000
    assert sum(r["clipped"] for r in mon.records) == expect["clipped"]


def _drive(mon: Monitor, run: Run, steps: range) -> None:
    for step in steps:
        per = run.norms(step)
        if step == 130:
            per[4] *= 1e4
        if step >= 105:
            per[9] *= 1e-9
        mon.observe(step, *run.pack(per, loss=1.0 / (step + 1)))


def test_state_dict_round_trip_mid_interval_loses_nothing(tmp_path):
    opts = {"log_every": 50}
    run_a, run_b = Run(seed=8), Run(seed=8)
    ref = Monitor(run_a.names, **opts)
    _drive(ref, run_a, range(1, 251))

    first = Monitor(run_b.names, **opts)
    _drive(first, run_b, range(1, 121))  # 20 rows pending in the interval 101-150
    assert first.pending == 20
    path = tmp_path / "mon.pt"
    torch.save(first.state_dict(), path)
    jsonl = tmp_path / "resumed.jsonl"
    second = Monitor(run_b.names, sinks=[str(jsonl)], **opts)
    second.load_state_dict(torch.load(path, weights_only=True))
    assert second.pending == 20
    _drive(second, run_b, range(121, 251))

    assert _strip_time(list(second.records)) == _strip_time(list(ref.records)[2:])
    assert second.totals == {**ref.totals, "flushes": ref.totals["flushes"]}
    kinds = [(e.step, e.kind, e.layers) for e in ref.events]
    assert [(e.step, e.kind, e.layers) for e in second.events] == [k for k in kinds if k[0] > 100]
    assert ("spike" in {k for _, k, _ in kinds}) and ("vanishing" in {k for _, k, _ in kinds})
    second.close()
    log = read_jsonl(jsonl)
    assert [r["step_first"] for r in log.records] == [101, 151, 201]


def test_state_saved_with_a_larger_log_every_flushes_on_load():
    big = Monitor(["a"], log_every=10)
    for step in range(7):
        big.observe(step, _fields(1.0 + step), torch.ones(1))
    small = Monitor(["a"], log_every=5)
    small.load_state_dict(big.state_dict())
    assert small.pending == 0 and small.records[-1]["n_steps"] == 7
    assert small.records[-1]["pre_norm_max"] == 7.0
    assert small.buffer.shape == (7, len(FIELDS) + 1)  # grown to hold the saved rows


def test_load_state_dict_rejects_other_names():
    a = Monitor(["x", "y"])
    b = Monitor(["x", "z"])
    with pytest.raises(ValueError, match="other parameters"):
        b.load_state_dict(a.state_dict())


def test_load_state_dict_rejects_other_versions_and_shapes():
    mon = Monitor(["x"])
    with pytest.raises(ValueError, match="version"):
        mon.load_state_dict({**mon.state_dict(), "version": 99})
    with pytest.raises(ValueError, match="pending rows"):
        mon.load_state_dict({**mon.state_dict(), "pending_steps": [1]})


def test_memory_bounded_over_20000_steps():
    names = [f"l{i}" for i in range(8)]
    mon = Monitor(names, log_every=50, max_records=50, max_events=50)
    f = _fields(1.0)
    per = torch.ones(8)

    def drive(steps: range) -> None:
        for step in steps:
            mon.observe(step, f, per)
            if step % 500 == 0:
                mon.emit(Event(step, "lr_backoff", "halved the learning rate"))

    drive(range(2000))
    # Trace from step 2000: by step 10,000 the bounded deques are full of traced objects,
    # so what the next 10,000 steps leave behind is exactly the growth.
    tracemalloc.start()
    try:
        drive(range(2000, 10000))
        before = tracemalloc.take_snapshot()
        drive(range(10000, 20000))
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 32_000, growth  # a few KB of allocator noise, nothing per step
    assert len(mon.records) == 50 and len(mon.events) == 40
    assert mon.event_counts["lr_backoff"] == 40
    assert mon.totals["steps"] == 20000 and mon.totals["flushes"] == 400
    assert mon.pending == 0 and mon.buffer.shape is not None
    assert mon.buffer.shape == (50, len(FIELDS) + 8)  # the buffer never grows


# --------------------------------------------------------------------------------------
# Sync-freedom
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", None])
def test_observe_does_no_host_read_under_fake_tensor_mode(device):
    from torch._subclasses.fake_tensor import DataDependentOutputException

    names = [f"h.{i}.weight" for i in range(148)]
    with FakeTensorMode():
        mon = Monitor(names, log_every=16, device=device)
        for step in range(15):
            fields = torch.rand(len(FIELDS), device="cuda")
            per = torch.rand(len(names), device="cuda")
            mon.observe(step, fields, per)  # any host read would raise here
        assert mon.pending == 15 and mon.buffer.shape is not None
        assert mon.buffer.device.type == "cuda"
        state = mon.state_dict()  # a device clone, no read either
        assert state["pending"].shape == (15, len(FIELDS) + 148)
        # The 16th step flushes: the one place that reads values.
        with pytest.raises(DataDependentOutputException):
            mon.observe(
                15, torch.rand(len(FIELDS), device="cuda"), torch.rand(len(names), device="cuda")
            )


def test_observe_rejects_bad_input():
    mon = Monitor(["a", "b"], log_every=5)
    with pytest.raises(ValueError, match="fields"):
        mon.observe(1, torch.zeros(7), torch.zeros(2))
    with pytest.raises(ValueError, match="per_tensor"):
        mon.observe(1, torch.zeros(8), torch.zeros(3))
    with pytest.raises(TypeError, match="step"):
        mon.observe(torch.tensor(1), torch.zeros(8), torch.zeros(2))
    with pytest.raises(TypeError):
        mon.observe(1.5, torch.zeros(8), torch.zeros(2))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"log_every": 0}, ValueError, "log_every"),
        ({"log_every": 2.5}, TypeError, "log_every"),
        ({"spike_factor": 1.0}, ValueError, "spike_factor"),
        ({"spike_beta": 1.0}, ValueError, "spike_beta"),
        ({"clip_rate_threshold": 1.5}, ValueError, "clip_rate_threshold"),
        ({"vanishing_rel": -1.0}, ValueError, "vanishing_rel"),
        ({"vanishing_abs": math.inf}, ValueError, "vanishing_abs"),
        ({"rank": -1}, ValueError, "rank"),
        ({"max_events": 0}, ValueError, "max_events"),
        ({"sinks": ["run.txt"]}, ValueError, "run.txt"),
        ({"sinks": [42]}, TypeError, "42"),
    ],
)
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Monitor(["a"], **kwargs)


def test_names_validation():
    with pytest.raises(TypeError, match="names"):
        Monitor("weight")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"names\[1\]"):
        Monitor(["a", 3])  # type: ignore[list-item]


def test_meta_lists_the_options_of_every_detector():
    mon = Monitor(["a"], spike_factor=5, clip_rate_threshold=None, meta={"policy": "Fixed()"})
    assert mon.meta["detectors"] == {
        "spike_factor": 5.0, "spike_warmup": 20, "spike_beta": 0.98, "spike_cooldown": 50,
        "vanishing_rel": 1e-5, "vanishing_abs": 1e-10, "clip_rate_threshold": None,
        "update_spike_z": 4.0, "update_spike_factor": 3.0, "update_spike_beta": 0.9,
        "update_spike_warmup": 5, "min_interval_steps": 10, "host_nonfinite_events": False}
    import gradguard

    assert mon.meta["gradguard_version"] == gradguard.__version__
    assert mon.meta["policy"] == "Fixed()" and mon.policy == "fixed"


# --------------------------------------------------------------------------------------
# Sinks, emit, close
# --------------------------------------------------------------------------------------


def test_sinks_get_meta_records_and_events_in_order(tmp_path):
    seen: list[tuple[str, object]] = []
    names = ['attn."q"', "mlp\nfc", "ln<1>"]
    path = tmp_path / "run" / "log.jsonl"
    mon = Monitor(
        names,
        log_every=30,
        sinks=[str(path), lambda k, p: seen.append((k, p))],
        rank=2,
        meta={"clip": "auto"},
    )
    assert seen[0][0] == "meta" and seen[0][1]["names"] == names
    for step in range(60):
        per = torch.tensor([1.0, 2.0, NAN if step == 40 else 0.5])
        mon.observe(step, _fields(NAN if step == 40 else 2.3), per)
    mon.emit(Event(60, "lr_backoff", "lr x0.5", data={"factor": 0.5}))
    kinds = [k for k, _ in seen]
    assert kinds == ["meta", "record", "event", "record", "event"]
    assert seen[2][1].kind == "nonfinite" and seen[2][1].layers == ["ln<1>"]
    assert seen[4][1].rank == 2  # stamped with the monitor's rank
    mon.close()
    mon.close()  # idempotent
    with pytest.raises(RuntimeError):
        mon.observe(61, _fields(1.0), torch.ones(3))
    log = read_jsonl(path)
    assert log.meta["names"] == names and log.meta["clip"] == "auto"
    assert log.meta["fields"] == list(FIELDS)
    assert len(log.records) == 2 and all(
        _nan_equal(a, b) for a, b in zip(log.records, mon.records, strict=True)
    )
    assert _nan_equal([e.to_dict() for e in log.events], [e.to_dict() for e in mon.events])


def test_single_sink_spec_and_add_sink(tmp_path):
    buf = io.StringIO()
    from gradguard.log.sinks import ConsoleSink

    mon = Monitor(["a"], log_every=2, sinks=str(tmp_path / "x.csv"))
    assert len(mon.sinks) == 1
    mon.add_sink(ConsoleSink(buf))
    mon.emit(Event(3, "rollback", "restored step 0"))
    assert buf.getvalue() == "[gradguard] step 3 rollback: restored step 0\n"
    mon.close()
    assert (tmp_path / "x.events.csv").read_text().count("rollback") == 1


def test_close_flushes_pending_rows():
    seen: list[str] = []
    mon = Monitor(["a"], log_every=100, sinks=lambda k, p: seen.append(k))
    for step in range(5):
        mon.observe(step, _fields(1.0), torch.ones(1))
    assert not mon.closed
    mon.close()
    assert seen == ["meta", "record"] and mon.totals["steps"] == 5
    assert mon.closed


def test_emit_keeps_or_stamps_the_rank():
    mon = Monitor(["a"], rank=2)
    mon.emit(Event(1, "rollback", "r"))
    mon.emit(Event(2, "nonfinite", "n", rank=0), keep_rank=True)
    assert [e.rank for e in mon.events] == [2, 0]
    with pytest.raises(TypeError, match="Event"):
        mon.emit({"step": 1})  # type: ignore[arg-type]
