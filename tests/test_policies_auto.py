"""gradguard.policies.auto: the trust cap (rho ||theta|| / lr_eff) and the spike cap (SGD-type
optimizers), and the rule for Adam-family optimizers against a hand-written reference."""

from __future__ import annotations

import math

import pytest
import torch

from gradguard.policies import Auto, StepNorms
from gradguard.policies.auto import second_moment_decay
from policy_utils import NAN, norm_sequence


def _auto_step(total: float, params, optimizers) -> StepNorms:
    t = torch.tensor(total, dtype=torch.float32)
    return StepNorms(norms=t.reshape(1), total=t, finite=torch.isfinite(t), params=params,
                     optimizers=optimizers)


def test_auto_trust_cap_is_rho_param_norm_over_effective_lr():
    w = torch.nn.Parameter(torch.full((10,), 3.0))  # ||theta|| = sqrt(90)
    opt = torch.optim.SGD([w], lr=0.05, momentum=0.9, dampening=0.5)
    policy = Auto(rho=0.002, warmup_steps=1000)
    policy.setup(1, "cpu")
    coef, threshold = policy.compute(_auto_step(100.0, [w], [opt]))
    lr_eff = 0.05 * (1 - 0.5) / (1 - 0.9)
    expected = 0.002 * math.sqrt(90.0) / lr_eff
    assert threshold.item() == pytest.approx(expected, rel=1e-6)
    assert coef.item() == pytest.approx(expected / (100.0 + 1e-6), rel=1e-6)
    # the learning rate is read every step: a 10x higher rate gives a 10x tighter cap
    opt.param_groups[0]["lr"] = 0.5
    _, threshold = policy.compute(_auto_step(100.0, [w], [opt]))
    assert threshold.item() == pytest.approx(expected / 10, rel=1e-6)


def test_auto_has_no_cap_without_optimizer_or_with_a_non_adaptive_one():
    w = torch.nn.Parameter(torch.ones(4))
    for optimizers in ([torch.optim.Adagrad([w])], []):
        policy = Auto(warmup_steps=1000)
        policy.setup(1, "cpu")
        coef, threshold = policy.compute(_auto_step(1e6, [w], optimizers))
        assert coef.item() == 1.0 and math.isinf(threshold.item())


def test_auto_trust_cap_is_off_for_zero_parameters_and_momentum_one():
    zero = torch.nn.Parameter(torch.zeros(4))  # a zero-initialised model
    for opt in (torch.optim.SGD([zero], lr=0.1, momentum=0.9),
                torch.optim.SGD([torch.nn.Parameter(torch.ones(4))], lr=0.1, momentum=1.0)):
        params = opt.param_groups[0]["params"]
        policy = Auto(warmup_steps=1000)
        policy.setup(1, "cpu")
        coef, threshold = policy.compute(_auto_step(3.0, params, [opt]))
        assert coef.item() == 1.0 and math.isinf(threshold.item())


def test_auto_trains_a_zero_initialised_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    from gradguard import Guard
    Guard(model, clip="auto", sinks=[]).attach(opt)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    for _ in range(200):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3


def test_auto_spike_cap_follows_the_clipped_norm():
    policy = Auto(spike_factor=5.0, beta=0.9, warmup_steps=10)
    policy.setup(1, "cpu")
    for _ in range(30):
        coef, _ = policy.compute(_auto_step(2.0, [], []))
        assert coef.item() == 1.0
    coef, threshold = policy.compute(_auto_step(200.0, [], []))  # a 100x spike
    assert threshold.item() == pytest.approx(10.0, rel=1e-5)
    assert coef.item() == pytest.approx(10.0 / (200.0 + 1e-6), rel=1e-5)
    # the spike entered the baseline only as its clipped value: the cap moved by 5**0.1
    _, threshold = policy.compute(_auto_step(2.0, [], []))
    assert threshold.item() == pytest.approx(10.0 * 5.0 ** 0.1, rel=1e-4)


def test_auto_refreshes_the_parameter_norm_on_schedule():
    w = torch.nn.Parameter(torch.ones(4))  # ||theta|| = 2
    opt = torch.optim.SGD([w], lr=0.1)
    policy = Auto(rho=0.01, param_norm_every=3, warmup_steps=1000)
    policy.setup(1, "cpu")
    thresholds = []
    for i in range(6):
        if i == 1:
            with torch.no_grad():
                w.mul_(2.0)  # ||theta|| = 4, seen at the next refresh (call 3)
        thresholds.append(policy.compute(_auto_step(1.0, [w], [opt]))[1].item())
    assert thresholds == pytest.approx([0.2, 0.2, 0.2, 0.4, 0.4, 0.4], rel=1e-6)


# -- Adam-family optimizers ------------------------------------------------------------


def _adamw(beta2: float = 0.95) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, beta2))


