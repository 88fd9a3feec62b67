"""The cost of the monitor's Adam-aware signals, against the AdamW step they watch.

Usage:  python perf/bench_optim_signals.py [--repeats 7]

Two GPT-2-small blocks (width 768, 24 tensors, 14.2M parameters), AdamW (foreach), one
torch thread. Prints, side by side in one process:

* one AdamW step, and one sampled step of the signals (``OptimizerWatch.compute``: the
  per-layer gradient-to-second-moment RMS and update-to-weight ratio), and their ratio:
  the signals run once per monitor interval, so at ``log_every=100`` they add ratio/100
  of an optimizer step per step;
* the monitor's per-step ``observe`` on the other steps, with and without a watched
  optimizer (the signals must cost nothing there).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gradguard.monitor import FIELDS, Monitor
from gradguard.monitor.optim_signals import OptimizerWatch

WIDTH = 768


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _block_shapes(d: int) -> list[tuple[int, ...]]:
    return [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
            (4 * d, d), (d,)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in _block_shapes(WIDTH) * 2]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # the state the signals read
    watch = OptimizerWatch(len(params))
    watch.add(opt, params)
    step = _median_seconds(opt.step, args.repeats)
    signals = _median_seconds(lambda: watch.compute(torch.device("cpu")), args.repeats)
    n = sum(p.numel() for p in params)
    print(f"torch {torch.__version__}, 1 thread, {n / 1e6:.1f}M parameters in {len(params)} "
          f"tensors, median of {args.repeats}")
    print(f"AdamW (foreach) step {step * 1e3:.1f} ms; one sampled step of the signals "
          f"{signals * 1e3:.1f} ms = {signals / step:.2f}x a step "
          f"({signals / step:.2f}% per step at log_every=100)")
    names = [f"p{i}" for i in range(len(params))]
    fields, per_tensor = torch.rand(len(FIELDS)), torch.rand(len(names))
    for watched in (False, True):
        monitor = Monitor(names, log_every=10**6, sinks=[])
        if watched:
            monitor.watch_optimizer(opt, params)

        def observe(m: Monitor = monitor) -> None:
            for s in range(1000):
                m.observe(s, fields, per_tensor)

        per_step = _median_seconds(observe, 5) / 1000
        monitor.buffer.read()
        print(f"observe on a non-interval step, optimizer watched={watched}: "
              f"{per_step * 1e6:.2f} us")


if __name__ == "__main__":
    main()
