"""gradguard.policies.zclip against a plain-Python port of zclip 1.0.0 (rules.md section 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.policies import ZClip
from policy_utils import NAN, f32, floats, norm_sequence, norm_values, run, total_step


def zclip_reference(norms: list[float], alpha: float = 0.97, z_thresh: float = 2.5,
                    warmup: int = 25, max_norm: float | None = None, eps: float = 1e-6):
    """zclip 1.0.0 ``step`` with mode="zscore", clip_option="adaptive_scaling",
    clip_factor=1 (rules.md 1.2-1.5). Returns (coefs, thresholds, means, vars) per step;
    the threshold is the effective clip value (NaN where nothing clips)."""
    buffer: list[float] = []
    initialized, mean, var = False, None, None
    coefs, thrs, means, variances = [], [], [], []
    for g in norms:
        if not initialized:
            buffer.append(g)  # raw norm
            if len(buffer) >= warmup:  # _initialize_ema: population variance
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
                initialized, buffer = True, []
            if max_norm is not None:  # torch.nn.utils.clip_grad_norm_
                coefs.append(min(1.0, max_norm / (g + 1e-6)))
                thrs.append(max_norm)
            else:
                coefs.append(1.0)
                thrs.append(NAN)
        else:
            std = math.sqrt(var)
            z = (g - mean) / (std + eps)
            c = None
            if z > z_thresh:
                eta = z / z_thresh
                c = mean + z_thresh * std / eta
            adaptive = c if c is not None else g
            eff = min(adaptive, max_norm) if max_norm is not None else adaptive
            coefs.append(eff / (g + 1e-6) if g > eff else 1.0)
            thr = NAN if c is None else c
            if max_norm is not None:
                thr = max_norm if math.isnan(thr) else min(thr, max_norm)
            thrs.append(thr)
            x = c if c is not None else g  # _update_ema
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2  # the NEW mean
        means.append(NAN if mean is None else mean)
        variances.append(NAN if var is None else var)
    return coefs, thrs, means, variances


ZCLIP_CONFIGS = [
    dict(alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=None),  # the paper's rule
    dict(alpha=0.9, z_thresh=2.0, warmup_steps=10, max_norm=None),
    dict(alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=1.0),  # zclip package default
    dict(alpha=0.99, z_thresh=3.0, warmup_steps=5, max_norm=0.5),
]


@pytest.mark.parametrize("cfg", ZCLIP_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("seed", [0, 1])
def test_zclip_matches_reference(cfg, seed):
    norms = norm_sequence(300, seed=seed)
    policy = ZClip(**cfg)
    ours = run(policy, [total_step(g) for g in norms])
    coefs, thrs, means, variances = zclip_reference(
        norms, cfg["alpha"], cfg["z_thresh"], cfg["warmup_steps"], cfg["max_norm"])
    np.testing.assert_allclose(floats(c for c, _ in ours), coefs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(floats(t for _, t in ours), thrs, rtol=1e-5, equal_nan=True)
    # the statistics are fp64 internally: equal to the Python floats up to rounding
    assert policy.mean.dtype == policy.var.dtype == torch.float64
    np.testing.assert_allclose(float(policy.mean), means[-1], rtol=1e-10)
    np.testing.assert_allclose(float(policy.var), variances[-1], rtol=1e-10)
    assert sum(c < 0.5 for c in coefs) >= 3  # the spikes were clipped: the test has teeth


def test_zclip_reference_never_clips_again_after_a_nan():
    """Documents the bug ZClip fixes: zclip 1.0.0 absorbs a NaN norm into its EMA, after
    which every z-score is NaN and no spike is ever clipped."""
    good = norm_sequence(199, seed=7, spikes=0)
    spike = f32(100 * float(np.median(good[-20:])))
    clean = zclip_reference([*good, spike])[0]
    assert clean[-1] < 0.1  # without the NaN, the reference clips the spike
    poisoned, _, means, _ = zclip_reference([*good[:100], NAN, *good[100:], spike])
    assert math.isnan(means[-1])
    assert all(c == 1.0 for c in poisoned[101:])  # never clips again
    ours = run(ZClip(), [total_step(g) for g in [*good[:100], NAN, *good[100:], spike]])
    assert float(ours[-1][0]) < 0.1
    np.testing.assert_allclose(float(ours[-1][0]), clean[-1], rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(seq=st.lists(norm_values, min_size=1, max_size=40))
def test_zclip_never_nan_and_statistics_finite(seq):
    policy = ZClip(warmup_steps=3)
    for coef, _ in run(policy, [total_step(g) for g in seq]):
        assert 0.0 <= float(coef) <= 1.0
    assert math.isfinite(float(policy.mean)) and math.isfinite(float(policy.var))
    assert float(policy.var) >= 0.0
