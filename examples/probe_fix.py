"""Probe before you train: diagnose, fix, and check that the fixed model trains better.

Factories for the command line (``gradguard probe examples/probe_fix.py:deep_relu ...``):

* ``deep_relu``: 20 Linear+ReLU layers with torch's default init (vanishing gradients);
* ``chaotic_tanh``: 100 tanh layers at torch's recommended gain 5/3 (exploding);
* ``residual_mlp``: 20 residual blocks with He on both layers (exploding).

Run as a script to probe ``deep_relu`` (width 32) on scikit-learn digits, fix it, and train
both versions for 200 Adam steps::

    python examples/probe_fix.py

The script trains in float64 on one thread, with seeded initialisation and batches, so that it
prints the same figures on every machine: training a deep ReLU net magnifies rounding
differences (thread count, CPU kernels) about 1e5-fold over 200 steps, which in float32 moves
the final loss in its second digit and in float64 leaves it unchanged to 1e-9.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from gradguard import probe


def deep_relu(depth: int = 20, width: int = 64, d_in: int = 64) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def chaotic_tanh(depth: int = 100, width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(64 if i == 0 else width, width)
        nn.init.xavier_normal_(lin.weight, gain=5 / 3)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


def residual_mlp(blocks: int = 20, width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), *[Block(width) for _ in range(blocks)],
                          nn.Linear(width, 10))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def _train(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, steps: int = 200) -> float:
    """Adam (lr 1e-3) on seeded mini-batches of 128; the loss on all of ``xs`` at the end.

    Adam, not SGD: after the fix, SGD with momentum 0.9 at lr 0.01 trains this net at the edge
    of stability (a loss spike at a step that depends on rounding), and Adam cannot rescue
    the unfixed net either: its first layers' gradients are below Adam's eps.
    """
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (128,), generator=g)
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(xs), ys).item()


def main() -> None:
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    data, target = load_digits(return_X_y=True)
    xs = torch.tensor(data, dtype=torch.float64)
    xs = (xs - xs.mean(0)) / (xs.std(0) + 1e-6)
    ys = torch.tensor(target)

    model = deep_relu(width=32).double()
    broken = copy.deepcopy(model)
    report = probe(model, xs[:256])
    print(report.summary())
    result = report.fix(model)
    print(result)
    print(f"digits, 200 Adam steps: loss {_train(broken, xs, ys):.3f} before the fix, "
          f"{_train(model, xs, ys):.3f} after (chance: ln 10 = 2.303)")


if __name__ == "__main__":
    main()
