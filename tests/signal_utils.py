"""Shared models of the signal-propagation tests: deep MLPs with chosen activations and
initialisations, a residual MLP, and the panel of verdicts they are known to have."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VERDICTS = ("healthy", "exploding", "vanishing")  # the public contract of report.verdict

WIDTH = 64


def probe_batch() -> torch.Tensor:
    """The batch the panel is probed on: 256 x 64, N(0, 1), seed 1."""
    return torch.randn(256, 64, generator=torch.Generator().manual_seed(1))


def mlp(depth: int, act: type[nn.Module], init=None, width: int = WIDTH, d_in: int = 64,
        seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if init is not None:
            init(lin)
        layers += [lin, act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


def he(scale: float = 1.0):
    def f(lin: nn.Linear) -> None:
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        with torch.no_grad():
            lin.weight.mul_(scale)
        nn.init.zeros_(lin.bias)
    return f


def gain(g: float, orthogonal: bool = False):
    def f(lin: nn.Linear) -> None:
        (nn.init.orthogonal_ if orthogonal else nn.init.xavier_normal_)(lin.weight, gain=g)
        nn.init.zeros_(lin.bias)
    return f


class Block(nn.Module):
    """A residual block written as a custom module, with a functional ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


def resmlp(blocks: int = 20, width: int = WIDTH, seed: int = 0) -> nn.Sequential:
    """Residual MLP with He on both layers of every branch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), *[Block(width) for _ in range(blocks)],
                          nn.Linear(width, 10))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


PANEL = {
    "relu_default_20": (lambda: mlp(20, nn.ReLU), "vanishing"),
    "relu_he_20": (lambda: mlp(20, nn.ReLU, he()), "healthy"),
    "relu_1.2he_50": (lambda: mlp(50, nn.ReLU, he(1.2)), "exploding"),
    "tanh_5/3_100": (lambda: mlp(100, nn.Tanh, gain(5 / 3)), "exploding"),
    "tanh_orth1_20": (lambda: mlp(20, nn.Tanh, gain(1.0, True)), "healthy"),
    "tanh_orth1_50": (lambda: mlp(50, nn.Tanh, gain(1.0, True)), "healthy"),
    "sigmoid_30": (lambda: mlp(30, nn.Sigmoid), "vanishing"),
    "gelu_he_100": (lambda: mlp(100, nn.GELU, he()), "vanishing"),
    "residual_he_20": (lambda: resmlp(20), "exploding"),
}


def statistics_median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2]
