"""gradguard.guard.step: one Guard step (measure -> decide -> apply -> record) inside
optimizer.step: clipping bitwise as torch, every policy with every optimizer, exact
records and counters, the non-finite modes, sync-freedom, poisoned steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import gradguard as gg
from guard_utils import (
    POLICIES,
    loss_of,
    mlp,
    small_warmups,
    state_equal,
)


def test_fixed_threshold_matches_torch_clip_loop_bitwise():
    ref, ours = mlp(), mlp()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    guard = gg.Guard(ours, clip=0.5, sinks=[]).attach(opt)
    for i in range(20):
        opt_ref.zero_grad()
        loss_of(ref, i, scale=5).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
        opt.zero_grad()
        loss_of(ours, i, scale=5).backward()
        opt.step()
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)
    assert guard.stats()["clipped"] > 0


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd-foreach": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=True),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.05, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=3e-3),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clip", POLICIES)
def test_every_policy_with_every_optimizer(opt_name, clip):
    model = mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    guard = gg.Guard(model, clip=small_warmups(clip), sinks=[]).attach(opt)
    with torch.no_grad():
        first = loss_of(model, 99, scale=4).item()
    for i in range(30):
        opt.zero_grad()
        loss_of(model, i, scale=4).backward()
        if i == 12:
            model[2].weight.grad[3, 3] = float("nan")
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    stats = guard.stats()
    assert stats == {"steps": 30, "clipped": stats["clipped"], "nonfinite": 1, "skipped": 1}
    assert loss_of(model, 99, scale=4).item() < first


def test_last_record_and_counters_are_exact():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=0.3, sinks=[]).attach(opt)
    clipped = 0
    for i in range(25):
        opt.zero_grad()
        loss_of(model, i, scale=2 if i % 2 else 0.01).backward()
        norm = gg.get_total_norm([p.grad for p in model.parameters()]).item()
        clipped += norm > 0.3
        opt.step()
        last = guard.last
        assert last["pre_norm"].item() == pytest.approx(norm, rel=1e-6)
        assert last["post_norm"].item() == pytest.approx(min(norm, 0.3), rel=1e-4)
        assert bool(last["clipped"]) == (norm > 0.3)
        assert last["threshold"].item() == pytest.approx(0.3)
    assert guard.stats() == {"steps": 25, "clipped": clipped, "nonfinite": 0, "skipped": 0}


@pytest.mark.parametrize("clip", POLICIES)
def test_skip_leaves_params_adam_state_and_statistics_bitwise_unchanged(clip):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, clip=small_warmups(clip), sinks=[]).attach(opt)
    for i in range(12):
        opt.zero_grad()
        loss_of(model, i, scale=3).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    policy_state = copy.deepcopy(guard.policy.state_dict()) if guard.policy else None
    opt.zero_grad()
    loss_of(model, 12, scale=3).backward()
    model[0].bias.grad[1] = float("inf")
    assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert state_equal(opt.state_dict(), opt_state)
    if guard.policy is not None:
        assert state_equal(guard.policy.state_dict(), policy_state)
    assert bool(guard.last["skipped"]) and bool(guard.last["nonfinite"])
    ev = [e for e in guard.events if e.kind == "nonfinite"]
    assert ev and ev[-1].step == 13 and ev[-1].layers == ["0.bias"]


def test_zero_replaces_nonfinite_entries_and_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=None, nonfinite="zero", sinks=[]).attach(opt)
    opt.zero_grad()
    loss_of(model, 0).backward()
    w = model[2].weight
    g = w.grad.clone()
    w.grad[0, 0], w.grad[1, 1] = float("nan"), float("-inf")
    before = w.detach().clone()
    opt.step()
    g[0, 0] = g[1, 1] = 0.0
    torch.testing.assert_close(w.detach(), before - 0.1 * g)
    assert guard.stats() == {"steps": 1, "clipped": 0, "nonfinite": 1, "skipped": 0}
    assert math.isfinite(guard.last["pre_norm"].item())


def test_raise_names_the_offending_parameters():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gg.Guard(model, nonfinite="raise", sinks=[]).attach(opt)
    loss_of(model, 0).backward()
    model[4].weight.grad[0, 2] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gg.NonFiniteGradientError, match=r"4\.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("clip", POLICIES)
def test_ignore_lets_the_step_through_but_statistics_never_absorb_it(clip):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=small_warmups(clip), nonfinite="ignore", sinks=[]).attach(opt)
    for i in range(10):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()
    state = copy.deepcopy(guard.policy.state_dict()) if guard.policy else None
    opt.zero_grad()
    loss_of(model, 10).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(model[0].weight[0, 0])
    if guard.policy is not None:  # the statistics (host bookkeeping like Auto's call count
        assert state_equal(guard.policy.state_dict()["state"], state["state"])  # may move)
    assert guard.stats()["nonfinite"] == 1 and guard.stats()["skipped"] == 0


def test_monitor_only_does_not_touch_gradients():
    model = mlp()
    guard = gg.Guard(model, clip=None, sinks=[])
    loss_of(model, 0, scale=100).backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert guard.step()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True))
    assert math.isnan(guard.last["threshold"].item())


@pytest.mark.parametrize("nonfinite", ["zero", "ignore"])
@pytest.mark.parametrize("clip", POLICIES)
def test_step_is_sync_free_on_fake_cuda(clip, nonfinite):
    with FakeTensorMode():
        params = [nn.Parameter(torch.randn(s, device="cuda")) for s in [(30, 40), (40,), (4, 4)]]
        guard = gg.Guard(params, clip=small_warmups(clip), nonfinite=nonfinite, sinks=[],
                         log_every=10_000)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn_like(p)
            guard.observe_loss(torch.ones((), device="cuda"))
            assert guard.step() is True
        guard.state_dict()


def _regression_run(clip, poison: bool, steps: int = 2000):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = gg.Guard(model, clip=clip, sinks=[], log_every=100).attach(opt)
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(512, 6, generator=gen)
    # label noise: the loss plateaus near the noise level, so runs are comparable
    ys = torch.sin(xs[:, :1]) + 0.5 * xs[:, 1:2] * xs[:, 2:3] + 0.3 * torch.randn(512, 1,
                                                                             generator=gen)
    rng = torch.Generator().manual_seed(2)
    params = list(model.parameters())
    poisoned = 0
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=rng)
        opt.zero_grad()
        loss = (model(xs[idx]) - ys[idx]).pow(2).mean()
        loss.backward()
        hit = torch.rand((), generator=rng).item() < 0.05
        layer = int(torch.randint(0, len(params), (), generator=rng))
        if poison and hit:
            poisoned += 1
            g = params[layer].grad.view(-1)
            g[int(torch.randint(0, g.numel(), (), generator=rng))] = (
                float("nan") if poisoned % 2 else float("inf"))
        opt.step()
    guard.flush()
    with torch.no_grad():
        final = (model(xs) - ys).pow(2).mean().item()
    return final, poisoned, guard, model, opt


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["auto", "zclip", "autoclip"])
def test_poisoned_steps_are_skipped_and_training_matches_clean(clip):
    clean, _, _, _, _ = _regression_run(clip, poison=False)
    final, poisoned, guard, model, opt = _regression_run(clip, poison=True)
    assert poisoned > 50
    assert abs(final - clean) <= 0.05 * clean
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for state in opt.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))
    for key, v in guard.policy.state_dict()["state"].items():
        v = v.double()
        if key == "history":  # AutoClip marks empty slots with NaN
            v = v[~torch.isnan(v)]
        assert torch.isfinite(v).all(), key
    events = [e for e in guard.events if e.kind == "nonfinite"]
    assert len(events) == poisoned
    assert guard.stats()["skipped"] == poisoned


def test_agc_with_zero_mode_clips_the_repaired_units():
    w = nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.SGD([w], lr=1.0)
    gg.Guard([w], clip="agc", nonfinite="zero", sinks=[]).attach(opt)
    w.grad = torch.tensor([[math.nan, 1e6, 1e6], [0.0, 1e6, 1e6]])
    opt.step()
    change = (torch.ones(2, 3) - w.detach()).norm(dim=1)
    limit = 0.01 * math.sqrt(3)  # clipping * ||W_i||
    assert (change <= limit * (1 + 1e-4)).all(), change
