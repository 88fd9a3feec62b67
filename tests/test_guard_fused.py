"""gradguard.guard (attach with fused optimizers): ``nonfinite="skip"`` hands torch's fused
Adam/AdamW/SGD/Adagrad the skip as a ``found_inf`` device flag, as GradScaler does: no host
read, and parameters, moments and ``step`` bitwise unchanged on a skipped step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import gradguard as gg
from guard_utils import POLICIES, loss_of, mlp, small_warmups, state_equal

FUSED = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True),
}


def nan_step(model, opt, i):
    opt.zero_grad()
    loss_of(model, i).backward()
    model[2].weight.grad[0, 0] = float("nan")
    opt.step()


def good_step(model, opt, i):
    opt.zero_grad()
    loss_of(model, i).backward()
    opt.step()


@pytest.mark.parametrize("name", sorted(FUSED))
def test_a_skipped_step_leaves_parameters_and_state_bitwise_unchanged(name):
    ref, model = mlp(), mlp()
    opt_ref, opt = FUSED[name](ref.parameters()), FUSED[name](model.parameters())
    guard_ref = gg.Guard(ref, clip=0.5, sinks=[]).attach(opt_ref)
    guard = gg.Guard(model, clip=0.5, sinks=[], log_every=4).attach(opt)
    for i in range(2):
        good_step(ref, opt_ref, i)
        good_step(model, opt, i)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in enumerate(opt.state.values())}
    nan_step(model, opt, 2)
    assert guard.last_step_skipped is True
    for p, b in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, b)
    assert state_equal({k: dict(s) for k, s in enumerate(opt.state.values())}, state)
    if name.startswith("adam"):  # exp_avg, exp_avg_sq and step, named
        s = next(iter(opt.state.values()))
        assert set(s) >= {"exp_avg", "exp_avg_sq", "step"} and s["step"].item() == 2
    for i in range(3, 6):
        good_step(ref, opt_ref, i)
        good_step(model, opt, i)
    assert guard.last_step_skipped is False
    # the same run without the bad step, bitwise: state, parameters, the policy
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert state_equal(opt.state_dict(), opt_ref.state_dict())
    assert state_equal(guard.policy.state_dict(), guard_ref.policy.state_dict())
    assert guard.stats() == {"steps": 6, "clipped": guard_ref.stats()["clipped"],
                             "nonfinite": 1, "skipped": 1}
    # no host read at the step: the non-finite event comes with the interval (step 4)
    events = [e for e in guard.events if e.kind == "nonfinite"]
    assert len(events) == 1 and events[0].step == 3


def test_no_host_read_on_fake_cuda_tensors():
    with FakeTensorMode():
        params = [nn.Parameter(torch.randn(s, device="cuda")) for s in [(30, 40), (40,)]]
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        guard = gg.Guard(params, clip="auto", sinks=[], log_every=10_000).attach(opt)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            guard.observe_loss(torch.ones((), device="cuda"))
            opt.step()  # any host read raises DataDependentOutputException here
        assert guard.step_count == 3
        # the Guard's host-read path (an explicit step) raises here: the test can fail
        other = gg.Guard(params, clip="auto", sinks=[], log_every=10_000)
        with pytest.raises(DataDependentOutputException):
            other.step()


def test_a_mix_of_fused_and_plain_optimizers_reads_the_flag_on_the_host():
    model = mlp()
    fused = torch.optim.AdamW(model[0].parameters(), lr=1e-2, fused=True)
    plain = torch.optim.SGD([p for m in list(model)[1:] for p in m.parameters()], lr=0.1)
    guard = gg.Guard(model, clip=None, sinks=[]).attach(fused).attach(plain)
    params = [p.detach().clone() for p in model.parameters()]
    fused.zero_grad()
    plain.zero_grad()
    loss_of(model, 0).backward()
    model[4].weight.grad[0, 0] = float("inf")
    fused.step()
    plain.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params, strict=True))
    assert len(fused.state) == 0  # skipped on the host: the fused step never ran
    assert guard.stats()["skipped"] == 1 and guard.last_step_skipped is True


def test_two_fused_optimizers_follow_one_device_decision():
    model = mlp()
    first = torch.optim.AdamW(model[0].parameters(), lr=1e-2, fused=True)
    rest = torch.optim.SGD([p for m in list(model)[1:] for p in m.parameters()], lr=0.1,
                           fused=True)
    guard = gg.Guard(model, clip=None, sinks=[]).attach(first).attach(rest)
    params = [p.detach().clone() for p in model.parameters()]
    for opt in (first, rest):
        opt.zero_grad()
    loss_of(model, 0).backward()
    model[4].weight.grad[0, 0] = float("nan")
    first.step()
    rest.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params, strict=True))
    assert guard.stats() == {"steps": 1, "clipped": 0, "nonfinite": 1, "skipped": 1}
    assert next(iter(first.state.values()))["step"].item() == 0


def test_under_a_gradscaler_overflow_stays_the_scalers_and_finite_steps_match():
    ref, model = mlp(), mlp()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = gg.Guard(model, clip=None, sinks=[]).attach(opt)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for i, overflow in enumerate((False, True, False, True, False)):
        for m, o, sc in ((ref, opt_ref, scalers[0]), (model, opt, scalers[1])):
            o.zero_grad()
            sc.scale(loss_of(m, i)).backward()
            if overflow:
                m[2].weight.grad[0, 0] = float("inf")
            sc.step(o)
            sc.update()
        assert guard.last_step_skipped is False  # the scaler's skip, not the Guard's
    assert scalers[1].get_scale() == scalers[0].get_scale() == 2.0**8
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert state_equal(opt.state_dict(), opt_ref.state_dict())
    assert next(iter(opt.state.values()))["step"].item() == 3
    assert guard.stats() == {"steps": 3, "clipped": 0, "nonfinite": 0, "skipped": 0}


@pytest.mark.parametrize("clip", POLICIES, ids=str)
def test_the_device_skip_equals_the_host_skip_bitwise(clip):
    # the same run, skipped on the device and on the host: parameters, optimizer state,
    # policy state, counters
    ref, model = mlp(), mlp()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt_ref._step_supports_amp_scaling = False  # no found_inf: the Guard reads the host
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard_ref = gg.Guard(ref, clip=small_warmups(clip), sinks=[]).attach(opt_ref)
    guard = gg.Guard(model, clip=small_warmups(clip), sinks=[]).attach(opt)
    for i in range(14):
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            loss_of(m, i, scale=3).backward()
            if i in (6, 7):
                m[2].weight.grad[1, 0] = float("nan") if i == 6 else float("-inf")
        opt_ref.step()
        opt.step()
        assert guard_ref.last_step_skipped is guard.last_step_skipped is (i in (6, 7))
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert state_equal(opt.state_dict(), opt_ref.state_dict())
    # the policy's statistics; its host-side schedule counters (auto: Guard steps seen,
    # when to refresh the parameter norm) also count the steps skipped on the device
    host = set(getattr(guard.policy, "host_state", {}))
    policies = [{k: v for k, v in (g.state_dict()["policy"] or {}).items() if k not in host}
                for g in (guard, guard_ref)]
    assert state_equal(*policies)
    assert guard.stats() == guard_ref.stats() and guard.stats()["skipped"] == 2
