"""gradguard.engine.scaling: the coefficient rules against hand-written references, and the
in-place helpers (CPU skips the identity multiply, NaN still propagates, no host read on
accelerators)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gradguard.engine import scaling
from gradguard.engine.norms import TensorGroups

NORMS = [0.0, 1e-7, 0.5, 1.0, 3.0, 1e6, math.inf, math.nan]


def _rule(t: float, n: float) -> float:
    """torch's rule in float64 arithmetic: min(1, t / (n + 1e-6))."""
    return min(1.0, t / (n + 1e-6)) if not math.isnan(n) else math.nan


@pytest.mark.parametrize("threshold", [0.0, 0.25, 1.0, math.inf, math.nan])
def test_clip_coefficient_is_torchs_rule_and_a_nan_threshold_does_not_clip(threshold):
    norms = torch.tensor(NORMS, dtype=torch.float64)
    got = scaling.clip_coefficient(torch.full_like(norms, threshold), norms).tolist()
    for n, c in zip(NORMS, got, strict=True):
        if math.isnan(threshold):
            assert c == 1.0
        elif math.isnan(n) or (math.isinf(threshold) and math.isinf(n)):
            assert math.isnan(c)  # a NaN norm under a real threshold: NaN, like torch
        else:
            assert c == pytest.approx(_rule(threshold, n), rel=1e-12, abs=0)


def test_strict_coefficient_scales_only_norms_above_the_threshold():
    norms = torch.tensor([1e-8, 0.5, 0.9999, 1.0, 2.0, 4.0, math.nan], dtype=torch.float64)
    got = scaling.strict_clip_coefficient(torch.ones_like(norms), norms).tolist()
    assert got[:4] == [1.0, 1.0, 1.0, 1.0]  # below or at: untouched, even tiny norms
    assert got[4:6] == pytest.approx([1 / (2 + 1e-6), 1 / (4 + 1e-6)], rel=1e-12)
    assert got[6] == 1.0  # (NaN > t is False)
    # torch's clamp rule shrinks a norm below ~1e-6 a little; the strict rule does not
    tiny = torch.tensor([1e-8], dtype=torch.float64)
    assert scaling.clip_coefficient(torch.tensor([1e-8], dtype=torch.float64), tiny) < 1


def test_torch_clip_coefficient_equals_torchs_expression_for_float_and_tensor_limits():
    norms = torch.tensor([0.0, 0.1, 5.25, 3e-7, math.inf], dtype=torch.float32)
    for limit in (0.3, 2.5, 1e6):
        want = torch.clamp(limit / (norms + 1e-6), max=1.0)
        assert torch.equal(scaling.torch_clip_coefficient(limit, norms), want)
        assert torch.equal(scaling.torch_clip_coefficient(torch.tensor(limit), norms), want)


def test_agc_coefficients_follow_the_nfnets_rule():
    g = [torch.tensor([[0.0], [1e-6], [0.5], [3.0]])]
    w = [torch.tensor([[1.0], [0.0], [2.0], [1e-5]])]
    for clipping in (0.02, torch.tensor(0.02)):
        (coef,) = scaling.agc_coefficients(g, w, clipping, 1e-3)
        for gi, wi, ci in zip(g[0].flatten().tolist(), w[0].flatten().tolist(),
                              coef.flatten().tolist(), strict=True):
            limit = 0.02 * max(wi, 1e-3)
            assert ci == pytest.approx(limit / gi if gi > limit else 1.0, rel=1e-6)


def test_mul_skips_unclipped_tensors_on_cpu_but_multiplies_nan():
    a, b, c = torch.ones(3), torch.full((2,), 2.0), torch.ones(4)
    versions = [t._version for t in (a, b, c)]
    with mock.patch.object(torch, "_foreach_mul_", wraps=torch._foreach_mul_) as mul:
        scaling.mul_(TensorGroups([a, b, c]), torch.tensor([1.0, 0.5, math.nan]))
    assert mul.call_count == 1
    assert a._version == versions[0]  # coefficient 1: not written
    assert b.tolist() == [1.0, 1.0] and c.isnan().all()
    scaling.mul_(TensorGroups([a]), torch.tensor(1.0))  # a 0-d coefficient of 1: no-op
    assert a._version == versions[0]


def test_zero_nonfinite_and_div_list():
    t = torch.tensor([1.0, math.nan, math.inf, -math.inf, -2.0])
    scaling.zero_nonfinite_(TensorGroups([t]))
    assert t.tolist() == [1.0, 0.0, 0.0, 0.0, -2.0]
    x, y = torch.full((2,), 4.0), torch.full((2,), 4.0)
    scaling.div_list_([x, y], [torch.tensor(2.0), torch.tensor(1.0)], None)
    assert x.tolist() == [2.0, 2.0] and y.tolist() == [4.0, 4.0]


def test_in_place_helpers_are_sync_free_on_fake_cuda():
    with FakeTensorMode():
        ts = [torch.randn(s, device="cuda") for s in [(30, 40), (40,), (4, 4)]]
        groups = TensorGroups(ts)
        coef = scaling.clip_coefficient(torch.ones(3, device="cuda"), groups.norms(2.0))
        scaling.mul_(groups, coef)
        scaling.mul_(groups, coef.amin())
        scaling.clamp_(groups, torch.tensor(0.5, device="cuda"))
        scaling.zero_nonfinite_(groups)
