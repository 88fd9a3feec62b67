"""gradguard.guard.guard: the Guard's wiring: attach/detach, explicit steps, GradScaler,
accumulation, param groups, several optimizers, LR schedulers, the log, bitwise resume,
argument validation."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.guard.remedies import LRBackoff, Remedies
from gradguard.log.readback import read_jsonl
from guard_utils import (
    POLICIES,
    loss_of,
    mlp,
    small_warmups,
    train,
)


def test_explicit_step_equals_attached():
    a, b = mlp(), mlp()
    opt_a = torch.optim.Adam(a.parameters(), 1e-2)
    opt_b = torch.optim.Adam(b.parameters(), 1e-2)
    gg.Guard(a, clip="zclip", sinks=[]).attach(opt_a)
    guard_b = gg.Guard(b, clip="zclip", sinks=[])
    for i in range(40):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss_of(model, i, scale=3).backward()
        opt_a.step()
        if guard_b.step():
            opt_b.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_gradscaler_step_sees_unscaled_gradients_and_overflow_is_not_observed():
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=0.5, sinks=[]).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    loss_of(ref, 0).backward()
    true_norm = gg.get_total_norm([p.grad for p in ref.parameters()]).item()
    scaler.scale(loss_of(model, 0)).backward()
    scaler.step(opt)
    scaler.update()
    assert guard.last["pre_norm"].item() == pytest.approx(true_norm, rel=1e-5)
    # an overflow step: the scaler skips it, the Guard never sees it
    opt.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert guard.stats() == {"steps": 1, "clipped": 1, "nonfinite": 0, "skipped": 0}


def test_gradscaler_with_explicit_unscale_and_manual_step():
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    guard = gg.Guard(model, clip=0.5, scaler=scaler, sinks=[])
    loss_of(ref, 0).backward()
    true_norm = gg.get_total_norm([p.grad for p in ref.parameters()]).item()
    scaler.scale(loss_of(model, 0)).backward()
    scaler.unscale_(opt)
    assert guard.step()
    scaler.step(opt)
    scaler.update()
    assert guard.last["pre_norm"].item() == pytest.approx(true_norm, rel=1e-5)
    opt.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    model[2].bias.grad[0] = float("inf")
    scaler.unscale_(opt)
    assert guard.step() is False  # the scaler's overflow: skipped, not an observation
    scaler.step(opt)
    scaler.update()
    assert guard.stats()["nonfinite"] == 0 and guard.stats()["steps"] == 1
    assert not [e for e in guard.events if e.kind == "nonfinite"]


def test_fused_optimizer_under_gradscaler_unscales_norms():
    model, ref = mlp(), mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(model, clip=0.5, sinks=[]).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss_of(ref, 0).backward()
    true_norm = gg.get_total_norm([p.grad for p in ref.parameters()]).item()
    scaler.scale(loss_of(model, 0)).backward()
    scaler.step(opt)  # fused: the scaler passes grad_scale/found_inf to step()
    scaler.update()
    assert guard.last["pre_norm"].item() == pytest.approx(true_norm, rel=1e-5)


def test_gradient_accumulation_clips_once_on_the_accumulated_gradient():
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=0.2, sinks=[]).attach(opt)
    for k in range(4):
        (loss_of(model, k) / 4).backward()
        (loss_of(ref, k) / 4).backward()
    norm = gg.get_total_norm([p.grad for p in ref.parameters()]).item()
    opt.step()
    assert guard.stats()["steps"] == 1
    assert guard.last["pre_norm"].item() == pytest.approx(norm, rel=1e-6)


def test_guard_from_optimizer_param_groups_and_unused_parameters():
    model = mlp()
    extra = nn.Linear(3, 3)  # in the optimizer, never used: its grad stays None
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.1},
                           {"params": extra.parameters(), "lr": 0.01}])
    guard = gg.Guard(opt, clip="adagc", sinks=[]).attach(opt)
    assert guard.names[0] == "group0.0" and guard.names[-1] == "group1.1"
    for i in range(5):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()
    assert guard.stats()["steps"] == 5
    assert not bool(guard.policy.seen[-1]) and bool(guard.policy.seen[0])


def test_jsonl_log_has_records_and_events(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "run.jsonl"
    guard = gg.Guard(model, clip=50.0, sinks=[str(path)], log_every=5).attach(opt)
    for i in range(12):
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        guard.observe_loss(loss)
        if i == 7:
            model[0].weight.grad.fill_(float("nan"))
        opt.step()
    guard.close()
    log = read_jsonl(path)
    assert log.meta["names"] == guard.names
    assert sum(r["n_steps"] for r in log.records) == 12
    assert [e.kind for e in log.events] == ["nonfinite"] and log.events[0].step == 8


def _train_segment(clip, state, start, stop):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    guard = gg.Guard(model, clip=small_warmups(clip), sinks=[], log_every=7).attach(opt)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        guard.load_state_dict(state["guard"])
    for i in range(start, stop):
        opt.zero_grad()
        loss = loss_of(model, i, scale=10.0 if i % 9 == 0 else 2.0)
        loss.backward()
        guard.observe_loss(loss)
        if i == 11:
            model[2].weight.grad[0, 0] = float("nan")
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "guard": guard.state_dict()}, buf)
    return buf.getvalue(), [p.detach().clone() for p in model.parameters()], guard.stats()


def _resume_in_new_process(rank, world, blobs):
    out = {}
    for clip, blob in blobs.items():
        state = torch.load(io.BytesIO(blob), weights_only=False)
        _, params, stats = _train_segment(_decode_clip(clip), state, 20, 40)
        out[clip] = ([p.tolist() for p in params], stats)
    return out


def _decode_clip(key):
    return None if key == "None" else (float(key) if key[0].isdigit() else key)


@pytest.mark.slow
def test_bitwise_resume_across_processes_for_every_policy():
    from dist_utils import run_distributed

    blobs, full = {}, {}
    for clip in POLICIES:
        blobs[str(clip)], _, _ = _train_segment(clip, None, 0, 20)
        _, params, stats = _train_segment(clip, None, 0, 40)
        full[str(clip)] = (params, stats)
    (resumed,) = run_distributed(_resume_in_new_process, 1, blobs)
    for key, (params, stats) in full.items():
        got, got_stats = resumed[key]
        assert got_stats == stats, key
        for a, b in zip(params, got, strict=True):
            assert torch.equal(a, torch.tensor(b)), key


def test_load_state_dict_rejects_other_parameters():
    guard = gg.Guard(mlp(), clip=1.0, sinks=[])
    other = gg.Guard(nn.Linear(2, 2), clip=1.0, sinks=[])
    with pytest.raises(ValueError, match="different parameters"):
        other.load_state_dict(guard.state_dict())


def test_several_optimizers_share_one_guard_step_per_backward():
    model = mlp()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    rest = torch.optim.Adam([p for m in list(model)[1:] for p in m.parameters()], lr=1e-3)
    guard = gg.Guard(model, clip=0.01, sinks=[]).attach(first).attach(rest)
    for i in range(3):
        first.zero_grad()
        rest.zero_grad()
        loss_of(model, i).backward()
        first.step()
        rest.step()
    assert guard.stats() == {"steps": 3, "clipped": 3, "nonfinite": 0, "skipped": 0}


def test_lr_scheduler_created_after_attach():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=1.0, sinks=[]).attach(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, guard, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05 and guard.stats()["steps"] == 1


def test_a_failed_attach_changes_nothing():
    model, other = mlp(), mlp(1)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    remedies = Remedies()
    guard = gg.Guard(model, sinks=[], remedies=remedies)
    original = opt.step
    with pytest.raises(ValueError, match="none of the Guard's parameters"):
        guard.attach(opt)
    # (the optimizers whose state a rollback restores are the attached ones: none)
    assert opt.step == original and guard.optimizers == []


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="clip"):
        gg.Guard(model, clip="bogus")
    with pytest.raises(TypeError, match="clip"):
        gg.Guard(model, clip=[1.0])
    with pytest.raises(ValueError, match="max_norm"):
        gg.Guard(model, clip=-1.0)
    with pytest.raises(ValueError, match="nonfinite"):
        gg.Guard(model, nonfinite="retry")
    with pytest.raises(ValueError, match="no trainable parameters"):
        gg.Guard(nn.ReLU())
    with pytest.raises(TypeError, match="model_or_params"):
        gg.Guard(42)
    with pytest.raises(TypeError, match="optimizer"):
        gg.Guard(model).attach("sgd")
    with pytest.raises(ValueError, match="factor"):
        LRBackoff(factor=2.0)
    with pytest.raises(TypeError, match="remedies"):
        gg.Guard(model, remedies="yes")
    with pytest.raises(TypeError, match="lr_backoff"):
        Remedies(lr_backoff="yes")
    with pytest.raises(TypeError, match="rollback"):
        Remedies(rollback=5)
    with pytest.raises(ValueError, match="loss"):
        gg.Guard(model, sinks=[]).observe_loss(torch.ones(2))


def test_detach_restores_the_optimizer():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    original = opt.step
    guard = gg.Guard(model, clip=1e-3, sinks=[]).attach(opt)
    guard.detach()
    assert opt.step == original


def test_guard_keeps_rejecting_non_positive_norm_types():
    params = [torch.nn.Parameter(torch.ones(2))]
    for p in (0, -1.0, -math.inf):
        with pytest.raises(ValueError, match="norm_type must be > 0"):
            gg.Guard(params, clip=1.0, norm_type=p, sinks=[])


@pytest.mark.parametrize("order", ["scheduler_then_attach", "attach_then_scheduler"])
def test_a_skip_at_step_zero_raises_no_scheduler_order_warning(order):
    import warnings

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if order == "scheduler_then_attach":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        guard = gg.Guard(model, clip=1.0, sinks=[]).attach(opt)
    else:
        guard = gg.Guard(model, clip=1.0, sinks=[]).attach(opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, 0).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        sched.step()
    assert guard.last_step_skipped is True
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.param_groups[0]["lr"] == 0.05  # the loop stepped its scheduler


def test_the_same_loop_without_the_guard_does_warn():
    # the control for the test above: torch warns when the step did not run
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.warns(UserWarning, match="before `optimizer.step"):
        sched.step()


def test_last_step_skipped_follows_each_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=None, sinks=[]).attach(opt)
    assert guard.last_step_skipped is False
    seen = []
    for i, bad in enumerate((False, True, True, False)):
        opt.zero_grad()
        loss_of(model, i).backward()
        if bad:
            model[2].bias.grad[0] = float("inf")
        opt.step()
        seen.append(guard.last_step_skipped)
    assert seen == [False, True, True, False]
    manual = gg.Guard(model, clip=None, sinks=[])
    model[2].bias.grad[0] = float("nan")
    assert manual.step() is False and manual.last_step_skipped is True


def test_observe_loss_over_micro_batches_records_the_step_mean_and_sees_a_nan():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=None, sinks=[]).attach(opt)
    losses = []
    opt.zero_grad()
    for i in range(4):
        loss = loss_of(model, i)
        losses.append(loss.detach())
        guard.observe_loss(loss)
        (loss / 4).backward()
    opt.step()
    assert guard.last["loss"].item() == ((losses[0] + losses[1] + losses[2] + losses[3])
                                         / 4).item()
    # a NaN in the first micro-batch is not hidden by the later ones
    opt.zero_grad()
    for i in range(3):
        loss = loss_of(model, i)
        guard.observe_loss(loss * float("nan") if i == 0 else loss)
        (loss / 3).backward()
    assert guard.pending_loss.item() == math.inf
    opt.step()
    assert guard.last["loss"].item() == math.inf and guard.pending_loss is None
    # reduction="sum": values that are already the micro-batch's share
    opt.zero_grad()
    shares = []
    for i in range(2):
        share = loss_of(model, i) / 2
        shares.append(share.detach())
        guard.observe_loss(share, reduction="sum")
        share.backward()
    opt.step()
    assert guard.last["loss"].item() == (shares[0] + shares[1]).item()


def test_observe_loss_rejects_a_bad_or_mixed_reduction():
    guard = gg.Guard(mlp(), clip=None, sinks=[])
    with pytest.raises(ValueError, match="reduction"):
        guard.observe_loss(1.0, reduction="max")
    guard.observe_loss(1.0)
    with pytest.raises(ValueError, match="reduction='sum'"):
        guard.observe_loss(1.0, reduction="sum")


@pytest.mark.parametrize("make_opt, watched", [
    (lambda p: torch.optim.AdamW(p, lr=1e-2), True),
    (lambda p: torch.optim.SGD(p, lr=1e-2), False),
])
def test_attach_watches_an_adam_family_optimizer_for_the_monitor(make_opt, watched):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = make_opt(model.parameters())
    records = []
    guard = gg.Guard(model, clip=1.0, log_every=3,
                     sinks=[lambda kind, payload: kind == "record" and records.append(payload)])
    guard.attach(opt)
    assert guard.monitor.watches_optimizer is watched
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    guard.close()
    assert len(records) == 2
    if watched:  # sampled at each interval's last step; Adam has state from step 2 on
        assert [r["optim_step"] for r in records] == [3, 6]
        ratios = records[1]["layer_update_ratio"]
        assert len(ratios) == len(guard.names) and all(0 < v < 1 for v in ratios)
    else:
        assert "optim_step" not in records[0]
