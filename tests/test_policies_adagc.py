"""gradguard.policies.adagc against AdaGC's Megatron patch (rules.md section 3), tensors
without gradients, zero gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradguard.policies import AdaGC
from policy_utils import NAN, floats, run, state_of, tensor_norm_sequence, tensor_step


def adagc_reference(steps: list[tuple[list[float | None], float]], rel: float, beta: float,
                    warmup: int, max_norm: float, eps: float = 1e-6):
    """AdaGC.clip_by_norm of the Megatron patch (rules.md 3.2). ``steps`` holds per-tensor
    norms (None: the tensor has no gradient) and the total norm. Returns per step the
    per-tensor coefficients and thresholds (None where absent) and gamma after the step."""
    state: dict[int, float] = {}
    t = 0
    out = []
    for norms, total in steps:
        t += 1
        coefs: list[float | None] = [None] * len(norms)
        thrs: list[float | None] = [None] * len(norms)
        if t <= warmup:  # GlobalGC at max_norm; gamma = running min of post-clip norms
            c = max_norm / (total + eps)
            scale = c if c < 1 else 1.0
            for i, n in enumerate(norms):
                if n is None:
                    continue
                n = n * scale
                state[i] = n if i not in state else min(state[i], n)
                coefs[i], thrs[i] = scale, max_norm
        else:
            for i, n in enumerate(norms):
                if n is None:
                    continue
                if i not in state:
                    state[i] = n
                gamma = state[i]
                coef = 1.0
                if n > rel * gamma:  # strict
                    coef = rel * gamma / (n + eps)
                    n = rel * gamma
                state[i] = beta * gamma + (1 - beta) * n
                coefs[i], thrs[i] = coef, rel * gamma
        out.append((coefs, thrs, [state.get(i, NAN) for i in range(len(norms))]))
    return out


def _adagc_compare(policy: AdaGC, seq: list[list[float]], **ref_kw):
    steps = [tensor_step(ns) for ns in seq]
    ours = run(policy, steps, num_tensors=len(seq[0]))
    ref = adagc_reference([(ns, float(s.total)) for ns, s in zip(seq, steps, strict=True)],
                          **ref_kw)
    for t, ((coef, thr), (rc, rt, _)) in enumerate(zip(ours, ref, strict=True)):
        np.testing.assert_allclose(floats(coef), rc, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
        np.testing.assert_allclose(floats(thr), rt, rtol=1e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(floats(policy.gamma), ref[-1][2], rtol=1e-5)
    return ref


@pytest.mark.parametrize(("rel", "beta", "warmup", "max_norm"), [
    (1.04, 0.99, 100, 1.0),  # the released Megatron code and scripts
    (1.05, 0.98, 30, 0.5),  # gradguard's defaults (the brief's published values)
])
def test_adagc_matches_megatron_reference(rel, beta, warmup, max_norm):
    seq = tensor_norm_sequence(300, [0.1, 0.3, 0.6, 1.0], seed=4)
    ref = _adagc_compare(AdaGC(rel, beta, warmup, max_norm), seq, rel=rel, beta=beta,
                         warmup=warmup, max_norm=max_norm)
    assert sum(c < 0.5 for coefs, _, _ in ref[warmup:] for c in coefs) >= 3  # spikes clipped


def test_adagc_matches_reference_with_small_norm_tensors():
    """Per-tensor norms of 1e-6..1e-5 (biases, norms' gains in a large model) must follow
    the reference, which clips only where ``n > rel * gamma``."""
    seq = tensor_norm_sequence(200, [3e-6, 2e-5, 0.5], seed=5)
    _adagc_compare(AdaGC(1.04, 0.99, 20, 1.0), seq, rel=1.04, beta=0.99, warmup=20,
                   max_norm=1.0)


def test_adagc_does_not_clip_at_or_below_its_threshold():
    """The reference leaves a tensor alone when ``n <= rel * gamma`` (strict ``>`` test),
    in particular at steady state and when a tensor is first seen after warm-up."""
    policy = AdaGC(rel=1.05, beta=0.98, warmup_steps=0)
    ours = run(policy, [tensor_step([1e-6, 1e-6 * 1.04, 1.0])] * 20, num_tensors=3)
    for coef, thr in ours:
        assert floats(coef) == [1.0, 1.0, 1.0], (floats(coef), floats(thr))


def test_adagc_absent_tensors_keep_gamma():
    warmup = 20
    seq = tensor_norm_sequence(60, [0.2, 0.4, 0.6], seed=17, first_spike=25)
    absent1 = {3, 4, 25, 26, 27, 50}  # tensor 1 without a gradient, in and after warm-up
    present = [[True, t not in absent1, t >= 30] for t in range(60)]  # tensor 2 first at 30
    steps = [tensor_step([n if p else 0.0 for n, p in zip(ns, ps, strict=True)], ps)
             for ns, ps in zip(seq, present, strict=True)]
    policy = AdaGC(warmup_steps=warmup)
    policy.setup(3, "cpu")
    ref = adagc_reference(
        [([n if p else None for n, p in zip(ns, ps, strict=True)], float(s.total))
         for ns, ps, s in zip(seq, present, steps, strict=True)],
        rel=1.05, beta=0.98, warmup=warmup, max_norm=1.0)
    for t, (step, ps) in enumerate(zip(steps, present, strict=True)):
        before = policy.gamma.clone()
        coef, _ = policy.compute(step)
        for i in range(3):
            if not ps[i]:
                assert torch.equal(policy.gamma[i], before[i]), (t, i)  # unchanged
            else:
                np.testing.assert_allclose(float(policy.gamma[i]), ref[t][2][i], rtol=1e-5)
                np.testing.assert_allclose(float(coef[i]), ref[t][0][i], rtol=1e-5)
        assert bool(state_of(policy)["seen"][2]) == (t >= 30)
    # first seen after warm-up: starts from its own norm, not clipped
    assert ref[30][0][2] == 1.0


def test_adagc_zero_gradient_does_not_pin_the_threshold_at_zero():
    # a tensor with a zero gradient in warm-up (a LoRA factor while its partner is zero)
    policy = AdaGC(warmup_steps=3)
    policy.setup(2, "cpu")
    coefs = run(policy, [tensor_step([0.0, 0.5])] + [tensor_step([0.3, 0.5])] * 6, num_tensors=2)
    assert floats(coefs[-1][0]) == [1.0, 1.0]
    assert state_of(policy)["gamma"][0].item() == pytest.approx(0.3)
