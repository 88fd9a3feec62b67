"""Tests for gradguard.signal.initialize: init_model's schemes, recurrent and residual rules."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradguard.signal.activations import activation_gain
from gradguard.signal.initialize import init_model

# --------------------------------------------------------------------------------------
# Schemes on plain networks
# --------------------------------------------------------------------------------------


def mlp(act: type[nn.Module], depth: int = 6, width: int = 256) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def wvar(lin: nn.Linear) -> float:
    return float(lin.weight.detach().pow(2).mean() * lin.in_features)


def test_auto_relu_is_he_and_zero_bias() -> None:
    model = mlp(nn.ReLU)
    report = init_model(model, "auto")
    for lin in model[::2]:
        assert wvar(lin) == pytest.approx(2.0, rel=0.05)
        assert torch.count_nonzero(lin.bias) == 0
    assert report.entries[0].action.startswith("He for relu (kaiming_normal_")
    assert not report.unhandled


def test_explicit_schemes() -> None:
    model = mlp(nn.Tanh, depth=2, width=128)
    init_model(model, "he")
    assert wvar(model[0]) == pytest.approx(2.0, rel=0.05)
    init_model(model, "xavier")
    assert wvar(model[0]) == pytest.approx(1.0, rel=0.05)  # square: 2/(in+out) * in
    init_model(model, "orthogonal")
    w = model[2].weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(128), atol=1e-5)


def test_auto_tanh_is_orthogonal_and_critical() -> None:
    model = mlp(nn.Tanh, depth=30, width=128)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    report = init_model(model, "auto", data=x)
    hidden = [m for m in model[2:-1] if isinstance(m, nn.Linear)]
    gains = [math.sqrt(wvar(m)) for m in hidden]
    # critical gains: above 1 early, decreasing towards the orthogonal gain 1 with depth
    assert gains[0] == pytest.approx(1.4, abs=0.1)
    assert 1.0 < gains[-1] < gains[0]
    w = hidden[5].weight.detach() / gains[5]
    assert torch.allclose(w @ w.T, torch.eye(128), atol=1e-4)
    assert "critical for tanh" in str(report)


def test_auto_sigmoid_centres_the_mean() -> None:
    model = mlp(nn.Sigmoid, depth=8, width=128)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(0))
    init_model(model, "auto", data=x)
    h = x
    with torch.no_grad():
        for m in model[:-1]:
            h = m(h)
            if isinstance(m, nn.Linear):
                assert abs(float(h.mean())) < 0.1 * float(h.std())  # mean 1/2 removed
    assert math.sqrt(wvar(model[4])) > 3.0  # ~ 4 = 1 / sigmoid'(0)


def test_auto_static_matches_data_driven_roughly() -> None:
    a, b = mlp(nn.GELU, depth=10, width=256), mlp(nn.GELU, depth=10, width=256)
    init_model(a, "auto")
    init_model(b, "auto", data=torch.randn(512, 256))
    for la, lb in zip(a[2:-1:2], b[2:-1:2], strict=True):
        assert wvar(la) == pytest.approx(wvar(lb), rel=0.25)
    assert math.sqrt(wvar(a[4])) == pytest.approx(activation_gain("gelu"), rel=0.05)


def test_lsuv_unit_variance_and_backward_check() -> None:
    model = mlp(nn.ReLU, depth=6, width=64)
    x = torch.randn(256, 64)
    report = init_model(model, "lsuv", data=x)
    h = x
    with torch.no_grad():
        for m in model:
            h = m(h)
            if isinstance(m, nn.Linear):
                assert float(h.var()) == pytest.approx(1.0, rel=0.05)
    assert report.backward_check["verdict"] == "healthy"
    # LSUV fixes only the forward pass: deep tanh lands in the chaotic phase, and says so
    deep = mlp(nn.Tanh, depth=100, width=64)
    with pytest.warns(UserWarning, match="exploding"):
        rep = init_model(deep, "lsuv", data=x)
    assert rep.backward_check["verdict"] == "exploding"


def test_bad_arguments() -> None:
    model = mlp(nn.ReLU, depth=1, width=8)
    with pytest.raises(ValueError, match=r"scheme.*'kaiming'"):
        init_model(model, "kaiming")
    with pytest.raises(ValueError, match=r"residual.*'t-fixup'"):
        init_model(model, residual="t-fixup")
    with pytest.raises(ValueError, match="lsuv"):
        init_model(model, "lsuv")
    with pytest.raises(ValueError, match=r"gpt2.*data"):
        init_model(model, residual="gpt2")
    with pytest.raises(TypeError, match="model"):
        init_model([1, 2], "auto")  # type: ignore[arg-type]


def test_private_generator_and_reproducible() -> None:
    a, b = mlp(nn.ReLU, depth=2, width=16), mlp(nn.ReLU, depth=2, width=16)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    init_model(a, "auto", seed=3)
    init_model(b, "auto", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --------------------------------------------------------------------------------------
# Recurrent, attention, norms, convolutions
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "gates"), [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_per_gate_orthogonal(cls: type[nn.RNNBase], gates: int) -> None:
    h = 32
    rnn = cls(16, h, num_layers=2)
    report = init_model(rnn, "auto")
    for layer in range(2):
        w = getattr(rnn, f"weight_hh_l{layer}").detach()
        for block in w.split(h):
            assert torch.allclose(block @ block.T, torch.eye(h), atol=1e-5)
        b_ih = getattr(rnn, f"bias_ih_l{layer}").detach()
        b_hh = getattr(rnn, f"bias_hh_l{layer}").detach()
        assert torch.count_nonzero(b_hh) == 0
        if gates == 4:
            assert torch.all(b_ih[h:2 * h] == 1) and torch.count_nonzero(b_ih) == h
        else:
            assert torch.count_nonzero(b_ih) == 0
    assert "per-gate" in report.entries[0].action


def test_lstm_cell_per_gate_orthogonal() -> None:
    cell = nn.LSTMCell(8, 16)
    init_model(cell, "orthogonal")
    for block in cell.weight_hh.detach().split(16):
        assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)
    # the bug init_model avoids (one orthogonal_ over the fused (4H, H) matrix) is
    # diagnosed by the probe: tests/test_signal_diagnosis.py


def test_attention_blocks_and_norms() -> None:
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(3.0)
    report = init_model(enc, "auto", data=torch.randn(4, 10, 32))
    attn = enc.layers[0].self_attn
    for block in attn.in_proj_weight.detach().split(32):
        assert float(block.pow(2).mean() * 32) == pytest.approx(1.0, rel=0.2)  # var 1/E
    assert torch.all(enc.layers[0].norm1.weight == 1)
    assert report.residual == "gpt2" and report.n_residual_branches == 4
    out_w = float(attn.out_proj.weight.detach().pow(2).mean() * 32)
    assert out_w == pytest.approx(1.0 / 4, rel=0.25)  # x 1/sqrt(4 branches)


def test_conv_followed_by_bn_relu_is_he() -> None:
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3))
    init_model(cnn, "auto", data=torch.randn(4, 3, 12, 12))
    w = cnn[0].weight.detach()
    assert float(w.pow(2).mean() * 27) == pytest.approx(2.0, rel=0.25)


# --------------------------------------------------------------------------------------
# Residual scalings and unhandled modules
# --------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(w, w), nn.Linear(w, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


def resnet(blocks: int = 8, w: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, w), *[Block(w) for _ in range(blocks)], nn.Linear(w, 4))


@pytest.mark.parametrize("residual", ["gpt2", "fixup", "deepnorm"])
def test_residual_scalings(residual: str) -> None:
    x = torch.randn(128, 16)
    model = resnet(8)
    report = init_model(model, "he", data=x, residual=residual)
    assert report.n_residual_branches == 8 and report.residual == residual
    fc2 = [m.fc2 for m in model[1:-1]]
    fc1 = [m.fc1 for m in model[1:-1]]
    if residual == "gpt2":
        assert all(wvar(m) == pytest.approx(2.0 / 8, rel=0.2) for m in fc2)
        assert all(wvar(m) == pytest.approx(2.0, rel=0.2) for m in fc1)
    elif residual == "fixup":
        assert all(torch.count_nonzero(m.weight) == 0 and torch.count_nonzero(m.bias) == 0
                   for m in fc2)
        assert all(wvar(m) == pytest.approx(2.0 / 8, rel=0.2) for m in fc1)  # 8^(-1/2) squared
    else:
        beta2 = (8 * 4) ** -0.5
        assert all(wvar(m) == pytest.approx(2.0 * beta2, rel=0.2) for m in fc2)
        assert any("alpha" in n for n in report.notes)


def test_auto_applies_gpt2_when_it_finds_branches() -> None:
    model = resnet(8)
    report = init_model(model, "auto", data=torch.randn(64, 16))
    assert report.residual == "gpt2"
    assert init_model(model, "auto", data=torch.randn(64, 16), residual=None).residual is None


def test_unhandled_modules_are_reported() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.zeros(()))
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.alpha * self.lin(x)

    model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.warns(UserWarning, match="left these modules"):
        report = init_model(model, "auto")
    assert report.unhandled and report.unhandled[0][0] == "1"
    assert "alpha" in report.unhandled[0][1]
    with pytest.raises(TypeError, match=r"alpha|Scale"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init_model(model, "auto", strict=True)
    assert "NOT INITIALISED" in str(report)


class BasicBlock(nn.Module):
    """torchvision-style block: the branch ends in BatchNorm, projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def test_bn_resnet_fixup_zeroes_the_last_norm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 16),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    report = init_model(net, "auto", data=torch.randn(4, 3, 8, 8), residual="fixup")
    assert report.n_residual_branches == 3
    for block in net[3:6]:
        assert torch.count_nonzero(block.bn2.weight) == 0  # torchvision's zero_init_residual
        assert torch.all(block.bn1.weight == 1)
    assert float(net[4].down[0].weight.detach().pow(2).mean() * 8) == pytest.approx(2, rel=0.3)


