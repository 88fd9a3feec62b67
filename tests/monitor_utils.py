"""Helpers shared by the monitor's tests: step rows and a synthetic training run."""

from __future__ import annotations

import math

import torch

NAN = math.nan


def fields(
    pre: float,
    post: float | None = None,
    thr: float = math.inf,
    coef: float = 1.0,
    clipped: float = 0.0,
    nonfinite: float = 0.0,
    skipped: float = 0.0,
    loss: float = NAN,
    device: str | None = None,
) -> torch.Tensor:
    """One step's ``fields`` vector, in the order of ``FIELDS``."""
    post = pre if post is None else post
    vals = [pre, post, thr, coef, clipped, nonfinite, skipped, loss]
    return torch.tensor(vals, dtype=torch.float32, device=device)


class Run:
    """A synthetic training run: per-layer norms with log-normal noise around a drifting
    baseline, a fixed clip threshold, and hooks to inject trouble at chosen steps."""

    def __init__(
        self,
        n_layers: int = 24,
        sigma: float = 0.3,
        seed: int = 0,
        zero_layers: tuple[int, ...] = (),
    ) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.n = n_layers
        # Layer scales over three orders of magnitude, like weights vs biases vs norms.
        self.scale = torch.logspace(-3, 0, n_layers, dtype=torch.float64)
        self.scale = self.scale[torch.randperm(n_layers, generator=self.gen)]
        self.sigma = sigma
        self.zero = list(zero_layers)
        self.names = [f"block.{i}.weight" for i in range(n_layers)]

    def norms(self, step: int) -> torch.Tensor:
        drift = 3.0 * math.exp(-step / 700) + 0.5 + 0.2 * math.sin(step / 90)
        noise = torch.exp(self.sigma * torch.randn(self.n, generator=self.gen, dtype=torch.float64))
        per = self.scale * drift * noise
        per[self.zero] = 0.0  # parameters without a gradient: the Guard writes 0
        return per

    @staticmethod
    def pack(
        per: torch.Tensor,
        thr: float = 20.0,
        loss: float = NAN,
        nonfinite: bool = False,
        skipped: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pre = float(per.square().sum().sqrt())
        coef = min(1.0, thr / pre) if math.isfinite(pre) else 1.0
        clipped = math.isfinite(pre) and pre > thr
        nonf = nonfinite or not math.isfinite(pre)
        f = fields(pre, pre * coef, thr, coef, float(clipped), float(nonf), float(skipped), loss)
        return f, per.float()


def strip_time(records: list[dict]) -> list[dict]:
    """Records without their wall-clock ``time``."""
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def nan_equal(a: object, b: object) -> bool:
    """Equality where NaN equals NaN, through lists, tuples and dicts."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(nan_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(nan_equal(a[k], b[k]) for k in a)
    return a == b
