"""Tests for gradguard.signal.diagnosis: the causes the probe names, measured on models built
to have them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradguard import probe
from signal_utils import gain, he, mlp, probe_batch, statistics_median


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return probe_batch()


def test_chaotic_tanh_numbers(x: torch.Tensor) -> None:
    """The issue's figure: tanh at 5/3 grows ~1.1x per layer, ~1e4 over 100 layers."""
    report = probe(mlp(100, nn.Tanh, gain(5 / 3)), x)
    assert report.direction == "backward"
    assert 1.07 < report.rate < 1.14
    assert 3e3 < report.backward_gain < 1e5
    cause = report.causes[0]
    assert cause.code == "chaotic_tanh"
    chis = [lay.chi for lay in report.layers if lay.chi is not None]
    assert statistics_median(chis) == pytest.approx(1.2, abs=0.06)


def test_relu_gain_and_gelu_and_sigmoid_causes(x: torch.Tensor) -> None:
    r = probe(mlp(50, nn.ReLU, he(1.2)), x)
    assert r.causes[0].code == "relu_gain" and r.rate == pytest.approx(1.2, abs=0.06)
    assert r.direction == "both"
    g = probe(mlp(100, nn.GELU, he()), x)
    assert g.causes[0].code == "no_stable_fixed_point"
    assert g.rate == pytest.approx(math.sqrt(2) * 0.5, abs=0.03)  # sqrt(2) * gelu'(0)
    s = probe(mlp(30, nn.Sigmoid), x)
    assert s.causes[0].code == "sigmoid"
    means = [lay.mean for lay in s.layers if lay.act == "sigmoid"]
    assert statistics_median(means) == pytest.approx(0.5, abs=0.05)


def test_fused_orthogonal_gates_are_diagnosed() -> None:
    # the bug init_model avoids: one orthogonal_ over the fused (4H, H) matrix
    lstm = nn.LSTM(8, 16)
    nn.init.orthogonal_(lstm.weight_hh_l0)
    blocks = lstm.weight_hh_l0.detach().split(16)
    assert all(float(b.norm() / 4) == pytest.approx(0.5, abs=0.1) for b in blocks)
    report = probe(lstm, torch.randn(10, 4, 8))
    findings = " ".join(report.notes + [c.detail for c in report.causes])
    assert "orthogonal as a whole" in findings
