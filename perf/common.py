"""Shared helpers for the performance scripts: gradient shapes and an interleaved timer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter tensors of GPT-2 small (124M), in torch Linear layout."""
    d, vocab, ctx, ff = 768, 50257, 1024, 3072
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (ff, d), (ff,), (d, ff), (d,)]
    shapes += [(d,), (d,)]
    assert len(shapes) == 148
    return shapes


def many_small_shapes() -> list[tuple[int, ...]]:
    """2,000 tensors of 1,000 elements (as matrices, so unit-wise AGC has rows to work on)."""
    return [(20, 50)] * 2000


SHAPE_SETS = {"gpt2-small": gpt2_small_shapes, "2000x1000": many_small_shapes}


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
        p.grad = torch.randn(s, generator=g) * 1e-3
        params.append(p)
    return params


def interleaved_medians(
    cases: dict[str, Callable[[], object]],
    repeats: int = 9,
    setup: Callable[[], None] | None = None,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds per case; the cases take turns in every repeat, so drift hits all alike.

    ``setup`` runs (untimed) before every timed call, e.g. to restore the gradients.
    """
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(warmup + repeats):
        for name, fn in cases.items():
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def total_numel(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
