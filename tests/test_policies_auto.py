"""gradguard.policies.auto: the trust cap (rho ||theta|| / lr_eff) and the spike cap."""

from __future__ import annotations

import math

import pytest
import torch

from gradguard.policies import Auto, StepNorms


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


def test_auto_has_no_trust_cap_for_adaptive_optimizers_or_without_optimizer():
    w = torch.nn.Parameter(torch.ones(4))
    for optimizers in ([torch.optim.Adam([w])], []):
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
