"""Threshold policies against hand-written references of the published rules.

The references below are plain Python (floats, lists, numpy.percentile) and mirror the code
described in /work/notes/rules.md: zclip 1.0.0 (section 1), AutoClip's reference
``autoclip.py`` (section 2), AdaGC's Megatron patch (section 3) and torch's
``clip_grad_norm_`` (section 6). They are fed the same recorded norm sequences as the
policies and compared step by step. Further: NaN/inf safety, bitwise ``state_dict``
resume, bounded memory, hypothesis properties, sync-freedom under ``FakeTensorMode`` and
argument validation.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from gradguard.thresholds import (
    AGC,
    AdaGC,
    Auto,
    AutoClip,
    Fixed,
    StepNorms,
    ThresholdPolicy,
    ZClip,
    make_policy,
)

EPS = 1e-6  # torch's, zclip's and AdaGC's epsilon in the clip denominator
NAN = math.nan


# ----- recorded norm sequences --------------------------------------------------------------


def f32(x: float) -> float:
    """``x`` rounded to float32 (the values a policy receives), as a Python float."""
    return float(np.float32(x))


def norm_sequence(n: int, seed: int, *, start: float = 1.0, end: float = 0.3,
                  sigma: float = 0.3, spikes: int = 4, first_spike: int = 30) -> list[float]:
    """Log-normal noise around a level drifting from ``start`` to ``end``, with a few
    10-100x spikes after ``first_spike``; float32 values."""
    rng = np.random.default_rng(seed)
    x = np.geomspace(start, end, n) * np.exp(sigma * rng.standard_normal(n))
    at = rng.choice(np.arange(first_spike, n), size=spikes, replace=False)
    x[at] *= rng.uniform(10.0, 100.0, size=spikes)
    return [float(v) for v in x.astype(np.float32)]


def tensor_norm_sequence(n: int, scales: list[float], seed: int, *, sigma: float = 0.3,
                         spikes: int = 6, first_spike: int = 20) -> list[list[float]]:
    """Per-tensor norms: each tensor drifts around its own scale, with 10-100x spikes on
    random (step, tensor) pairs; float32 values."""
    rng = np.random.default_rng(seed)
    k = len(scales)
    x = (np.geomspace(1.0, 0.4, n)[:, None] * np.asarray(scales)[None, :]
         * np.exp(sigma * rng.standard_normal((n, k))))
    steps = rng.choice(np.arange(first_spike, n), size=spikes, replace=False)
    x[steps, rng.integers(0, k, size=spikes)] *= rng.uniform(10.0, 100.0, size=spikes)
    return [[float(v) for v in row] for row in x.astype(np.float32)]


def total_step(g: float) -> StepNorms:
    """One step of a single-tensor model whose (total) norm is ``g``."""
    total = torch.tensor(g, dtype=torch.float32)
    return StepNorms(norms=total.reshape(1), total=total, finite=torch.isfinite(total))


def tensor_step(norms: list[float], present: list[bool] | None = None) -> StepNorms:
    """One step with per-tensor norms (0 where absent); total = their norm, as the Guard."""
    t = torch.tensor(norms, dtype=torch.float32)
    total = torch.linalg.vector_norm(t)
    pres = None if present is None else torch.tensor(present, dtype=torch.bool)
    return StepNorms(norms=t, total=total, finite=torch.isfinite(total), present=pres)


def run(policy: ThresholdPolicy, steps: list[StepNorms], num_tensors: int = 1,
        device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What the Guard does each step; returns (coef, threshold) per step."""
    policy.setup(num_tensors, device)
    return [tuple(t.clone() for t in policy.compute(s)) for s in steps]


def floats(xs) -> list[float]:
    return [float(x) for x in xs]


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaN == NaN, -0.0 != 0.0)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a, b)
    bits = _BITS.get(a.dtype)
    assert torch.equal(a, b) if bits is None else torch.equal(a.view(bits), b.view(bits)), (a, b)


