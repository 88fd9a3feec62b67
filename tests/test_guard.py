"""The Guard: clipping inside optimizer.step, non-finite policies, GradScaler, accumulation,
exact counters, bitwise resume, sync-freedom, and the remedy ladder."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import gradguard as gg
from gradguard.log.readback import read_jsonl
from gradguard.remedies import LRBackoff, Remedies, Rollback, TrainingDiverged

POLICIES = [0.5, "autoclip", "zclip", "adagc", "agc", "auto", None]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def _batch(i: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(32, 6, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).mul(scale)
    return x, y


def _loss(model: nn.Module, i: int, scale: float = 1.0) -> torch.Tensor:
    x, y = _batch(i, scale)
    return (model(x) - y).pow(2).mean()


def _policy(clip):
    """Small warm-ups, so that short tests reach the adaptive rules."""
    if clip == "zclip":
        return gg.ZClip(warmup_steps=5)
    if clip == "adagc":
        return gg.AdaGC(warmup_steps=5)
    return clip


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        try:  # bitwise, NaN included (an AutoClip history holds NaN for empty slots)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        except AssertionError:
            return False
        return True
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


# ----- clipping inside optimizer.step --------------------------------------------------------

def test_fixed_threshold_matches_torch_clip_loop_bitwise():
    ref, ours = _mlp(), _mlp()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    guard = gg.Guard(ours, clip=0.5, sinks=[]).attach(opt)
    for i in range(20):
        opt_ref.zero_grad()
        _loss(ref, i, scale=5).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
        opt.zero_grad()
        _loss(ours, i, scale=5).backward()
        opt.step()
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)
    assert guard.stats()["clipped"] > 0


def test_explicit_step_equals_attached():
    a, b = _mlp(), _mlp()
    opt_a = torch.optim.Adam(a.parameters(), 1e-2)
    opt_b = torch.optim.Adam(b.parameters(), 1e-2)
    gg.Guard(a, clip="zclip", sinks=[]).attach(opt_a)
    guard_b = gg.Guard(b, clip="zclip", sinks=[])
    for i in range(40):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _loss(model, i, scale=3).backward()
        opt_a.step()
        if guard_b.step():
            opt_b.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


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
    model = _mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    guard = gg.Guard(model, clip=_policy(clip), sinks=[]).attach(opt)
    with torch.no_grad():
        first = _loss(model, 99, scale=4).item()
    for i in range(30):
        opt.zero_grad()
        _loss(model, i, scale=4).backward()
        if i == 12:
            model[2].weight.grad[3, 3] = float("nan")
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    stats = guard.stats()
    assert stats == {"steps": 30, "clipped": stats["clipped"], "nonfinite": 1, "skipped": 1}
    assert _loss(model, 99, scale=4).item() < first


def test_last_record_and_counters_are_exact():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=0.3, sinks=[]).attach(opt)
    clipped = 0
    for i in range(25):
        opt.zero_grad()
        _loss(model, i, scale=2 if i % 2 else 0.01).backward()
        norm = gg.get_total_norm([p.grad for p in model.parameters()]).item()
        clipped += norm > 0.3
        opt.step()
        last = guard.last
        assert last["pre_norm"].item() == pytest.approx(norm, rel=1e-6)
        assert last["post_norm"].item() == pytest.approx(min(norm, 0.3), rel=1e-4)
        assert bool(last["clipped"]) == (norm > 0.3)
        assert last["threshold"].item() == pytest.approx(0.3)
    assert guard.stats() == {"steps": 25, "clipped": clipped, "nonfinite": 0, "skipped": 0}


# ----- non-finite policies -------------------------------------------------------------------

@pytest.mark.parametrize("clip", POLICIES)
def test_skip_leaves_params_adam_state_and_statistics_bitwise_unchanged(clip):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, clip=_policy(clip), sinks=[]).attach(opt)
    for i in range(12):
        opt.zero_grad()
        _loss(model, i, scale=3).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    policy_state = copy.deepcopy(guard.policy.state_dict()) if guard.policy else None
    opt.zero_grad()
    _loss(model, 12, scale=3).backward()
    model[0].bias.grad[1] = float("inf")
    assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert _state_equal(opt.state_dict(), opt_state)
    if guard.policy is not None:
        assert _state_equal(guard.policy.state_dict(), policy_state)
    assert bool(guard.last["skipped"]) and bool(guard.last["nonfinite"])
    ev = [e for e in guard.events if e.kind == "nonfinite"]
    assert ev and ev[-1].step == 13 and ev[-1].layers == ["0.bias"]


def test_zero_replaces_nonfinite_entries_and_steps():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=None, nonfinite="zero", sinks=[]).attach(opt)
    opt.zero_grad()
    _loss(model, 0).backward()
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
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gg.Guard(model, nonfinite="raise", sinks=[]).attach(opt)
    _loss(model, 0).backward()
    model[4].weight.grad[0, 2] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gg.NonFiniteGradientError, match=r"4\.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("clip", POLICIES)
def test_ignore_lets_the_step_through_but_statistics_never_absorb_it(clip):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=_policy(clip), nonfinite="ignore", sinks=[]).attach(opt)
    for i in range(10):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()
    state = copy.deepcopy(guard.policy.state_dict()) if guard.policy else None
    opt.zero_grad()
    _loss(model, 10).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(model[0].weight[0, 0])
    if guard.policy is not None:  # the statistics (host bookkeeping like Auto's call count
        assert _state_equal(guard.policy.state_dict()["state"], state["state"])  # may move)
    assert guard.stats()["nonfinite"] == 1 and guard.stats()["skipped"] == 0


# ----- GradScaler, accumulation, param groups ------------------------------------------------

def test_gradscaler_step_sees_unscaled_gradients_and_overflow_is_not_observed():
    model, ref = _mlp(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=0.5, sinks=[]).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _loss(ref, 0).backward()
    true_norm = gg.get_total_norm([p.grad for p in ref.parameters()]).item()
    scaler.scale(_loss(model, 0)).backward()
    scaler.step(opt)
    scaler.update()
    assert guard.last["pre_norm"].item() == pytest.approx(true_norm, rel=1e-5)
    # an overflow step: the scaler skips it, the Guard never sees it
    opt.zero_grad()
    scaler.scale(_loss(model, 1)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert guard.stats() == {"steps": 1, "clipped": 1, "nonfinite": 0, "skipped": 0}


def test_gradscaler_with_explicit_unscale_and_manual_step():
    model, ref = _mlp(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    guard = gg.Guard(model, clip=0.5, scaler=scaler, sinks=[])
    _loss(ref, 0).backward()
    true_norm = gg.get_total_norm([p.grad for p in ref.parameters()]).item()
    scaler.scale(_loss(model, 0)).backward()
    scaler.unscale_(opt)
    assert guard.step()
    scaler.step(opt)
    scaler.update()
    assert guard.last["pre_norm"].item() == pytest.approx(true_norm, rel=1e-5)
    opt.zero_grad()
    scaler.scale(_loss(model, 1)).backward()
    model[2].bias.grad[0] = float("inf")
    scaler.unscale_(opt)
    assert guard.step() is False  # the scaler's overflow: skipped, not an observation
    scaler.step(opt)
    scaler.update()
    assert guard.stats()["nonfinite"] == 0 and guard.stats()["steps"] == 1
    assert not [e for e in guard.events if e.kind == "nonfinite"]


def test_fused_optimizer_under_gradscaler_unscales_norms():
    model, ref = _mlp(), _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(model, clip=0.5, sinks=[]).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _loss(ref, 0).backward()
    true_norm = gg.get_total_norm([p.grad for p in ref.parameters()]).item()
    scaler.scale(_loss(model, 0)).backward()
    scaler.step(opt)  # fused: the scaler passes grad_scale/found_inf to step()
    scaler.update()
    assert guard.last["pre_norm"].item() == pytest.approx(true_norm, rel=1e-5)


def test_gradient_accumulation_clips_once_on_the_accumulated_gradient():
    model, ref = _mlp(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=0.2, sinks=[]).attach(opt)
    for k in range(4):
        (_loss(model, k) / 4).backward()
        (_loss(ref, k) / 4).backward()
    norm = gg.get_total_norm([p.grad for p in ref.parameters()]).item()
    opt.step()
    assert guard.stats()["steps"] == 1
    assert guard.last["pre_norm"].item() == pytest.approx(norm, rel=1e-6)


def test_guard_from_optimizer_param_groups_and_unused_parameters():
    model = _mlp()
    extra = nn.Linear(3, 3)  # in the optimizer, never used: its grad stays None
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.1},
                           {"params": extra.parameters(), "lr": 0.01}])
    guard = gg.Guard(opt, clip="adagc", sinks=[]).attach(opt)
    assert guard.names[0] == "group0.0" and guard.names[-1] == "group1.1"
    for i in range(5):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()
    assert guard.stats()["steps"] == 5
    assert not bool(guard.policy.seen[-1]) and bool(guard.policy.seen[0])


def test_monitor_only_does_not_touch_gradients():
    model = _mlp()
    guard = gg.Guard(model, clip=None, sinks=[])
    _loss(model, 0, scale=100).backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert guard.step()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True))
    assert math.isnan(guard.last["threshold"].item())


def test_jsonl_log_has_records_and_events(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "run.jsonl"
    guard = gg.Guard(model, clip=50.0, sinks=[str(path)], log_every=5).attach(opt)
    for i in range(12):
        opt.zero_grad()
        loss = _loss(model, i)
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


# ----- checkpointing -------------------------------------------------------------------------

def _train_segment(clip, state, start, stop):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    guard = gg.Guard(model, clip=_policy(clip), sinks=[], log_every=7).attach(opt)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        guard.load_state_dict(state["guard"])
    for i in range(start, stop):
        opt.zero_grad()
        loss = _loss(model, i, scale=10.0 if i % 9 == 0 else 2.0)
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
    guard = gg.Guard(_mlp(), clip=1.0, sinks=[])
    other = gg.Guard(nn.Linear(2, 2), clip=1.0, sinks=[])
    with pytest.raises(ValueError, match="different parameters"):
        other.load_state_dict(guard.state_dict())


# ----- no host synchronisation ---------------------------------------------------------------

@pytest.mark.parametrize("nonfinite", ["zero", "ignore"])
@pytest.mark.parametrize("clip", POLICIES)
def test_step_is_sync_free_on_fake_cuda(clip, nonfinite):
    with FakeTensorMode():
        params = [nn.Parameter(torch.randn(s, device="cuda")) for s in [(30, 40), (40,), (4, 4)]]
        guard = gg.Guard(params, clip=_policy(clip), nonfinite=nonfinite, sinks=[],
                         log_every=10_000)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn_like(p)
            guard.observe_loss(torch.ones((), device="cuda"))
            assert guard.step() is True
        guard.state_dict()


# ----- 5% poisoned steps ---------------------------------------------------------------------

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


# ----- remedies ------------------------------------------------------------------------------

def test_lr_backoff_after_consecutive_skips_then_restore():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    remedies = Remedies(skip_budget=2, lr_backoff=LRBackoff(factor=0.5, recovery_steps=10))
    guard = gg.Guard(model, clip=None, sinks=[], remedies=remedies).attach(opt)
    for i in range(2):
        opt.zero_grad()
        _loss(model, i).backward()
        model[0].bias.grad[0] = float("nan")
        opt.step()
    assert remedies.lr_factor == 0.5
    assert [e.kind for e in guard.events][-1] == "lr_backoff"
    # the next step updates with half the learning rate; the scheduler's value is untouched
    opt.zero_grad()
    _loss(model, 5).backward()
    w0, g = model[4].bias.detach().clone(), model[4].bias.grad.clone()
    opt.step()
    sched.step()
    torch.testing.assert_close(model[4].bias.detach(), w0 - 0.1 * 0.5 * g)
    assert opt.param_groups[0]["lr"] == 0.1
    for i in range(12):
        opt.zero_grad()
        _loss(model, 10 + i).backward()
        opt.step()
    assert remedies.lr_factor == 1.0
    assert "lr_restore" in [e.kind for e in guard.events]


def test_rollback_restores_snapshot_and_skips_batches():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(skip_batches=2, loss_factor=3.0))
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5, remedies=remedies).attach(opt)
    for i in range(10):  # two clean intervals: a snapshot at step 10, before its update
        opt.zero_grad()
        loss = _loss(model, i)
        loss.backward()
        guard.observe_loss(loss)
        if i == 9:
            snap = [p.detach().clone() for p in model.parameters()]
        opt.step()
    for i in range(10, 15):  # the loss jumps 100x
        opt.zero_grad()
        loss = _loss(model, i)
        loss.backward()
        guard.observe_loss(loss * 100)
        opt.step()
    assert any(e.kind == "rollback" for e in guard.events)
    assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters(), strict=True))
    for i in range(15, 17):  # skipped batches
        opt.zero_grad()
        _loss(model, i).backward()
        assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters(), strict=True))
    assert guard.stats()["skipped"] == 3  # the rollback step's own update, then 2 batches


def test_abort_when_the_ladder_is_exhausted():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(skip_budget=2, lr_backoff=LRBackoff(max_times=1), rollback=None)
    guard = gg.Guard(model, sinks=[], remedies=remedies).attach(opt)
    with pytest.raises(TrainingDiverged, match="learning rate 10x lower"):
        for i in range(10):
            opt.zero_grad()
            _loss(model, i).backward()
            model[0].weight.grad.fill_(float("nan"))
            opt.step()
    kinds = [e.kind for e in guard.events]
    assert kinds.count("lr_backoff") == 1 and kinds[-1] == "abort"


def _train(model, opt, guard, steps, start=0, loss_scale=None):
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = _loss(model, i)
        loss.backward()
        guard.observe_loss(loss if loss_scale is None else loss * loss_scale(i))
        opt.step()


def test_rollback_keeps_the_schedulers_learning_rate():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(loss_factor=3.0))
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5, remedies=remedies).attach(opt)
    for i in range(15):
        _train(model, opt, guard, 1, start=i, loss_scale=lambda i: 100.0 if i >= 10 else 1.0)
        sched.step()
    assert [e.kind for e in guard.events].count("rollback") == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.9**15)


def test_rollback_after_skips_does_not_drop_the_next_clean_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = gg.ZClip(warmup_steps=2)
    remedies = Remedies(skip_budget=1, lr_backoff=None,
                        rollback=Rollback(skip_batches=0, loss_factor=None))
    guard = gg.Guard(model, clip=policy, sinks=[], log_every=2, remedies=remedies).attach(opt)
    _train(model, opt, guard, 4)  # two clean intervals: a snapshot
    opt.zero_grad()
    _loss(model, 4).backward()
    model[0].bias.grad[0] = float("nan")
    opt.step()  # skipped, escalates to a rollback
    assert [e.kind for e in guard.events][-1] == "rollback"
    before = [p.detach().clone() for p in model.parameters()]
    count = int(policy.count)
    _train(model, opt, guard, 1, start=5)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert int(policy.count) == count + 1
    assert guard.stats()["skipped"] == 1


def test_batches_skipped_after_a_rollback_are_not_counted_non_finite():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(skip_batches=3, loss_factor=3.0))
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5, nonfinite="zero",
                     remedies=remedies).attach(opt)
    _train(model, opt, guard, 25, loss_scale=lambda i: 100.0 if 10 <= i < 15 else 1.0)
    guard.flush()
    assert sum(r["nonfinite"] for r in guard.monitor.records) == 0
    assert "nonfinite" not in [e.kind for e in guard.events]
    assert guard.stats()["nonfinite"] == 0


def test_a_non_finite_loss_rolls_back():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(loss_factor=3.0))
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5, remedies=remedies).attach(opt)
    _train(model, opt, guard, 10)
    snapshot_step = remedies._snapshot_step
    _train(model, opt, guard, 5, start=10, loss_scale=lambda i: math.inf)
    rollbacks = [e for e in guard.events if e.kind == "rollback"]
    assert len(rollbacks) == 1 and "non-finite loss" in rollbacks[0].message
    assert remedies._snapshot_step == snapshot_step
    assert guard.monitor.records[-1]["loss_nonfinite"] == 5
    guard.observe_loss(torch.tensor(math.nan))  # an observed NaN is not "no loss"
    assert math.isinf(guard._pending_loss.item())


def test_close_neither_rolls_back_nor_raises_and_closes_the_sinks(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(lr_backoff=None, rollback=Rollback(loss_factor=3.0, max_times=0))
    log = tmp_path / "run.jsonl"
    guard = gg.Guard(model, clip=1.0, sinks=[str(log)], log_every=5,
                     remedies=remedies).attach(opt)
    _train(model, opt, guard, 12, loss_scale=lambda i: 100.0 if i >= 10 else 1.0)
    trained = [p.detach().clone() for p in model.parameters()]
    guard.close()  # the last partial interval has the loss jump
    assert all(torch.equal(a, b) for a, b in zip(trained, model.parameters(), strict=True))
    assert guard.monitor.closed and guard.optimizers == []
    run = read_jsonl(log)
    assert run.records[-1]["step_last"] == 12 and "rollback" not in [e.kind for e in run.events]


def test_an_abort_from_a_flush_still_logs_the_interval(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = Remedies(lr_backoff=LRBackoff(spikes=1, max_times=0))
    log = tmp_path / "run.jsonl"
    guard = gg.Guard(model, clip=None, sinks=[str(log)], log_every=25,
                     remedies=remedies).attach(opt)
    with pytest.raises(TrainingDiverged):
        for i in range(25):
            opt.zero_grad()
            _loss(model, i).backward()
            if i == 24:
                for p in model.parameters():
                    p.grad.mul_(1e4)
            opt.step()
    run = read_jsonl(log)
    assert len(run.records) == 1 and len(guard.monitor.records) == 1
    assert "abort" in [e.kind for e in run.events]


def test_agc_with_zero_mode_clips_the_repaired_units():
    w = nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.SGD([w], lr=1.0)
    gg.Guard([w], clip="agc", nonfinite="zero", sinks=[]).attach(opt)
    w.grad = torch.tensor([[math.nan, 1e6, 1e6], [0.0, 1e6, 1e6]])
    opt.step()
    change = (torch.ones(2, 3) - w.detach()).norm(dim=1)
    limit = 0.01 * math.sqrt(3)  # clipping * ||W_i||
    assert (change <= limit * (1 + 1e-4)).all(), change


def test_several_optimizers_share_one_guard_step_per_backward():
    model = _mlp()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    rest = torch.optim.Adam([p for m in list(model)[1:] for p in m.parameters()], lr=1e-3)
    guard = gg.Guard(model, clip=0.01, sinks=[]).attach(first).attach(rest)
    for i in range(3):
        first.zero_grad()
        rest.zero_grad()
        _loss(model, i).backward()
        first.step()
        rest.step()
    assert guard.stats() == {"steps": 3, "clipped": 3, "nonfinite": 0, "skipped": 0}


def test_lr_scheduler_created_after_attach():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=1.0, sinks=[]).attach(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, guard, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05 and guard.stats()["steps"] == 1


def test_a_failed_attach_changes_nothing():
    model, other = _mlp(), _mlp(1)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    remedies = Remedies()
    guard = gg.Guard(model, sinks=[], remedies=remedies)
    original = opt.step
    with pytest.raises(ValueError, match="none of the Guard's parameters"):
        guard.attach(opt)
    assert opt.step == original and guard.optimizers == [] and remedies._optimizers == []


def test_rollback_without_a_known_optimizer_warns():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=1.0, sinks=[], log_every=5,
                     remedies=Remedies(rollback=Rollback()))
    with pytest.warns(UserWarning, match="no optimizer state"):
        for i in range(5):
            opt.zero_grad()
            _loss(model, i).backward()
            guard.step()
            opt.step()


# ----- validation ----------------------------------------------------------------------------

def test_bad_arguments():
    model = _mlp()
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
    model = _mlp()
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
