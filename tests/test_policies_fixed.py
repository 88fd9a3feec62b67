"""gradguard.policies.fixed: torch's ``clip_grad_norm_`` coefficient, bitwise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from gradguard.policies import Fixed
from policy_utils import EPS, f32, norm_sequence, norm_values, run, total_step


def fixed_reference(totals: list[float], max_norm: float) -> list[torch.Tensor]:
    """torch's own coefficient: clip_grads_with_norm_ on a gradient of ones."""
    out = []
    for g in totals:
        p = torch.nn.Parameter(torch.zeros(()))
        p.grad = torch.ones(())
        torch.nn.utils.clip_grads_with_norm_([p], max_norm, torch.tensor(g), foreach=False)
        out.append(p.grad.clone())
    return out


@pytest.mark.parametrize("max_norm", [1.0, 0.5, 0.0, 1e6])
def test_fixed_equals_torch_clip_grad_norm(max_norm):
    totals = [*norm_sequence(200, seed=3), 0.0, max_norm, f32(max_norm * 1.5 + 1.0)]
    ours = run(Fixed(max_norm), [total_step(g) for g in totals])
    for (coef, thr), want in zip(ours, fixed_reference(totals, max_norm), strict=True):
        assert torch.equal(coef, want)  # bitwise: torch's own formula
        assert float(thr) == f32(max_norm)


@settings(max_examples=200, deadline=None)
@given(max_norm=norm_values, a=norm_values, b=norm_values)
def test_fixed_properties(max_norm, a, b):
    policy = Fixed(max_norm)
    policy.setup(1, "cpu")
    ca, ta = policy.compute(total_step(a))
    cb, _ = policy.compute(total_step(b))
    ca, cb = float(ca), float(cb)
    assert 0.0 <= ca <= 1.0 and 0.0 <= cb <= 1.0
    assert ca * a <= max_norm * (1 + 1e-5)
    assert float(ta) == max_norm
    if a + EPS <= max_norm:
        assert ca == 1.0
    if a <= b:  # larger norm, not larger coefficient
        assert cb <= ca
