"""Tests for gradguard.signal.activations: numerical gains by quadrature, against Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradguard.signal.activations import activation_gain

# --------------------------------------------------------------------------------------
# Numerical gains
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("act", "expected"), [
    ("relu", math.sqrt(2)),  # He
    ("selu", 1.0),  # LeCun: SELU's self-normalising fixed point
    ("tanh", 1.5925),  # ~ torch's 5/3
    ("gelu", 1.5335),
    ("silu", 1.6765),
    ("elu", 1.2452),
    ("mish", 1.4868),
])
def test_variance_gain(act: str, expected: float) -> None:
    assert activation_gain(act) == pytest.approx(expected, abs=2e-4)


def test_variance_gain_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    for act, fn in (("gelu", F.gelu), ("silu", F.silu), ("elu", F.elu), ("mish", F.mish)):
        mc = 1 / fn(z).pow(2).mean().sqrt().item()
        assert activation_gain(act) == pytest.approx(mc, rel=2e-3)


def test_critical_gain_and_modules() -> None:
    # chi_1 = g^2 E[tanh'(z)^2] = 1 at q = 1; tends to 1 as q -> 0
    assert activation_gain("tanh", criterion="critical") == pytest.approx(1.4674, abs=1e-3)
    assert activation_gain("tanh", 1e-4, criterion="critical") == pytest.approx(1.0, abs=1e-3)
    assert activation_gain("relu", 7.0, criterion="critical") == pytest.approx(math.sqrt(2))
    assert activation_gain(nn.LeakyReLU(0.2)) == pytest.approx(math.sqrt(2 / 1.04), rel=1e-6)
    assert activation_gain(nn.GELU()) == activation_gain("gelu")


def test_gain_bad_input() -> None:
    with pytest.raises(ValueError, match="softmaxx"):
        activation_gain("softmaxx")
    with pytest.raises(ValueError, match="q must be"):
        activation_gain("relu", q=0.0)
    with pytest.raises(ValueError, match="criterion"):
        activation_gain("relu", criterion="best")
    with pytest.raises(ValueError, match="Linear"):
        activation_gain(nn.Linear(2, 2))