def reference_adaptive(norms: list[float], beta2: float, *, typical_factor: float = 1.0,
                       spike_factor: float = 5.0, warmup_steps: int = 20,
                       drop_spikes: bool = True,
                       max_ramp_steps: int = 100) -> list[tuple[float, float]]:
    """The rule of the class docstring, one step at a time in Python floats: (coef,
    threshold) per step; ``(nan, threshold)`` for a non-finite step (the Guard skips it)."""
    horizon = min(2.0 / (1.0 - beta2), max_ramp_steps)
    log_ema, count, out = 0.0, 0, []
    for g in norms:
        finite = math.isfinite(g)
        log_g = math.log(max(g, 1e-30)) if finite else math.nan
        log_typical = log_g if count == 0 else log_ema
        threshold = typical_factor * min(1.0, (count + 1) / horizon) * math.exp(log_typical)
        if not finite:
            out.append((math.nan, threshold))
            continue
        coef = min(1.0, threshold / (g + 1e-6))
        if drop_spikes and count >= warmup_steps and log_g > log_typical + math.log(spike_factor):
            coef = 0.0
        bound = math.log(spike_factor)
        bounded = min(max(log_g, log_typical - bound), log_typical + bound)
        log_ema = log_g if count == 0 else beta2 * log_typical + (1 - beta2) * bounded
        count += 1
        out.append((coef, threshold))
    return out


def _run_adaptive(policy: Auto, norms: list[float], optimizers) -> list[tuple[float, float]]:
    policy.setup(1, "cpu")
    out = []
    for g in norms:
        coef, threshold = policy.compute(_auto_step(g, [], optimizers))
        out.append((coef.item(), threshold.item()))
    return out


@pytest.mark.parametrize(("make_opt", "beta2"), [
    (lambda: _adamw(0.95), 0.95),
    (lambda: torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 0.9)), 0.9),
    (lambda: torch.optim.RMSprop([torch.nn.Parameter(torch.ones(2))], alpha=0.8), 0.8),
    (lambda: _adamw(0.999), 0.999),  # torch's default: the ramp stops at max_ramp_steps
])
@pytest.mark.parametrize("drop_spikes", [True, False])
def test_adaptive_rule_matches_the_reference(make_opt, beta2, drop_spikes):
    # a decaying norm with 10-100x spikes, a NaN and an inf step, a zero-gradient step
    norms = norm_sequence(120, seed=3, start=3.0, end=0.5, spikes=5, first_spike=15)
    norms[40], norms[41], norms[70] = NAN, math.inf, 0.0
    got = _run_adaptive(Auto(drop_spikes=drop_spikes), norms, [make_opt()])
    want = reference_adaptive(norms, beta2, drop_spikes=drop_spikes)
    for t, ((c, thr), (rc, rthr)) in enumerate(zip(got, want, strict=True)):
        assert thr == pytest.approx(rthr, rel=1e-5), t
        if math.isfinite(norms[t]):
            assert c == pytest.approx(rc, rel=1e-5, abs=1e-7), t
    coefs = [c for c, _ in want]
    assert coefs[0] == pytest.approx(1.0 / min(2.0 / (1.0 - beta2), 100), rel=1e-5)  # ramped
    assert (0.0 in coefs) == drop_spikes  # spikes dropped, or clipped to the typical norm


def test_adaptive_threshold_is_the_typical_norm_after_the_ramp():
    # beta2 = 0.9: the ramp lasts 2 / (1 - 0.9) = 20 steps
    policy = Auto()
    out = _run_adaptive(policy, [2.0] * 30, [_adamw(0.9)])
    assert [thr for _, thr in out[:20]] == pytest.approx([2.0 * (t + 1) / 20 for t in range(20)])
    assert [thr for _, thr in out[20:]] == pytest.approx([2.0] * 10)
    coef, threshold = policy.compute(_auto_step(200.0, [], [_adamw(0.9)]))  # a 100x spike
    assert coef.item() == 0.0 and threshold.item() == pytest.approx(2.0)
    coef, threshold = policy.compute(_auto_step(8.0, [], [_adamw(0.9)]))  # 4x: clipped
    # the spike entered the typical norm only as 5x: it moved by 5 ** (1 - beta2)
    assert threshold.item() == pytest.approx(2.0 * 5.0 ** 0.1, rel=1e-6)
    assert coef.item() == pytest.approx(threshold.item() / (8.0 + 1e-6), rel=1e-6)


def test_adaptive_statistics_skip_nonfinite_steps_and_resume_bitwise():
    norms = norm_sequence(80, seed=5, start=2.0, end=0.4)
    norms[30] = NAN
    opt = [_adamw()]
    a = Auto()
    a.setup(1, "cpu")
    for g in norms[:30]:
        a.compute(_auto_step(g, [], opt))
    before = {k: v.clone() for k, v in a.state_dict()["state"].items()}
    for bad in (NAN, math.inf, -math.inf):
        a.compute(_auto_step(bad, [], opt))
    after = a.state_dict()["state"]
    for k in before:  # a non-finite step never enters the statistics
        assert torch.equal(before[k], after[k]), k
    b = Auto()
    b.load_state_dict(a.state_dict())
    for g in norms[31:]:
        ca, ta = a.compute(_auto_step(g, [], opt))
        cb, tb = b.compute(_auto_step(g, [], opt))
        assert torch.equal(ca.view(torch.int32), cb.view(torch.int32))
        assert torch.equal(ta.view(torch.int32), tb.view(torch.int32))


