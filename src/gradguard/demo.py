"""``gradguard demo``: the smallest honest demonstration of the norm engine.

Builds an explosion-prone deep ReLU MLP, computes its gradients on one batch, and clips
them three ways: torch's ``clip_grad_norm_`` and gradguard's, in fp32 and in fp16, and
gradguard's AGC. Prints the total norm each reports and the norm left after clipping.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import gradguard as gg


def _model(depth: int, width: int, gain: float, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.normal_(0.0, gain * (2.0 / width) ** 0.5, generator=g)
            lin.bias.zero_()
        layers += [lin, nn.ReLU()]
    head = nn.Linear(width, 1)
    with torch.no_grad():
        head.weight.normal_(0.0, width**-0.5, generator=g)
        head.bias.zero_()
    return nn.Sequential(*layers, head)


def _grads(model: nn.Module, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(256, model[0].in_features, generator=g)
    model.zero_grad(set_to_none=True)
    model.float()
    model(x).pow(2).mean().backward()
    model.to(dtype)  # casts .grad too: the gradients torch would see under fp16 training


def _after(model: nn.Module) -> float:
    return float(gg.get_total_norm([p.grad for p in model.parameters()]))


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=30, help="number of hidden layers")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--gain", type=float, default=1.15, help="init gain over He (1.0 = He)")
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def cli_main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    rows = []
    for label, dtype, fn in [
        ("torch clip_grad_norm_", torch.float32, torch.nn.utils.clip_grad_norm_),
        ("gradguard clip_grad_norm_", torch.float32, gg.clip_grad_norm_),
        ("torch clip_grad_norm_", torch.float16, torch.nn.utils.clip_grad_norm_),
        ("gradguard clip_grad_norm_", torch.float16, gg.clip_grad_norm_),
        ("gradguard clip_grad_agc_", torch.float32, None),
    ]:
        model = _model(args.depth, args.width, args.gain, args.seed)
        _grads(model, dtype, args.seed)
        t0 = time.perf_counter()
        if fn is None:
            before = gg.clip_grad_agc_(model.parameters(), clipping=0.01)
        else:
            before = fn(model.parameters(), args.max_norm)
        dt = (time.perf_counter() - t0) * 1e3
        rows.append((label, str(dtype).removeprefix("torch."), float(before), _after(model), dt))
    print(
        f"{args.depth}-layer ReLU MLP, width {args.width}, init {args.gain} x He: "
        f"gradients of one batch, max_norm={args.max_norm}\n"
    )
    print(f"{'method':<28}{'dtype':<10}{'norm before':>14}{'norm after':>14}{'ms':>8}")
    for label, dt_name, before, after, ms in rows:
        print(f"{label:<28}{dt_name:<10}{before:>14.4g}{after:>14.4g}{ms:>8.2f}")
    print(
        "\nIn fp16 torch computes the norm in fp16: it overflows to inf and every gradient is"
        " zeroed.\ngradguard accumulates in fp32, reports the true norm and clips to max_norm."
    )
    return 0
