"""gradguard.policies.agc: the NFNets unit rule, through ``unit_coefficients`` and
``compute``."""

from __future__ import annotations

import math

import pytest
import torch

from gradguard.policies import AGC, StepNorms
from policy_utils import floats, save_load


def test_agc_round_trip_and_unit_coefficients():
    """AGC is stateless here: the state_dict carries its config; its unit rule is
    NFNets' ``where(g > c*max(w, eps), c*max(w, eps)/g, 1)``."""
    agc = AGC(clipping=0.02, eps=1e-3)
    fresh = AGC(clipping=0.02, eps=1e-3)
    fresh.load_state_dict(save_load(agc.state_dict()))
    g = [torch.tensor([0.0, 1e-6, 1e-4, 0.1, 5.0]), torch.tensor([3.0])]
    w = [torch.tensor([1.0, 0.0, 1e-2, 2.0, 1.0]), torch.tensor([1e-5])]
    ours = agc.unit_coefficients(g, w)
    assert all(torch.equal(x, y) for x, y in zip(ours, fresh.unit_coefficients(g, w),
                                                   strict=True))
    for gn, wn, coef in zip(g, w, ours, strict=True):
        for gi, wi, ci in zip(floats(gn), floats(wn), floats(coef), strict=True):
            limit = 0.02 * max(wi, 1e-3)
            want = limit / max(gi, 1e-6) if gi > limit else 1.0
            assert ci == pytest.approx(want, rel=1e-6)


def test_agc_compute_takes_unit_norms_from_the_step():
    """``compute`` gives the coefficients of ``unit_coefficients`` for the step's unit norms,
    and a NaN threshold; without unit norms it refuses."""
    agc = AGC(clipping=0.02, eps=1e-3)
    g = [torch.tensor([[0.5], [1e-6]]), torch.tensor([3.0]).reshape(1, 1)]
    w = [torch.tensor([[1.0], [2.0]]), torch.tensor([1e-5]).reshape(1, 1)]
    total = torch.tensor(3.1)
    step = StepNorms(norms=torch.tensor([0.5, 3.0]), total=total, finite=torch.tensor(True),
                     unit_norms=g, param_unit_norms=w)
    coefs, threshold = agc.compute(step)
    assert all(torch.equal(a, b) for a, b in zip(coefs, agc.unit_coefficients(g, w),
                                                   strict=True))
    assert floats(coefs[0].flatten()) == pytest.approx([0.02 / 0.5, 1.0])
    assert math.isnan(float(threshold))
    with pytest.raises(TypeError, match="unit"):
        agc.compute(StepNorms(norms=torch.ones(2), total=total, finite=torch.tensor(True)))