def assert_same_run(xs, ys) -> None:
    assert len(xs) == len(ys)
    for (c1, t1), (c2, t2) in zip(xs, ys, strict=True):
        assert_bitwise(c1, c2)
        assert_bitwise(t1, t2)


def state_of(policy: ThresholdPolicy) -> dict[str, torch.Tensor]:
    return policy.state_dict()["state"]


# ----- references of the published rules (plain Python) --------------------------------------


def fixed_reference(totals: list[float], max_norm: float) -> list[torch.Tensor]:
    """torch's own coefficient: clip_grads_with_norm_ on a gradient of ones."""
    out = []
    for g in totals:
        p = torch.nn.Parameter(torch.zeros(()))
        p.grad = torch.ones(())
        torch.nn.utils.clip_grads_with_norm_([p], max_norm, torch.tensor(g), foreach=False)
        out.append(p.grad.clone())
    return out


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


# ----- 1. each policy against its reference ---------------------------------------------------


@pytest.mark.parametrize("max_norm", [1.0, 0.5, 0.0, 1e6])
def test_fixed_equals_torch_clip_grad_norm(max_norm):
    totals = [*norm_sequence(200, seed=3), 0.0, max_norm, f32(max_norm * 1.5 + 1.0)]
    ours = run(Fixed(max_norm), [total_step(g) for g in totals])
    for (coef, thr), want in zip(ours, fixed_reference(totals, max_norm), strict=True):
        assert torch.equal(coef, want)  # bitwise: torch's own formula
        assert float(thr) == f32(max_norm)


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


# ----- 2. NaN / inf safety ---------------------------------------------------------------------

NAN_POLICIES = {
    "fixed": (lambda: Fixed(1.0), 1),
    "auto": (Auto, 1),
    "autoclip": (lambda: AutoClip(10.0, window=64), 1),
    "zclip": (ZClip, 1),
    "adagc": (lambda: AdaGC(warmup_steps=50), 4),
}


def _nan_runs(name: str, bad: float, pos: int):
    factory, k = NAN_POLICIES[name]
    if k == 1:
        good = norm_sequence(199, seed=7, spikes=2, first_spike=120)
        steps = [total_step(g) for g in good]
        bad_step = total_step(bad)
        spike = total_step(f32(100 * float(np.median(good[-20:]))))
    else:
        seq = tensor_norm_sequence(199, [0.05, 0.1, 0.2, 0.3], seed=7, spikes=2,
                                   first_spike=120)
        steps = [tensor_step(ns) for ns in seq]
        bad_step = tensor_step([seq[pos][0], bad, seq[pos][2], seq[pos][3]])
        spike = tensor_step([f32(100 * seq[-1][0]), *seq[-1][1:]])
    with_bad = [*steps[:pos], bad_step, *steps[pos:], spike]
    without = [*steps, spike]
    a, b = factory(), factory()
    return a, run(a, with_bad, k), b, run(b, without, k)


