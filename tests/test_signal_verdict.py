"""Tests for gradguard.signal.verdict: chosen modules, gated signals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradguard import probe
from signal_utils import Block, he, mlp, probe_batch, resmlp


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return probe_batch()


def test_residual_blocks_as_chosen_modules(x: torch.Tensor) -> None:
    report = probe(resmlp(20), x, modules=Block)
    assert [lay.type for lay in report.layers] == ["Block"] * 20
    assert report.verdict == "exploding"
    assert report.rate == pytest.approx(math.sqrt(3), rel=0.1)  # 1 + Var(branch)/Var(stream)


def test_zero_initialised_head() -> None:
    model = mlp(8, nn.ReLU, he())
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    report = probe(model, torch.randn(64, 64))
    assert report.verdict == "healthy"
    linears = [lay for lay in report.layers if lay.type == "Linear"]
    assert all(lay.bwd_cum and lay.bwd_cum > 0.05 for lay in linears[:-1])
    assert linears[-1].bwd_gain == 0.0
    assert any("zero-initialised" in n for n in report.notes)
