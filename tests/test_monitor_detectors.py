"""Tests of gradguard.monitor.detectors: spike, nonfinite, skip, vanishing, high_clip_rate,
the state each declares, and the one producer of "nonfinite"/"skip" events."""

from __future__ import annotations

import math

import pytest
import torch

from gradguard.monitor import Monitor
from gradguard.monitor.detectors import (
    ClipRate,
    Detector,
    NonFinite,
    Skip,
    Spike,
    Vanishing,
    describe_origin,
)
from gradguard.monitor.record import IntervalRows
from monitor_utils import Run
from monitor_utils import fields as _fields

NAN = math.nan


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
    from gradguard.policies import POLICIES, Fixed

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


# ----- state declared once --------------------------------------------------------------


def _rows(steps: range, run: Run, spike_at: int | None = None) -> IntervalRows:
    block = []
    for step in steps:
        per = run.norms(step) * (100.0 if step == spike_at else 1.0)
        f, p = run.pack(per, thr=1e-3)  # every step clipped
        block.append(torch.cat([f, p]).double())
    return IntervalRows(torch.stack(block), list(steps))


def _detectors(names: list[str]) -> list[Detector]:
    return [Spike(names), NonFinite(names), Skip(names), Vanishing(names), ClipRate(names)]


def test_detector_state_is_declared_once_and_round_trips():
    run = Run(seed=9)
    names = run.names
    used, fresh, reference = _detectors(names), _detectors(names), _detectors(names)
    for d, r in zip(used, reference, strict=True):
        for start in (1, 51):  # a spike at 120 comes in the third interval
            d.update(_rows(range(start, start + 50), Run(seed=start)))
            r.update(_rows(range(start, start + 50), Run(seed=start)))
    spike, clip_rate = used[0], used[4]
    assert spike.state_names == ("log_base", "n_base", "episode_start", "layer_base")
    assert spike.n_base == 100 and math.isfinite(spike.log_base)
    assert not torch.isnan(spike.layer_base).any()
    assert clip_rate.state_names == ("clip_rate_flagged",) and clip_rate.clip_rate_flagged
    assert used[3].state_names == ("vanishing",) and used[1].state_names == ()
    for d, f in zip(used, fresh, strict=True):
        saved = d.state_dict()
        assert set(saved) == set(d.state_names)
        f.load_state_dict(saved)
        for name in d.state_names:
            a, b = getattr(d, name), getattr(f, name)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    # The restored detectors go on exactly as the ones never saved.
    for f, r in zip(fresh, reference, strict=True):
        rows = _rows(range(101, 151), Run(seed=101), spike_at=120)
        assert [e.to_dict() for e in f.update(rows)] == [e.to_dict() for e in r.update(rows)]
    assert fresh[0].last_count == 1
    fresh[0].reset()
    assert fresh[0].log_base is None and fresh[0].n_base == 0
    assert torch.isnan(fresh[0].layer_base).all()


def test_add_state_refuses_a_name_twice():
    d = Detector(["a"])
    d.add_state("count", 0)
    with pytest.raises(ValueError, match="count"):
        d.add_state("count", 1)
    with pytest.raises(ValueError, match="names"):
        d.add_state("names", [])  # an attribute already


def test_monitor_state_dict_is_derived_from_its_detectors():
    mon = Monitor(["a", "b"], log_every=10)
    state = mon.state_dict()
    declared = [n for d in mon.detectors.values() for n in d.state_names]
    assert declared == ["log_base", "n_base", "episode_start", "layer_base", "vanishing",
                        "clip_rate_flagged", "optim_log_mean", "optim_log_var",
                        "optim_samples", "optim_flagged"]
    assert list(state) == ["version", "names", "totals", "event_counts", *declared,
                           "pending_steps", "pending"]
    assert list(mon.detectors) == ["spike", "nonfinite", "skip", "vanishing",
                                   "high_clip_rate", "update_spike"]


def test_detector_options_are_validated_by_the_detectors():
    with pytest.raises(ValueError, match="spike_factor"):
        Spike(["a"], factor=math.inf)
    with pytest.raises(TypeError, match="spike_warmup"):
        Spike(["a"], warmup=2.5)
    with pytest.raises(ValueError, match="vanishing_rel"):
        Vanishing(["a"], rel=0.0)
    with pytest.raises(ValueError, match="clip_rate_threshold"):
        ClipRate(["a"], threshold=0.0)