@pytest.mark.parametrize("pos", [10, 100])
@pytest.mark.parametrize("bad", [NAN, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", list(NAN_POLICIES))
def test_nonfinite_step_leaves_statistics_untouched(name, bad, pos):
    a, out_a, b, out_b = _nan_runs(name, bad, pos)
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert_bitwise(sa[key], sb[key])  # as if the step never happened
        if sa[key].is_floating_point():
            assert torch.isfinite(sa[key]).all(), key
    # identical coefficients before and after the bad step
    assert_same_run(out_a[:pos], out_b[:pos])
    assert_same_run(out_a[pos + 1:], out_b[pos:])
    # a 100x spike after the bad step is still clipped
    assert float(out_a[-1][0].min()) < 0.1


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


# ----- 3. state_dict round trip ---------------------------------------------------------------

ROUNDTRIP_POLICIES = {
    "fixed": (lambda: Fixed(0.7), 1),
    "auto": (Auto, 1),
    "autoclip": (lambda: AutoClip(25.0, window=16), 1),
    "zclip": (lambda: ZClip(warmup_steps=10), 1),
    "zclip_max_norm": (lambda: ZClip(alpha=0.9, warmup_steps=10, max_norm=0.8), 1),
    "adagc": (lambda: AdaGC(warmup_steps=10), 3),
}


def _roundtrip_steps(k: int) -> list[StepNorms]:
    if k == 1:
        norms = norm_sequence(80, seed=11, first_spike=12)
        norms[3] = NAN  # a skipped step in the saved part
        return [total_step(g) for g in norms]
    seq = tensor_norm_sequence(80, [0.2, 0.5, 1.0], seed=11, first_spike=12)
    steps = [tensor_step(ns) for ns in seq]
    steps[3] = tensor_step([seq[3][0], math.inf, seq[3][2]])
    steps[7] = tensor_step([seq[7][0], 0.0, seq[7][2]], present=[True, False, True])
    return steps


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("k", [5, 37])  # inside the warm-ups / after the ring buffer wrapped
@pytest.mark.parametrize("name", list(ROUNDTRIP_POLICIES))
def test_state_dict_resume_is_bitwise(name, k):
    factory, n = ROUNDTRIP_POLICIES[name]
    steps = _roundtrip_steps(n)
    reference = run(factory(), steps, n)

    first = factory()
    head = run(first, steps[:k], n)
    sd = first.state_dict()
    loaded = _save_load(sd)
    assert loaded["name"] == first.name and loaded["config"] == first.config()

    for sdx, setup_first in [(sd, False), (loaded, False), (loaded, True)]:
        resumed = factory()
        if setup_first:
            resumed.setup(n, "cpu")
        resumed.load_state_dict(sdx)
        assert_same_run(head + run(resumed, steps[k:], n), reference)
    # the saved tensors were clones: continuing the original leaves them as they were
    assert_same_run(head + run(first, steps[k:], n), reference)
    for key, value in sd["state"].items():
        assert_bitwise(value, loaded["state"][key])


def test_state_dict_before_setup_round_trips():
    sd = ZClip().state_dict()
    assert sd["num_tensors"] is None and sd["state"] == {}
    fresh = ZClip()
    fresh.load_state_dict(_save_load(sd))
    assert_same_run(run(fresh, [total_step(1.0)] * 30), run(ZClip(), [total_step(1.0)] * 30))


@pytest.mark.parametrize("name", ["zclip", "autoclip", "adagc", "auto"])
def test_loading_a_never_set_up_state_dict_resets_a_used_policy(name):
    used = make_policy(name)
    run(used, [tensor_step([1.0, 2.0])] * 30, num_tensors=2)
    used.load_state_dict(_save_load(make_policy(name).state_dict()))
    steps = [tensor_step([float(i % 7 + 1), 50.0 if i == 25 else 2.0]) for i in range(40)]
    assert_same_run(run(used, steps, num_tensors=2), run(make_policy(name), steps, num_tensors=2))


def test_agc_round_trip_and_unit_coefficients():
    """AGC is stateless here: the state_dict carries its config; its unit rule is
    NFNets' ``where(g > c*max(w, eps), c*max(w, eps)/g, 1)``."""
    agc = AGC(clipping=0.02, eps=1e-3)
    fresh = AGC(clipping=0.02, eps=1e-3)
    fresh.load_state_dict(_save_load(agc.state_dict()))
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


# ----- 4. bounded memory ----------------------------------------------------------------------


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


@pytest.mark.parametrize("factory", [lambda: ZClip(warmup_steps=5),
                                     lambda: AdaGC(warmup_steps=5)], ids=["zclip", "adagc"])
def test_state_size_constant(factory):
    policy = factory()
    policy.setup(3, "cpu")
    step = tensor_step([0.1, 0.2, 0.3])
    policy.compute(step)
    before = {k: v.numel() for k, v in state_of(policy).items()}
    for _ in range(300):
        policy.compute(step)
    assert {k: v.numel() for k, v in state_of(policy).items()} == before


# ----- 5. properties --------------------------------------------------------------------------

def reals(lo: float, hi: float, **kw) -> st.SearchStrategy[float]:
    # conftest flushes denormals to zero, so hypothesis must not generate them
    return st.floats(lo, hi, allow_nan=False, allow_subnormal=False, **kw)


norm_values = reals(0.0, 1e4, width=32)


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


def _draw_policy(data, kind: str):
    if kind == "autoclip":
        return AutoClip(data.draw(reals(0.0, 100.0)), window=data.draw(st.integers(1, 20)))
    if kind == "zclip":
        return ZClip(alpha=data.draw(reals(0.0, 0.999)),
                     z_thresh=data.draw(reals(0.1, 5.0)),
                     warmup_steps=data.draw(st.integers(1, 5)),
                     max_norm=data.draw(st.none() | reals(0.0, 100.0)))
    if kind == "adagc":
        return AdaGC(rel=data.draw(reals(0.5, 2.0)), beta=data.draw(reals(0.0, 0.999)),
                     warmup_steps=data.draw(st.integers(0, 5)),
                     max_norm=data.draw(reals(0.0, 100.0)))
    return Auto()


@pytest.mark.parametrize("kind", ["autoclip", "zclip", "adagc", "auto"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_policy_properties(kind, data):
    policy = _draw_policy(data, kind)
    k = data.draw(st.integers(1, 4)) if kind == "adagc" else 1
    seq = data.draw(st.lists(st.lists(norm_values, min_size=k, max_size=k),
                             min_size=1, max_size=30))
    policy.setup(k, "cpu")
    for t, ns in enumerate(seq):
        step = tensor_step(ns) if k > 1 else total_step(ns[0])
        if t == len(seq) - 1 and kind != "auto":  # monotone in the norm at a given state
            factor = data.draw(reals(1.0, 100.0))
            bigger = [f32(x * factor) for x in ns]
            big = tensor_step(bigger) if k > 1 else total_step(bigger[0])
            other = copy.deepcopy(policy)
            # AdaGC: seen tensors only (one first seen now starts from its own norm)
            unseen = ~state_of(policy)["seen"] if kind == "adagc" else torch.tensor(False)
            c_big, _ = other.compute(big)
        coef, thr = policy.compute(step)
        assert not torch.isnan(coef).any(), (t, coef)
        assert ((coef >= 0) & (coef <= 1)).all(), (t, coef)
        assert (coef[torch.isnan(thr)] == 1).all()  # no threshold, no clip
        if kind == "adagc" and t >= policy.warmup_steps:
            norm = step.norms  # per tensor
        else:
            norm = step.total.expand_as(coef)  # global (AdaGC's warm-up: on the total)
        below = (norm.double() + EPS <= thr.double()) & ~torch.isnan(thr)
        assert (coef[below] == 1).all(), (t, norm, thr, coef)
    if kind != "auto":
        slack = 1e-5
        if kind == "autoclip":  # the current norm is in its own percentile: q(g)/g does not
            # increase, but q(g)/(g + 1e-6) may, by up to a factor 1 + 1e-6/g
            slack += float(coef) * EPS / max(float(step.total), 1e-30)
        assert ((c_big <= coef + slack) | unseen).all(), (coef, c_big)


@settings(max_examples=60, deadline=None)
@given(seq=st.lists(norm_values, min_size=1, max_size=40))
def test_zclip_never_nan_and_statistics_finite(seq):
    policy = ZClip(warmup_steps=3)
    for coef, _ in run(policy, [total_step(g) for g in seq]):
        assert 0.0 <= float(coef) <= 1.0
    assert math.isfinite(float(policy.mean)) and math.isfinite(float(policy.var))
    assert float(policy.var) >= 0.0


# ----- 6. no host sync (FakeTensorMode, "cuda" on a CPU-only build) ----------------------------

FAKE_POLICIES = {
    "fixed": (lambda: Fixed(1.0), 1),
    "auto": (Auto, 1),
    "autoclip": (lambda: AutoClip(10.0, window=8), 1),
    "zclip": (lambda: ZClip(warmup_steps=3), 1),
    "zclip_max_norm": (lambda: ZClip(warmup_steps=3, max_norm=1.0), 1),
    "adagc": (lambda: AdaGC(warmup_steps=3), 4),
}


def test_fake_mode_detects_host_reads():
    with FakeTensorMode():
        x = torch.ones(3, device="cuda")
        with pytest.raises(DataDependentOutputException):
            x.sum().item()


@pytest.mark.parametrize("name", list(FAKE_POLICIES))
def test_compute_is_sync_free(name):
    factory, k = FAKE_POLICIES[name]
    policy = factory()
    with FakeTensorMode():
        policy.setup(k, "cuda")
        for t in range(30):
            norms = torch.rand(k, device="cuda")
            if t == 12:
                norms = norms * torch.full((k,), math.inf, device="cuda")
            total = torch.linalg.vector_norm(norms)
            present = (torch.rand(k, device="cuda") > 0.2) if k > 1 and t % 3 == 0 else None
            coef, thr = policy.compute(StepNorms(norms, total, torch.isfinite(total), present))
            assert coef.device.type == "cuda" and thr.device.type == "cuda"
            assert coef.shape == ((k,) if policy.per_tensor else ())
        sd = policy.state_dict()
        assert all(v.device.type == "cuda" for v in sd["state"].values())


# ----- 7. validation --------------------------------------------------------------------------


@pytest.mark.parametrize("clip", ["bogus", "", "fixed", "fixed:", "fixed:abc", "zclip2"])
def test_make_policy_bad_name(clip):
    with pytest.raises(ValueError, match="clip"):
        make_policy(clip)


@pytest.mark.parametrize("clip", [True, False, [1.0], b"zclip", torch.tensor(1.0), {}, Fixed])
def test_make_policy_bad_type(clip):
    with pytest.raises(TypeError, match="clip"):
        make_policy(clip)


@pytest.mark.parametrize("clip", [-1.0, math.nan, math.inf, "fixed:-1", "fixed:nan"])
def test_make_policy_bad_number(clip):
    with pytest.raises(ValueError, match=r"clip|max_norm"):
        make_policy(clip)


def test_make_policy_fixed_names_the_real_problem():
    with pytest.raises(ValueError, match=r"clip 'fixed:-1': max_norm must be >= 0"):
        make_policy("fixed:-1")
    with pytest.raises(ValueError, match=r"clip 'fixed:inf': max_norm must be finite"):
        make_policy("fixed:inf")


def test_numpy_scalars_are_accepted():
    assert make_policy(np.float32(0.5)).max_norm == 0.5
    assert AutoClip(window=np.int64(100)).window == 100
    assert type(AutoClip(window=np.int64(100)).window) is int


def test_make_policy_valid():
    assert make_policy(None) is None
    p = ZClip()
    assert make_policy(p) is p
    assert isinstance(make_policy(2), Fixed) and make_policy(2).max_norm == 2.0
    assert make_policy(0.5).max_norm == 0.5
    assert make_policy("fixed:0.25").max_norm == 0.25
    expected = {"auto": Auto, "autoclip": AutoClip, "zclip": ZClip, "adagc": AdaGC, "agc": AGC}
    for name, cls in expected.items():
        assert type(make_policy(name)) is cls
        assert type(make_policy(f"  {name.upper()} ")) is cls


@pytest.mark.parametrize(("build", "exc", "arg"), [
    (lambda: Fixed(-1.0), ValueError, "max_norm"),
    (lambda: Fixed(math.nan), ValueError, "max_norm"),
    (lambda: Fixed(math.inf), ValueError, "max_norm"),
    (lambda: Fixed("1"), TypeError, "max_norm"),
    (lambda: Fixed(True), TypeError, "max_norm"),
    (lambda: ZClip(alpha=1.0), ValueError, "alpha"),
    (lambda: ZClip(alpha=-0.1), ValueError, "alpha"),
    (lambda: ZClip(alpha=math.nan), ValueError, "alpha"),
    (lambda: ZClip(z_thresh=0.0), ValueError, "z_thresh"),
    (lambda: ZClip(z_thresh=-2.5), ValueError, "z_thresh"),
    (lambda: ZClip(warmup_steps=2.5), TypeError, "warmup_steps"),
    (lambda: ZClip(warmup_steps=True), TypeError, "warmup_steps"),
    (lambda: ZClip(warmup_steps=0), ValueError, "warmup_steps"),
    (lambda: ZClip(max_norm=-1.0), ValueError, "max_norm"),
    (lambda: ZClip(max_norm=math.nan), ValueError, "max_norm"),
    (lambda: AutoClip(percentile=100.5), ValueError, "percentile"),
    (lambda: AutoClip(percentile=-1.0), ValueError, "percentile"),
    (lambda: AutoClip(percentile=math.nan), ValueError, "percentile"),
    (lambda: AutoClip(window=0), ValueError, "window"),
    (lambda: AutoClip(window=10.0), TypeError, "window"),
    (lambda: AdaGC(rel=0.0), ValueError, "rel"),
    (lambda: AdaGC(rel=-1.0), ValueError, "rel"),
    (lambda: AdaGC(beta=1.0), ValueError, "beta"),
    (lambda: AdaGC(beta=math.nan), ValueError, "beta"),
    (lambda: AdaGC(warmup_steps=-1), ValueError, "warmup_steps"),
    (lambda: AdaGC(warmup_steps=1.5), TypeError, "warmup_steps"),
    (lambda: AdaGC(max_norm=math.inf), ValueError, "max_norm"),
    (lambda: AGC(clipping=0.0), ValueError, "clipping"),
    (lambda: AGC(eps=-1e-3), ValueError, "eps"),
])
def test_constructor_validation(build, exc, arg):
    with pytest.raises(exc, match=arg):
        build()


def test_load_state_dict_of_another_policy_raises():
    z = ZClip(warmup_steps=2)
    run(z, [total_step(1.0)] * 3)
    for other in (AutoClip(), AdaGC(), Fixed(1.0), Auto(), AGC()):
        with pytest.raises(ValueError, match="zclip"):
            other.load_state_dict(z.state_dict())
    with pytest.raises(ValueError):
        Auto().load_state_dict(Fixed(1.0).state_dict())
    with pytest.raises(ValueError):
        ZClip().load_state_dict({})


def test_load_state_dict_wrong_num_tensors_raises():
    a = AdaGC()
    run(a, [tensor_step([0.1, 0.2])], num_tensors=2)
    b = AdaGC()
    b.setup(3, "cpu")
    with pytest.raises(ValueError, match="tensors"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="tensors"):
        a.setup(5, "cpu")


@pytest.mark.parametrize(("saved", "target"), [
    (lambda: AutoClip(window=8), lambda: AutoClip(window=16)),
    (lambda: ZClip(warmup_steps=5), lambda: ZClip(warmup_steps=10)),
], ids=["autoclip-window", "zclip-warmup_steps"])
def test_load_state_dict_with_other_shape_config_raises(saved, target):
    """A checkpoint whose buffers have another size must be refused at load time, not load
    silently and fail later with an IndexError (a device-side assert on CUDA)."""
    src = saved()
    run(src, [total_step(1.0)] * 3)
    with pytest.raises(ValueError, match=r"window|warmup_steps"):
        target().load_state_dict(src.state_dict())


# ----- 8. AdaGC with tensors that have no gradient ---------------------------------------------


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


# ----- Auto: trust and spike caps ---------------------------------------------------------------

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


def test_adagc_zero_gradient_does_not_pin_the_threshold_at_zero():
    # a tensor with a zero gradient in warm-up (a LoRA factor while its partner is zero)
    policy = AdaGC(warmup_steps=3)
    policy.setup(2, "cpu")
    coefs = run(policy, [tensor_step([0.0, 0.5])] + [tensor_step([0.3, 0.5])] * 6, num_tensors=2)
    assert floats(coefs[-1][0]) == [1.0, 1.0]
    assert state_of(policy)["gamma"][0].item() == pytest.approx(0.3)


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
