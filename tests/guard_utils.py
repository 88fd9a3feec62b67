"""Shared by the Guard tests: a small MLP, its batches and loss, short policy warm-ups,
bitwise state comparison, a training loop."""

from __future__ import annotations

import math

import torch
from torch import nn

import gradguard as gg

POLICIES = [0.5, "autoclip", "zclip", "adagc", "agc", "auto", None]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def batch(i: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(32, 6, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).mul(scale)
    return x, y


def loss_of(model: nn.Module, i: int, scale: float = 1.0) -> torch.Tensor:
    x, y = batch(i, scale)
    return (model(x) - y).pow(2).mean()


def small_warmups(clip):
    """Small warm-ups, so that short tests reach the adaptive rules."""
    if clip == "zclip":
        return gg.ZClip(warmup_steps=5)
    if clip == "adagc":
        return gg.AdaGC(warmup_steps=5)
    return clip


def state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        try:  # bitwise, NaN included (an AutoClip history holds NaN for empty slots)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        except AssertionError:
            return False
        return True
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def train(model, opt, guard, steps, start=0, loss_scale=None):
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        guard.observe_loss(loss if loss_scale is None else loss * loss_scale(i))
        opt.step()