# ----- one producer of "nonfinite" and "skip" events ------------------------------------


def test_note_step_reports_at_once_and_the_interval_leaves_noted_steps_out():
    seen = []
    mon = Monitor(["a", "b", "c"], log_every=4, host_nonfinite_events=True,
                  sinks=lambda kind, payload: seen.append((kind, payload)))
    mon.observe(1, _fields(1.0), torch.ones(3))
    mon.observe(2, _fields(NAN, nonfinite=1, skipped=1), torch.tensor([1.0, NAN, NAN]))
    event = mon.note_step(2, "nonfinite", layers=["b", "c"])
    assert seen[-1] == ("event", event) and list(mon.events) == [event]
    assert (event.step, event.kind, event.layers, event.data, event.rank) == (
        2, "nonfinite", ["b", "c"], {"n_layers": 2}, 0)
    assert event.message == "non-finite gradient in b, c; step skipped"
    mon.observe(3, _fields(NAN, skipped=1), torch.zeros(3))
    skip = mon.note_step(3, "skip", reason="rollback")
    assert (skip.message, skip.data) == ("step skipped (rollback)", {"reason": "rollback"})
    interval = mon.observe(4, _fields(1.0), torch.ones(3))
    assert interval is not None and interval.events == []  # one event per step, no second
    assert interval.record["nonfinite"] == 1 and interval.record["skipped"] == 2
    assert [e.kind for e in mon.events] == ["nonfinite", "skip"]
    assert mon.event_counts == {"nonfinite": 1, "skip": 1}
    with pytest.raises(ValueError, match="reason"):
        mon.note_step(5, "skip")
    with pytest.raises(ValueError, match="kind"):
        mon.note_step(5, "spike")


def test_note_step_names_the_origin_rank_and_limits_the_layers():
    mon = Monitor([f"l{i}" for i in range(8)], rank=1, max_layers=5)
    origin = {"first_rank": 3, "evidence": "loss", "loss_ranks": [3], "gradient_ranks": [],
              "local_ranks": [0, 1, 2, 3], "world_size": 4}
    event = mon.note_step(7, "nonfinite", layers=mon.names, origin=origin)
    assert event.rank == 3 and event.layers == mon.names[:5]
    assert event.data == {"n_layers": 8, **origin}
    assert event.message == (
        "non-finite gradient in l0, l1, l2, l3, l4 and more; step skipped; first seen on "
        "rank 3 (its loss was non-finite); every one of the 4 ranks took the same decision")
    nobody = {**origin, "first_rank": None, "evidence": "unknown"}
    assert mon.note_step(8, "nonfinite", origin=nobody).rank == 1  # the monitor's rank
    assert describe_origin(nobody) == "skipped on all 4 ranks"
    assert mon.note_step(9, "skip", reason="rollback").rank == 1


def test_without_host_notes_the_interval_reports_nonfinite_and_skips():
    mon = Monitor(["a"], log_every=3)
    mon.observe(1, _fields(NAN, nonfinite=1, skipped=1), torch.tensor([NAN]))
    mon.observe(2, _fields(NAN, skipped=1), torch.zeros(1))
    interval = mon.observe(3, _fields(1.0), torch.ones(1))
    assert [(e.kind, e.step, e.data["count"]) for e in interval.events] == [
        ("nonfinite", 1, 1), ("skip", 1, 2)]


@pytest.mark.parametrize("nonfinite", ["skip", "zero"])
def test_guard_nonfinite_events_come_from_the_monitor_detectors(nonfinite):
    import gradguard as gg

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    guard = gg.Guard(model, clip=1.0, nonfinite=nonfinite, log_every=4, sinks=[])
    for step in range(4):
        model.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        if step == 1:
            model[0].weight.grad[0, 0] = math.nan
        guard.step()
    events = [e for e in guard.events if e.kind in ("nonfinite", "skip")]
    if nonfinite == "skip":  # noted by the host at once, not again at the flush
        expected = Monitor(guard.names).note_step(2, "nonfinite", layers=["0.weight"])
        assert [e.to_dict() for e in events] == [expected.to_dict()]
    else:  # repaired on the device: reported by the interval detector
        (event,) = events
        assert event.kind == "nonfinite" and event.step == 2 and event.data["count"] == 1
