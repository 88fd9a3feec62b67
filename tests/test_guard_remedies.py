"""gradguard.guard.remedies through the Guard: LR backoff and its recovery, rollback (and
the batches skipped after it), abort, closing; plus the ladder alone as a decision function."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard as gg
from gradguard.guard.remedies import (
    Action,
    LRBackoff,
    Remedies,
    RemedyContext,
    Rollback,
    StepOutcome,
    TrainingDiverged,
)
from gradguard.log.events import Event
from gradguard.log.readback import read_jsonl
from gradguard.monitor.record import Interval
from guard_utils import (
    loss_of,
    mlp,
    train,
)


def test_lr_backoff_after_consecutive_skips_then_restore():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    remedies = Remedies(skip_budget=2, lr_backoff=LRBackoff(factor=0.5, recovery_steps=10))
    guard = gg.Guard(model, clip=None, sinks=[], remedies=remedies).attach(opt)
    for i in range(2):
        opt.zero_grad()
        loss_of(model, i).backward()
        model[0].bias.grad[0] = float("nan")
        opt.step()
    assert remedies.lr_factor == 0.5
    assert [e.kind for e in guard.events][-1] == "lr_backoff"
    # the next step updates with half the learning rate; the scheduler's value is untouched
    opt.zero_grad()
    loss_of(model, 5).backward()
    w0, g = model[4].bias.detach().clone(), model[4].bias.grad.clone()
    opt.step()
    sched.step()
    torch.testing.assert_close(model[4].bias.detach(), w0 - 0.1 * 0.5 * g)
    assert opt.param_groups[0]["lr"] == 0.1
    for i in range(12):
        opt.zero_grad()
        loss_of(model, 10 + i).backward()
        opt.step()
    assert remedies.lr_factor == 1.0
    assert "lr_restore" in [e.kind for e in guard.events]


def test_rollback_restores_snapshot_and_skips_batches():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(skip_batches=2, loss_factor=3.0))
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5, remedies=remedies).attach(opt)
    for i in range(10):  # two clean intervals: a snapshot at step 10, before its update
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        guard.observe_loss(loss)
        if i == 9:
            snap = [p.detach().clone() for p in model.parameters()]
        opt.step()
    for i in range(10, 15):  # the loss jumps 100x
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        guard.observe_loss(loss * 100)
        opt.step()
    assert any(e.kind == "rollback" for e in guard.events)
    assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters(), strict=True))
    for i in range(15, 17):  # skipped batches
        opt.zero_grad()
        loss_of(model, i).backward()
        assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters(), strict=True))
    assert guard.stats()["skipped"] == 3  # the rollback step's own update, then 2 batches


def test_abort_when_the_ladder_is_exhausted():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(skip_budget=2, lr_backoff=LRBackoff(max_times=1), rollback=None)
    guard = gg.Guard(model, sinks=[], remedies=remedies).attach(opt)
    with pytest.raises(TrainingDiverged, match="learning rate 10x lower"):
        for i in range(10):
            opt.zero_grad()
            loss_of(model, i).backward()
            model[0].weight.grad.fill_(float("nan"))
            opt.step()
    kinds = [e.kind for e in guard.events]
    assert kinds.count("lr_backoff") == 1 and kinds[-1] == "abort"


def test_rollback_keeps_the_schedulers_learning_rate():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(loss_factor=3.0))
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5, remedies=remedies).attach(opt)
    for i in range(15):
        train(model, opt, guard, 1, start=i, loss_scale=lambda i: 100.0 if i >= 10 else 1.0)
        sched.step()
    assert [e.kind for e in guard.events].count("rollback") == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.9**15)


def test_rollback_after_skips_does_not_drop_the_next_clean_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = gg.ZClip(warmup_steps=2)
    remedies = Remedies(skip_budget=1, lr_backoff=None,
                        rollback=Rollback(skip_batches=0, loss_factor=None))
    guard = gg.Guard(model, clip=policy, sinks=[], log_every=2, remedies=remedies).attach(opt)
    train(model, opt, guard, 4)  # two clean intervals: a snapshot
    opt.zero_grad()
    loss_of(model, 4).backward()
    model[0].bias.grad[0] = float("nan")
    opt.step()  # skipped, escalates to a rollback
    assert [e.kind for e in guard.events][-1] == "rollback"
    before = [p.detach().clone() for p in model.parameters()]
    count = int(policy.count)
    train(model, opt, guard, 1, start=5)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert int(policy.count) == count + 1
    assert guard.stats()["skipped"] == 1


def test_batches_skipped_after_a_rollback_are_not_counted_non_finite():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(skip_batches=3, loss_factor=3.0))
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5, nonfinite="zero",
                     remedies=remedies).attach(opt)
    train(model, opt, guard, 25, loss_scale=lambda i: 100.0 if 10 <= i < 15 else 1.0)
    guard.flush()
    assert sum(r["nonfinite"] for r in guard.monitor.records) == 0
    assert "nonfinite" not in [e.kind for e in guard.events]
    assert guard.stats()["nonfinite"] == 0


def test_a_non_finite_loss_rolls_back():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(loss_factor=3.0))
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5, remedies=remedies).attach(opt)
    train(model, opt, guard, 10)
    snapshot_step = remedies.snapshot_step
    train(model, opt, guard, 5, start=10, loss_scale=lambda i: math.inf)
    rollbacks = [e for e in guard.events if e.kind == "rollback"]
    assert len(rollbacks) == 1 and "non-finite loss" in rollbacks[0].message
    assert remedies.snapshot_step == snapshot_step
    assert guard.monitor.records[-1]["loss_nonfinite"] == 5
    guard.observe_loss(torch.tensor(math.nan))  # an observed NaN is not "no loss"
    assert math.isinf(guard.pending_loss.item())


def test_close_neither_rolls_back_nor_raises_and_closes_the_sinks(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(loss_factor=3.0, max_times=0))
    log = tmp_path / "run.jsonl"
    guard = gg.Guard(model, clip=1.0, sinks=[str(log)], log_every=5,
                     remedies=remedies).attach(opt)
    train(model, opt, guard, 12, loss_scale=lambda i: 100.0 if i >= 10 else 1.0)
    trained = [p.detach().clone() for p in model.parameters()]
    guard.close()  # the last partial interval has the loss jump
    assert all(torch.equal(a, b) for a, b in zip(trained, model.parameters(), strict=True))
    assert guard.monitor.closed and guard.optimizers == []
    run = read_jsonl(log)
    assert run.records[-1]["step_last"] == 12 and "rollback" not in [e.kind for e in run.events]


def test_an_abort_from_a_flush_still_logs_the_interval(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(lr_backoff=LRBackoff(spikes=1, max_times=0))
    log = tmp_path / "run.jsonl"
    guard = gg.Guard(model, clip=None, sinks=[str(log)], log_every=25,
                     remedies=remedies).attach(opt)
    with pytest.raises(TrainingDiverged):
        for i in range(25):
            opt.zero_grad()
            loss_of(model, i).backward()
            if i == 24:
                for p in model.parameters():
                    p.grad.mul_(1e4)
            opt.step()
    run = read_jsonl(log)
    assert len(run.records) == 1 and len(guard.monitor.records) == 1
    assert "abort" in [e.kind for e in run.events]


def test_rollback_without_a_known_optimizer_warns():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5,
                     remedies=Remedies(rollback=Rollback()))
    with pytest.warns(UserWarning, match="no optimizer state"):
        for i in range(5):
            opt.zero_grad()
            loss_of(model, i).backward()
            guard.step()
            opt.step()


# ----- the ladder alone: a decision function ----------------------------------------------------

def _record(first: int, last: int, loss: float, **counts) -> dict:
    return {"step_first": first, "step_last": last, "loss_mean": loss,
            "loss_nonfinite": counts.get("loss_nonfinite", 0),
            "nonfinite": counts.get("nonfinite", 0), "spikes": counts.get("spikes", 0)}


def _ladder(**kw) -> Remedies:
    remedies = Remedies(**kw)
    remedies.bind(RemedyContext(stats=lambda: {"nonfinite": 7, "skipped": 5}))
    return remedies


def test_skips_escalate_to_a_backoff_that_recovers_geometrically():
    remedies = _ladder(skip_budget=2, lr_backoff=LRBackoff(factor=0.5, recovery_steps=2))
    assert remedies.on_step(StepOutcome(1, "nonfinite")) == Action()
    action = remedies.on_step(StepOutcome(2, "nonfinite"))
    assert action.lr_factor == 0.5 and [e.kind for e in action.events] == ["lr_backoff"]
    assert remedies.on_step(StepOutcome(3)).lr_factor == 0.5  # the full cut, once
    assert remedies.on_step(StepOutcome(4)).lr_factor == pytest.approx(0.5 * math.sqrt(2))
    action = remedies.on_step(StepOutcome(5))
    assert action.lr_factor == 1.0 and [e.kind for e in action.events] == ["lr_restore"]


def test_intervals_snapshot_when_clean_and_roll_back_on_a_loss_jump():
    remedies = _ladder(lr_backoff=None, rollback=Rollback(skip_batches=4, loss_factor=3.0,
                                                         max_times=1))
    clean = remedies.on_interval(Interval(_record(1, 5, 1.0), []))
    assert clean.snapshot and not clean.restore and remedies.snapshot_step == 5
    jump = remedies.on_interval(Interval(_record(6, 10, 3.5), []))
    assert jump.restore and jump.skip_next == 4 and not jump.snapshot
    assert [e.kind for e in jump.events] == ["rollback"] and jump.abort is None
    assert remedies.snapshot_step == 5 and remedies.rollbacks == 1
    again = remedies.on_interval(Interval(_record(11, 15, math.nan, loss_nonfinite=2), []))
    assert not again.restore and [e.kind for e in again.events] == ["abort"]
    assert "training diverged at step 15" in again.abort and "7 steps had non-finite" in again.abort


def test_spikes_in_intervals_escalate_and_dirty_intervals_take_no_snapshot():
    remedies = _ladder(lr_backoff=LRBackoff(spikes=2, window=100), rollback=Rollback())
    spike = Event(step=3, kind="spike", message="spike")
    action = remedies.on_interval(Interval(_record(1, 5, 1.0, spikes=1), [spike]))
    assert not action.snapshot and action.events == []
    action = remedies.on_interval(Interval(_record(6, 10, 1.0, spikes=1),
                                           [Event(step=8, kind="spike", message="spike")]))
    assert [e.kind for e in action.events] == ["lr_backoff"] and action.lr_factor == 0.5
    assert remedies.snapshot_step is None


def test_a_dropped_step_neither_recovers_nor_counts_a_skip_and_state_round_trips():
    remedies = _ladder(skip_budget=3, lr_backoff=LRBackoff(recovery_steps=1))
    remedies.on_step(StepOutcome(1, "nonfinite"))
    remedies.on_step(StepOutcome(2, "dropped"))  # resets the run of skips
    remedies.on_step(StepOutcome(3, "nonfinite"))
    assert remedies.on_step(StepOutcome(4, "nonfinite")).events == []  # 2 in a row, not 3
    saved = remedies.state_dict()
    fresh = _ladder(skip_budget=3, lr_backoff=LRBackoff(recovery_steps=1))
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved
    assert [e.kind for e in fresh.on_step(StepOutcome(5, "nonfinite")).events] == ["lr_backoff"]


def test_remedies_belong_to_one_guard_and_rungs_need_a_monitor():
    remedies = _ladder()
    with pytest.raises(ValueError, match="another Guard"):
        remedies.bind(RemedyContext(stats=dict))
    with pytest.raises(ValueError, match="monitor"):
        Remedies().bind(RemedyContext(stats=dict, monitored=False))
    with pytest.raises(ValueError, match="monitor"):
        gg.Guard(mlp(), sinks=[], monitor=False, remedies=Remedies())
