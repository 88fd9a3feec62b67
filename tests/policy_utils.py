"""Shared by the policy tests: recorded norm sequences, the steps a Guard would hand a
policy, bitwise comparison of runs. The references of the published rules are in each
policy's test file; they mirror the code described in /work/notes/rules.md."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from hypothesis import strategies as st

from gradguard.policies import StepNorms, ThresholdPolicy

EPS = 1e-6  # torch's, zclip's and AdaGC's epsilon in the clip denominator


NAN = math.nan


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


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def reals(lo: float, hi: float, **kw) -> st.SearchStrategy[float]:
    # conftest flushes denormals to zero, so hypothesis must not generate them
    return st.floats(lo, hi, allow_nan=False, allow_subnormal=False, **kw)


norm_values = reals(0.0, 1e4, width=32)