def test_sgd_rule_is_unchanged_when_sgd_and_adam_are_attached():
    w = torch.nn.Parameter(torch.full((10,), 3.0))
    sgd = torch.optim.SGD([w], lr=0.05, momentum=0.9)
    norms = norm_sequence(60, seed=1)
    alone = _run_adaptive(Auto(), norms, [sgd])
    with_adam = _run_adaptive(Auto(), norms, [sgd, _adamw()])
    assert alone == with_adam
    assert alone[0][0] != pytest.approx(1 / 40)  # not the adaptive ramp


@pytest.mark.parametrize(("optimizers", "expected"), [
    ([_adamw(0.95)], 0.95),
    ([_adamw(0.95), _adamw(0.999)], 0.999),
    ([torch.optim.RMSprop([torch.nn.Parameter(torch.ones(1))])], 0.99),
    ([torch.optim.Adagrad([torch.nn.Parameter(torch.ones(1))])], None),
    ([torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), _adamw()], None),
    ([torch.optim.RMSprop([torch.nn.Parameter(torch.ones(1))], alpha=1.0)], None),
    ([], None),
])
def test_second_moment_decay(optimizers, expected):
    assert second_moment_decay(optimizers) == expected


class _ThirdParty(torch.optim.Optimizer):
    """Stands for an optimizer from another library (bitsandbytes, apex, timm): only its
    param groups' hyper-parameters are read."""

    def __init__(self, **defaults) -> None:
        super().__init__([torch.nn.Parameter(torch.ones(2))], defaults)

    def step(self, closure=None):  # pragma: no cover - never stepped
        return None


@pytest.mark.parametrize(("defaults", "expected"), [
    ({"lr": 1e-3, "betas": (0.9, 0.95)}, 0.95),  # 8-bit AdamW, FusedAdam, LAMB, Lion ...
    ({"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.1}, 0.98),
    ({"lr": 1e-3, "betas": (0.9, 1.0)}, None),  # no decay: no horizon
    ({"lr": 1e-3, "betas": (0.98, 0.92, 0.99)}, None),  # Adan: which beta is v's?
    ({"lr": 1e-3, "betas": (0.9, 0.95), "momentum": 0.9}, None),  # SGD-like
    ({"lr": 1e-3, "betas": ("a", 0.95)}, None),
    ({"lr": 1e-3, "beta2_decay": -0.8}, None),  # Adafactor
    ({"lr": 0.1, "momentum": 0.9}, None),  # a third-party SGD
])
def test_second_moment_decay_of_third_party_optimizers(defaults, expected):
    assert second_moment_decay([_ThirdParty(**defaults)]) == expected


def test_third_party_adam_gets_the_adam_family_rule_bitwise():
    norms = norm_sequence(40, seed=2)
    assert _run_adaptive(Auto(), norms, [_ThirdParty(lr=1e-3, betas=(0.9, 0.95))]) == \
        _run_adaptive(Auto(), norms, [_adamw(0.95)])


def test_adaptive_rule_is_sync_free():
    from torch._subclasses.fake_tensor import FakeTensorMode

    opt = [_adamw()]
    policy = Auto()
    with FakeTensorMode():
        policy.setup(1, "cuda")
        for t in range(30):
            total = torch.rand((), device="cuda") * (math.inf if t == 12 else 1.0)
            coef, thr = policy.compute(StepNorms(total.reshape(1), total, torch.isfinite(total),
                                                 optimizers=opt))
            assert coef.device.type == "cuda" and thr.device.type == "cuda"


def test_auto_validates_its_adaptive_arguments():
    with pytest.raises(ValueError, match="typical_factor"):
        Auto(typical_factor=0.0)
    with pytest.raises(TypeError, match="drop_spikes"):
        Auto(drop_spikes=1)


class _Wrapper(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer: an Optimizer that keeps the real one."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.defaults = optimizer.defaults

    @property
    def param_groups(self):
        return self.optimizer.param_groups


def test_a_wrapped_optimizer_is_read_through_its_inner_one():
    from gradguard._optimizers import unwrap_optimizer
    from gradguard.policies.auto import second_moment_decay, sgd_effective_lr

    adamw = _adamw(0.95)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    assert unwrap_optimizer(_Wrapper(_Wrapper(adamw))) is adamw
    assert unwrap_optimizer(adamw) is adamw
    assert second_moment_decay([_Wrapper(adamw)]) == pytest.approx(0.95)
    assert sgd_effective_lr([_Wrapper(sgd)]) == pytest.approx(1.0)
    # the Adam-family rule, exactly as with the bare optimizer
    norms = norm_sequence(30, seed=1, start=2.0, end=1.0, spikes=0, first_spike=10)
    assert _run_adaptive(Auto(), norms, [_Wrapper(_adamw(0.95))]) == \
        _run_adaptive(Auto(), norms, [_adamw(0.95)])
