"""Tests for gradguard.signal.inputs: batches, iterables and keyword inputs."""

from __future__ import annotations

import torch
from torch import nn

from gradguard import probe
from signal_utils import mlp


def test_batches_and_kwargs() -> None:
    model = mlp(5, nn.Tanh)
    xs = [torch.randn(32, 64) for _ in range(3)]
    r1 = probe(model, xs, n_batches=2)
    r2 = probe(model, xs[0], n_batches=2)
    assert r1.verdict == r2.verdict
    first_two = probe(model, xs[:2], n_batches=2)  # the third batch is not used
    assert [lay.bwd_cum for lay in r1.layers] == [lay.bwd_cum for lay in first_two.layers]
    assert [lay.bwd_cum for lay in r1.layers] != [lay.bwd_cum for lay in r2.layers]

    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.lin(a) * scale

    assert probe(KW(), {"a": torch.randn(8, 4), "scale": 2.0}).verdict == "healthy"