def test_frozen_parameters_are_kept():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 1))
    for p in net[0].parameters():  # a pretrained, frozen first layer
        p.requires_grad_(False)
    net[2].bias.requires_grad_(False)  # and one frozen tensor of a trainable layer
    frozen = [net[0].weight.clone(), net[0].bias.clone(), net[2].bias.clone()]
    trainable = net[2].weight.clone()
    for data in (None, torch.randn(64, 16)):
        report = init_model(net, "auto", data=data)
        assert torch.equal(net[0].weight, frozen[0]) and torch.equal(net[0].bias, frozen[1])
        assert torch.equal(net[2].bias, frozen[2])
        assert not torch.equal(net[2].weight, trainable)
        actions = {e.name: e.action for e in report.entries}
        assert actions["0"] == "kept: frozen (requires_grad=False)"
        assert "1 frozen or tied parameter(s) kept" in actions["2"]


def test_tied_weights_keep_the_first_modules_init():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.head = nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    torch.manual_seed(0)
    model = Tied()
    before = model.emb.weight.clone()
    report = init_model(model, "auto", data=torch.randint(0, 50, (8, 5)))
    assert torch.equal(model.emb.weight, before)
    actions = {e.name: e.action for e in report.entries}
    assert actions["head"] == "kept: tied to a module initialised before"


@pytest.mark.parametrize("with_data", [False, True])
def test_transposed_convolution_after_sigmoid(with_data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Sigmoid(),
                          nn.ConvTranspose2d(16, 8, 4, 2, 1))
    x = torch.randn(32, 3, 8, 8)
    init_model(model, "auto", data=x if with_data else None)
    with torch.no_grad():
        y = model(x)  # the bias removes the sigmoid's mean: outputs centred
    assert abs(float(y.mean())) < 0.25 * float(y.std())


def test_data_errors_name_data():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="data is an empty iterable"):
        init_model(model, data=[])
    with pytest.raises(TypeError, match="data must be"):
        init_model(model, data=5)
