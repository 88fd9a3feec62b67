"""Tests for gradguard.signal.tracing: records, functional activations, residual branches."""

from __future__ import annotations

import torch
from torch import nn

from gradguard import probe


def test_transformer_encoder_hooks_fire_in_train_and_eval() -> None:
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 3)
    src = torch.randn(4, 10, 32)
    for train in (True, False):
        enc.train(not train)
        report = probe(enc, src, train=train)
        types = [lay.type for lay in report.layers]
        assert types.count("MultiheadAttention") == 3  # the fused fast path was not taken
        assert types.count("LayerNorm") == 6 and types.count("F.relu") == 3
        assert report.n_residual_branches == 6
        assert report.verdict == "healthy"
        assert enc.training is (not train)
