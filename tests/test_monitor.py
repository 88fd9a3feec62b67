"""Tests of gradguard.monitor: the ring buffer, interval records, detectors and state."""

from __future__ import annotations

import io
import math
import tracemalloc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gradguard.events import Event, read_jsonl
from gradguard.monitor import FIELDS, RECORD_KEYS, Monitor

NAN = math.nan


def _fields(
    pre: float,
    post: float | None = None,
    thr: float = math.inf,
    coef: float = 1.0,
    clipped: float = 0.0,
    nonfinite: float = 0.0,
    skipped: float = 0.0,
    loss: float = NAN,
    device: str | None = None,
) -> torch.Tensor:
    post = pre if post is None else post
    vals = [pre, post, thr, coef, clipped, nonfinite, skipped, loss]
    return torch.tensor(vals, dtype=torch.float32, device=device)


class Run:
    """A synthetic training run: per-layer norms with log-normal noise around a drifting
    baseline, a fixed clip threshold, and hooks to inject trouble at chosen steps."""

    def __init__(
        self,
        n_layers: int = 24,
        sigma: float = 0.3,
        seed: int = 0,
        zero_layers: tuple[int, ...] = (),
    ) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.n = n_layers
        # Layer scales over three orders of magnitude, like weights vs biases vs norms.
        self.scale = torch.logspace(-3, 0, n_layers, dtype=torch.float64)
        self.scale = self.scale[torch.randperm(n_layers, generator=self.gen)]
        self.sigma = sigma
        self.zero = list(zero_layers)
        self.names = [f"block.{i}.weight" for i in range(n_layers)]

    def norms(self, step: int) -> torch.Tensor:
        drift = 3.0 * math.exp(-step / 700) + 0.5 + 0.2 * math.sin(step / 90)
        noise = torch.exp(self.sigma * torch.randn(self.n, generator=self.gen, dtype=torch.float64))
        per = self.scale * drift * noise
        per[self.zero] = 0.0  # parameters without a gradient: the Guard writes 0
        return per

    @staticmethod
    def pack(
        per: torch.Tensor,
        thr: float = 20.0,
        loss: float = NAN,
        nonfinite: bool = False,
        skipped: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pre = float(per.square().sum().sqrt())
        coef = min(1.0, thr / pre) if math.isfinite(pre) else 1.0
        clipped = math.isfinite(pre) and pre > thr
        nonf = nonfinite or not math.isfinite(pre)
        f = _fields(pre, pre * coef, thr, coef, float(clipped), float(nonf), float(skipped), loss)
        return f, per.float()


def _strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _nan_equal(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_nan_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    return a == b


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


def test_record_numbers_exact():
    mon = Monitor(["a", "b", "c"], log_every=4)
    rows = [
        (_fields(3.0, 2.0, 2.0, 2 / 3, 1, 0, 0, 5.0), [1.0, 0.0, 2.0]),
        (_fields(1.0, 1.0, 2.0, 1.0, 0, 0, 0, NAN), [0.5, 0.0, 0.25]),
        (_fields(NAN, NAN, 2.0, NAN, 0, 1, 1, NAN), [NAN, 0.0, 1.0]),
        (_fields(2.0, 2.0, 2.5, 1.0, 0, 0, 0, 4.0), [1.5, 0.0, 4.0]),
    ]
    for i, (f, p) in enumerate(rows):
        mon.observe(10 + i, f, torch.tensor(p))
    assert mon.pending == 0 and len(mon.records) == 1
    r = mon.records[-1]
    assert list(r) == list(RECORD_KEYS)
    assert (r["step_first"], r["step_last"], r["n_steps"]) == (10, 13, 4)
    assert r["pre_norm_min"] == 1.0 and r["pre_norm_max"] == 3.0
    assert r["pre_norm_max_step"] == 10
    assert r["pre_norm_mean"] == pytest.approx(2.0)
    assert r["pre_norm_last"] == 2.0
    assert r["post_norm_mean"] == pytest.approx(5 / 3) and r["post_norm_max"] == 2.0
    assert r["threshold_last"] == 2.5
    assert r["coef_min"] == pytest.approx(2 / 3)
    assert (r["clipped"], r["nonfinite"], r["skipped"]) == (1, 1, 1)
    assert r["clip_rate"] == pytest.approx(1 / 3)
    assert r["loss_mean"] == pytest.approx(4.5) and r["loss_last"] == 4.0
    # Per layer: finite, non-zero values only; "b" never had a gradient.
    assert r["layer_norm_mean"][0] == pytest.approx(1.0)
    assert math.isnan(r["layer_norm_mean"][1]) and math.isnan(r["layer_norm_max"][1])
    assert r["layer_norm_mean"][2] == pytest.approx((2 + 0.25 + 1 + 4) / 4)
    assert r["layer_norm_max"] == [1.5, NAN, 4.0] or r["layer_norm_max"][2] == 4.0
    assert r["layer_nonfinite"] == [1, 0, 0]
    assert r["top_layer"] == "c" and r["top_layer_norm"] == 4.0
    assert mon.totals == {
        "steps": 4,
        "clipped": 1,
        "nonfinite": 1,
        "skipped": 1,
        "spikes": 0,
        "flushes": 1,
    }


def test_unknown_loss_and_all_nonfinite_interval():
    mon = Monitor(["a"], log_every=2)
    mon.observe(1, _fields(NAN, nonfinite=1), torch.tensor([NAN]))
    mon.observe(2, _fields(math.inf, nonfinite=1), torch.tensor([math.inf]))
    r = mon.records[-1]
    assert math.isnan(r["loss_mean"]) and math.isnan(r["loss_last"])
    assert math.isnan(r["pre_norm_max"]) and r["pre_norm_max_step"] is None
    assert math.isnan(r["clip_rate"]) and r["top_layer"] is None
    assert r["nonfinite"] == 2


def test_flush_without_rows_is_a_noop():
    mon = Monitor(["a"], log_every=5)
    assert mon.flush() == [] and len(mon.records) == 0
    mon.observe(1, _fields(1.0), torch.ones(1))
    assert mon.pending == 1
    mon.flush()
    assert mon.pending == 0 and mon.records[-1]["n_steps"] == 1
    assert mon.flush() == [] and len(mon.records) == 1


# --------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------


def test_spike_between_log_steps_is_in_record_and_event():
    run = Run()
    mon = Monitor(run.names, log_every=100)
    culprit = 7
    for step in range(1, 301):
        per = run.norms(step)
        if step == 157:
            per[culprit] *= 5000.0
        mon.observe(step, *run.pack(per))
    rec = mon.records[1]
    assert (rec["step_first"], rec["step_last"]) == (101, 200)
    assert rec["pre_norm_max_step"] == 157
    assert rec["pre_norm_max"] > 10 * rec["pre_norm_mean"] / 2
    assert rec["pre_norm_last"] < rec["pre_norm_max"] / 10
    assert rec["spikes"] == 1 and rec["clipped"] >= 1
    assert rec["layer_norm_max"][culprit] == max(
        x for x in rec["layer_norm_max"] if not math.isnan(x)
    )
    assert rec["top_layer"] == run.names[culprit]
    spikes = [e for e in mon.events if e.kind == "spike"]
    assert len(spikes) == 1
    ev = spikes[0]
    assert ev.step == 157 and ev.layers[0] == run.names[culprit]
    assert ev.data["ratio"] > 10 and ev.data["clipped"] is True
    assert "157" in ev.message and run.names[culprit] in ev.message
    assert mon.totals["spikes"] == 1
    assert [e.kind for e in mon.events] == ["spike"]  # nothing else fired


def test_spike_episode_gives_one_event_and_exact_count():
    run = Run(seed=1)
    mon = Monitor(run.names, log_every=50)
    for step in range(1, 201):
        per = run.norms(step)
        # 120-125: one episode; 165 is within the 50-step cooldown after its onset (and
        # in the next interval): same episode, no new event, but counted.
        if step in (120, 121, 125, 165):
            per *= 100.0
        mon.observe(step, *run.pack(per))
    spikes = [e for e in mon.events if e.kind == "spike"]
    assert [e.step for e in spikes] == [120]
    assert spikes[0].data["n_spike_steps"] == 3
    assert sum(r["spikes"] for r in mon.records) == 4 == mon.totals["spikes"]
    # A spike after the cooldown opens a new episode.
    for step in range(201, 301):
        per = run.norms(step)
        if step == 260:
            per *= 100.0
        mon.observe(step, *run.pack(per))
    assert [e.step for e in mon.events if e.kind == "spike"] == [120, 260]


def test_no_spike_during_warmup_and_level_shift_is_absorbed():
    run = Run(seed=2)
    mon = Monitor(run.names, log_every=100, spike_warmup=20)
    for step in range(1, 601):
        per = run.norms(step)
        if step == 5:
            per *= 1000.0  # during warm-up: not judged
        if step > 300:
            per *= 30.0  # lasting level shift: one event, then the baseline catches up
        mon.observe(step, *run.pack(per))
    assert [e.step for e in mon.events if e.kind == "spike"] == [301]
    assert mon.records[-1]["spikes"] == 0


def test_nonfinite_event_names_first_layers_in_model_order():
    run = Run(seed=3)
    mon = Monitor(run.names, log_every=50, max_layers=3)
    for step in range(1, 101):
        per = run.norms(step)
        if step == 73:
            per[[11, 2, 19, 7]] = torch.tensor([NAN, math.inf, NAN, -math.inf], dtype=torch.float64)
        if step == 90:
            per[0] = NAN
        mon.observe(step, *run.pack(per, skipped=step in (73, 90)))
    nf = [e for e in mon.events if e.kind == "nonfinite"]
    assert len(nf) == 1
    ev = nf[0]
    assert ev.step == 73
    assert ev.layers == [run.names[2], run.names[7], run.names[11]]
    assert ev.data["count"] == 2 and ev.data["steps"] == [73, 90]
    assert ev.data["n_layers_nonfinite"] == 4
    skip = [e for e in mon.events if e.kind == "skip"]
    assert len(skip) == 1 and skip[0].step == 73 and skip[0].data["count"] == 2
    rec = mon.records[1]
    assert rec["nonfinite"] == 2 and rec["skipped"] == 2
    assert rec["layer_nonfinite"][2] == 1 and rec["layer_nonfinite"][0] == 1
    assert not any(e.kind == "spike" for e in mon.events)  # NaN is not a spike
    # The baseline was not poisoned: a later spike is still found.
    for step in range(101, 151):
        per = run.norms(step) * (100.0 if step == 120 else 1.0)
        mon.observe(step, *run.pack(per))
    assert [e.step for e in mon.events if e.kind == "spike"] == [120]


def test_nonfinite_flag_without_nonfinite_layers():
    mon = Monitor(["a", "b"], log_every=2)
    mon.observe(1, _fields(1.0), torch.ones(2))
    mon.observe(2, _fields(1.0, nonfinite=1.0), torch.ones(2))  # e.g. a NaN loss
    ev = [e for e in mon.events if e.kind == "nonfinite"]
    assert len(ev) == 1 and ev[0].step == 2 and ev[0].layers == []


def test_host_nonfinite_events_are_not_duplicated():
    mon = Monitor(["a", "b"], log_every=10, host_nonfinite_events=True)
    for step in range(10):
        bad = step == 4
        per = torch.tensor([NAN if bad else 1.0, 1.0])
        mon.observe(step, _fields(NAN if bad else 1.4, nonfinite=bad, skipped=bad), per)
    assert not [e for e in mon.events if e.kind in ("nonfinite", "skip")]
    assert mon.totals["nonfinite"] == 1 and mon.totals["skipped"] == 1


def test_vanishing_layers_fire_once_and_ignore_missing_grads():
    run = Run(seed=4, zero_layers=(5,))
    mon = Monitor(run.names, log_every=50)
    dead = [3, 17]
    for step in range(1, 201):
        per = run.norms(step)
        if step > 50:
            per[dead] *= 1e-8
        if step > 150:
            per[17] = run.norms(step)[17]  # recovers
        mon.observe(step, *run.pack(per))
    van = [e for e in mon.events if e.kind == "vanishing"]
    assert len(van) == 1  # not repeated at 150 and 200 while still vanishing
    assert van[0].step == 100 and van[0].layers == [run.names[3], run.names[17]]
    assert run.names[5] not in van[0].layers
    # 17 recovered, then vanishes again: a new event for it alone.
    for step in range(201, 301):
        per = run.norms(step)
        per[dead] *= 1e-8
        mon.observe(step, *run.pack(per))
    van = [e for e in mon.events if e.kind == "vanishing"]
    assert [e.layers for e in van] == [[run.names[3], run.names[17]], [run.names[17]]]


def test_all_layers_tiny_is_not_vanishing():
    mon = Monitor([f"l{i}" for i in range(4)], log_every=20)
    for step in range(40):
        mon.observe(step, _fields(2e-12), torch.full((4,), 1e-12))
    assert not mon.events


def test_high_clip_rate_fires_on_crossing_with_hysteresis():
    run = Run(seed=5)
    mon = Monitor(run.names, log_every=50)
    for step in range(1, 401):
        per = run.norms(step)
        tight = 100 < step <= 200 or step > 300
        thr = 1e-3 if tight else 1e3
        mon.observe(step, *run.pack(per, thr=thr))
    hc = [e for e in mon.events if e.kind == "high_clip_rate"]
    assert [e.step for e in hc] == [150, 350]
    assert hc[0].data["clip_rate"] == 1.0 and "learning rate" in hc[0].message
    assert [r["clip_rate"] for r in mon.records] == [0, 0, 1, 1, 0, 0, 1, 1]
    off = Monitor(run.names, log_every=50, clip_rate_threshold=None)
    for step in range(1, 101):
        off.observe(step, *run.pack(run.norms(step), thr=1e-3))
    assert not off.events


def test_small_explicit_flush_does_not_judge_intervals():
    mon = Monitor(["a", "b"], log_every=100)
    for step in range(3):
        mon.observe(step, _fields(5.0, 1.0, 1.0, 0.2, clipped=1), torch.tensor([5.0, 1e-20]))
    assert mon.flush() == []


def test_healthy_run_has_no_events():
    run = Run(n_layers=40, sigma=0.35, seed=6, zero_layers=(0, 13))
    mon = Monitor(run.names, log_every=100)
    losses = torch.linspace(5, 2, 2000)
    for step in range(2000):
        per = run.norms(step)
        mon.observe(step, *run.pack(per, thr=20.0, loss=float(losses[step])))
    mon.flush()
    assert list(mon.events) == [], [e.format() for e in mon.events]
    assert mon.totals["steps"] == 2000 and len(mon.records) == 20
    assert mon.records[-1]["loss_last"] == pytest.approx(2.0)


# --------------------------------------------------------------------------------------
# Counters, state, memory
# --------------------------------------------------------------------------------------


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


def test_load_state_dict_rejects_other_names():
    a = Monitor(["x", "y"])
    b = Monitor(["x", "z"])
    with pytest.raises(ValueError, match="other parameters"):
        b.load_state_dict(a.state_dict())


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
    assert mon.pending == 0 and mon._buf is not None
    assert mon._buf.shape == (50, len(FIELDS) + 8)  # the buffer never grows


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
        assert mon.pending == 15 and mon._buf is not None
        assert mon._buf.device.type == "cuda"
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
    from gradguard.events import ConsoleSink

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
    mon.close()
    assert seen == ["meta", "record"] and mon.totals["steps"] == 5


# ----- high_clip_rate advice: it must fit the policy it speaks about ---------------------

_POLICY_REPRS = {  # what the Guard writes in meta["policy"] (repr of the policy)
    "fixed": "Fixed(max_norm=1.0)",
    "auto": "Auto(rho=0.002, spike_factor=5.0, beta=0.98, warmup_steps=20, "
            "param_norm_every=100)",
    "zclip": "ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=None)",
    "autoclip": "AutoClip(percentile=10.0, window=1000)",
    "adagc": "AdaGC(rel=1.05, beta=0.98, warmup_steps=100, max_norm=1.0)",
    "agc": "AGC(clipping=0.01, eps=0.001)",
}


def _clip_rate_message(**kwargs) -> str:
    mon = Monitor(["a", "b"], log_every=20, **kwargs)
    for step in range(20):
        mon.observe(step, _fields(5.0, 1.0, 1.0, 0.2, clipped=1), torch.tensor([4.0, 3.0]))
    (event,) = [e for e in mon.events if e.kind == "high_clip_rate"]
    assert event.data["policy"] == mon.policy
    return event.message


@pytest.mark.parametrize("name", sorted(_POLICY_REPRS))
def test_high_clip_rate_advice_fits_the_policy(name):
    from gradguard.monitor import CLIP_RATE_ADVICE
    from gradguard.thresholds import POLICIES, Fixed

    message = _clip_rate_message(meta={"policy": _POLICY_REPRS[name]})
    assert message.startswith("100% of steps 0-19 were clipped (alarm above 50%; last clip "
                              "threshold 1)")
    assert message.endswith(CLIP_RATE_ADVICE[name])
    policy = Fixed(1.0) if name == "fixed" else POLICIES[name]()
    assert _clip_rate_message(policy=policy) == message  # the object itself, or its name
    assert _clip_rate_message(policy=name) == message
    if name == "fixed":
        assert "raise the threshold" in message and "clip='auto'" in message
    else:  # an adaptive policy: never "use an adaptive one"
        assert "adaptive" not in message and "raise the threshold" not in message
    expected = {"auto": "trust cap", "autoclip": "by design", "adagc": "any tensor",
                "agc": "any unit", "zclip": "rising faster", "fixed": "too tight"}[name]
    assert expected in message


def test_high_clip_rate_advice_without_a_known_policy():
    from gradguard.monitor import CLIP_RATE_ADVICE, policy_name

    generic = CLIP_RATE_ADVICE[None]
    assert _clip_rate_message().endswith(generic)
    assert _clip_rate_message(meta={"policy": "MyPolicy(x=1)"}).endswith(generic)
    assert policy_name("fixed:0.5") == "fixed" and policy_name(" Auto()") == "auto"
    assert policy_name(None) is None and policy_name(3) is None and policy_name("") is None


@pytest.mark.parametrize("clip, expected", [("auto", "trust cap"), (1e-6, "too tight")])
def test_guard_events_advise_for_their_own_policy(clip, expected):
    import gradguard as gg

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    # lr 1 with momentum 0.9: auto's trust cap (rho |theta| / 10) binds on every step
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    guard = gg.Guard(model, clip=clip, log_every=10)
    guard.attach(opt)
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(32, 16)).square().mean().backward()
        opt.step()
    (event,) = [e for e in guard.events if e.kind == "high_clip_rate"]
    assert expected in event.message
    assert "adaptive" not in event.message or clip != "auto"
    guard.close()
