"""gradguard.policies.autoclip against AutoClip's reference (rules.md section 2) and its
bounded window."""

from __future__ import annotations

import numpy as np
import pytest

from gradguard.policies import AutoClip
from policy_utils import floats, norm_sequence, run, state_of, total_step


def autoclip_reference(norms: list[float], percentile: float, window: int | None = None):
    """pseeth/autoclip ``autoclip.py``: append the raw norm, then clip_grad_norm_ at
    np.percentile(history, p) (linear). ``window`` keeps the last ``window`` norms only
    (gradguard's documented deviation); None is the original unbounded history."""
    history: list[float] = []
    coefs, thrs = [], []
    for g in norms:
        history.append(g)
        h = history if window is None else history[-window:]
        thr = float(np.percentile(h, percentile))
        coefs.append(min(1.0, thr / (g + 1e-6)))
        thrs.append(thr)
    return coefs, thrs


@pytest.mark.parametrize(("percentile", "window"), [
    (10.0, 1000),  # window >= run length: the original unbounded rule
    (50.0, 1000),
    (0.0, 1000),
    (90.0, 64),  # ring buffer: percentile of the last `window` norms
    (100.0, 7),
    (25.0, 1),
])
def test_autoclip_matches_reference(percentile, window):
    n = 300
    norms = norm_sequence(n, seed=2)
    ours = run(AutoClip(percentile, window=window), [total_step(g) for g in norms])
    coefs, thrs = autoclip_reference(norms, percentile, None if window >= n else window)
    np.testing.assert_allclose(floats(c for c, _ in ours), coefs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(floats(t for _, t in ours), thrs, rtol=1e-5)
    # step 1: the threshold is the norm itself (appended before the percentile)
    assert float(ours[0][1]) == norms[0]


def test_autoclip_memory_bounded_by_window():
    window, percentile = 64, 10.0
    norms = norm_sequence(5000, seed=13, spikes=40)
    policy = AutoClip(percentile, window=window)
    policy.setup(1, "cpu")
    sizes = set()
    for t, g in enumerate(norms):
        _, thr = policy.compute(total_step(g))
        if t in (0, 99, 4999):
            sizes.add(tuple((k, v.numel()) for k, v in state_of(policy).items()))
    assert sizes == {(("history", window), ("count", 1))}
    assert policy.history.numel() == window
    np.testing.assert_allclose(float(thr), np.percentile(norms[-window:], percentile),
                               rtol=1e-6)
