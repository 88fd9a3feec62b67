"""Tests for gradguard.signal.measure: no side effects, determinism, per-layer statistics,
recurrent inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradguard import probe
from signal_utils import VERDICTS, mlp, probe_batch


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return probe_batch()


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True),
                                 nn.Dropout(0.3), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("train", [True, False])
def test_probe_has_no_side_effects(train: bool) -> None:
    torch.manual_seed(0)
    model = BNNet()
    model.net[0].weight.grad = torch.full_like(model.net[0].weight, 7.0)
    model.eval()
    model.net[3].train()  # mixed modes must come back exactly
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    grad = model.net[0].weight.grad.clone()
    inp = torch.randn(32, 16)
    inp_copy = inp.clone()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    report = probe(model, inp, train=train, loss_fn=lambda out: out.pow(2).mean())
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # includes BN running stats and counters
    assert torch.equal(model.net[0].weight.grad, grad)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "net.0.weight")
    assert torch.equal(inp, inp_copy)
    assert report.layers[1].type == "BatchNorm1d"


def test_probe_is_deterministic(x: torch.Tensor) -> None:
    model = mlp(10, nn.ReLU)
    a, b = probe(model, x), probe(model, x)
    assert [lay.bwd_cum for lay in a.layers] == [lay.bwd_cum for lay in b.layers]


def test_cnn_with_inplace_relu_and_pooling() -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    report = probe(cnn, torch.randn(32, 1, 8, 8))
    conv = [lay for lay in report.layers if lay.type == "Conv2d"]
    assert len(conv) == 2 and all(lay.weight_gain == pytest.approx(0.577, rel=0.1) for lay in conv)
    relu = [lay for lay in report.layers if lay.act == "relu"]
    assert all(lay.dead is not None for lay in relu)
    assert report.layers[0].follow == "relu"  # through BatchNorm


def test_probe_handles_packed_sequences():
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(8, 16, batch_first=True)
            self.fc = nn.Linear(16, 1)

        def forward(self, x, lengths):
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                       enforce_sorted=False)
            _, (h, _) = self.rnn(packed)
            return self.fc(h[-1])

    torch.manual_seed(0)
    report = probe(Packed(), (torch.randn(4, 6, 8), torch.tensor([6, 3, 5, 2])))
    assert report.verdict in VERDICTS


def test_rnn_time_gain_uses_the_input_sequence_not_the_initial_state():
    class Seq2Seq(nn.Module):
        def __init__(self, detach: bool) -> None:
            super().__init__()
            self.detach = detach
            self.enc = nn.GRU(8, 32, batch_first=True)
            self.dec = nn.GRU(8, 32, batch_first=True)
            self.fc = nn.Linear(32, 1)

        def forward(self, src, tgt):
            _, h = self.enc(src)
            out, _ = self.dec(tgt, h.detach() if self.detach else h)
            return self.fc(out)

    src, tgt = torch.randn(4, 12, 8), torch.randn(4, 12, 8)
    gains = []
    for detach in (True, False):
        torch.manual_seed(0)
        report = probe(Seq2Seq(detach), (src, tgt), seed=0)
        gains.append(next(lay.time_gain for lay in report.layers if lay.name == "dec"))
    # the decoder's input gradient does not depend on whether h0 requires grad; with it,
    # h0's gradient reaches backward first and must not be taken for the sequence's
    assert gains[0] is not None
    assert gains[1] == pytest.approx(gains[0], rel=1e-5)
