"""Per-step cost of ``Guard.step()`` (monitoring on) against torch's ``clip_grad_norm_``.

Usage:  python perf/bench_guard.py [--repeats 9] [--long-steps 20000]

Two tables:

1. GPT-2-small gradient shapes (148 tensors, 124M parameters): median milliseconds per
   call of ``Guard.step()`` for every policy and of ``torch.nn.utils.clip_grad_norm_``
   (foreach, clipping active), interleaved, gradients restored (untimed) before each
   call so that every call sees the same gradients. Each Guard is warmed up first.
2. Cost after 20,000 steps against cost after 200 (the O(1) claim): the same 148 tensors
   with every dimension divided by 32 (125k parameters, so that the per-step bookkeeping,
   the part that could grow with the step count, dominates), gradients taken from a pool
   of 8 random sets with log-normal scale noise and a 30x spike every 500 steps, timed
   over 200 steps starting at step 200 and at step 20,000.

Every Guard is attached to an SGD optimizer (never stepped), so ``auto`` runs with its
learning-rate-aware cap and its parameter-norm refresh every 100 steps; ``auto`` is timed
a second time attached to AdamW (row "auto, AdamW"), where it runs its rule for Adam-family
optimizers (the optimizer is read each step; no parameter norm).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import gpt2_small_shapes, interleaved_medians, make_params

import gradguard as gg

POLICIES = ["fixed:1.0", "autoclip", "zclip", "adagc", "agc", "auto", None]
#: (label, policy, optimizer) of every timed Guard: each policy with SGD, and auto with AdamW
CASES = [(str(c), c, "sgd") for c in POLICIES] + [("auto, AdamW", "auto", "adamw")]


def _guard(params, clip, optimizer: str = "sgd") -> gg.Guard:
    # Attached to an SGD optimizer so that clip="auto" has its learning-rate-aware cap, or
    # to AdamW for its Adam-family rule (the benchmark calls guard.step() itself and never
    # steps the optimizer).
    guard = gg.Guard(params, clip=clip, sinks=[], log_every=100)
    if optimizer == "adamw":
        return guard.attach(torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95)))
    return guard.attach(torch.optim.SGD(params, lr=1e-3, momentum=0.9))


def gpt2_table(repeats: int, warmup_steps: int = 30) -> list[tuple[str, float, float]]:
    params = make_params(gpt2_small_shapes())
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    guards = {label: _guard(params, c, opt) for label, c, opt in CASES}
    for guard in guards.values():  # past every warm-up that matters for the cost
        for _ in range(warmup_steps):
            restore()
            guard.step()
    cases = {"torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)}
    for name, guard in guards.items():
        cases[name] = guard.step
    t = interleaved_medians(cases, repeats=repeats, setup=restore)
    return [(name, t[name], t[name] / t["torch"]) for name in cases]


def _gradient_pool(params, gen: torch.Generator, size: int = 8) -> list[list[torch.Tensor]]:
    """A few gradient sets drawn once; each step takes one, scaled (drawing 2M normals per
    step would cost ten times the Guard step being measured)."""
    return [[torch.randn(p.shape, generator=gen) * 1e-3 for p in params] for _ in range(size)]


def _set_grads(grad_sets, pool, step: int, gen: torch.Generator) -> None:
    """Give every parameter list the same step's gradients (one pool entry, scaled)."""
    scale = float(torch.exp(0.3 * torch.randn((), generator=gen)))
    if step % 500 == 0:
        scale *= 30.0  # a spike
    for params in grad_sets:
        for p, g in zip(params, pool[step % len(pool)], strict=True):
            p.grad = g * scale


def long_run_table(long_steps: int, window: int = 200) -> list[tuple[str, float, float, float]]:
    """Every policy (and torch's clip as the control) steps in lockstep on its own copy of
    the parameters, so a slow stretch of the machine hits them all in the same window."""
    shapes = [tuple(max(1, d // 32) for d in s) for s in gpt2_small_shapes()]
    names = ["torch clip_grad_norm_"] + [label for label, _, _ in CASES]
    copies = [make_params(shapes) for _ in names]
    steps = [lambda ps=copies[0]: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)]
    steps += [_guard(ps, c, opt).step for ps, (_, c, opt) in zip(copies[1:], CASES, strict=True)]
    gen = torch.Generator().manual_seed(0)
    pool = _gradient_pool(copies[0], gen)
    times = {name: {200: [], long_steps: []} for name in names}
    for step in range(1, long_steps + window):
        _set_grads(copies, pool, step, gen)
        for name, fn in zip(names, steps, strict=True):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            for start, ts in times[name].items():
                if start <= step < start + window:
                    ts.append(dt)
    rows = []
    for name in names:
        early = statistics.median(times[name][200])
        late = statistics.median(times[name][long_steps])
        rows.append((name, early, late, late / early))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--long-steps", type=int, default=20_000)
    parser.add_argument("--skip-long", action="store_true", help="only the GPT-2 table")
    parser.add_argument("--skip-gpt2", action="store_true", help="only the long-run table")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if not args.skip_gpt2:
        print("GPT-2-small shapes (148 tensors, 124.4M), median of "
              f"{args.repeats} interleaved repeats, monitoring on:\n")
        print("| per step | ms | vs torch clip_grad_norm_ |")
        print("|---|---:|---:|")
        for name, t, ratio in gpt2_table(args.repeats):
            label = "torch clip_grad_norm_" if name == "torch" else f"Guard(clip={name})"
            print(f"| {label} | {t * 1e3:.1f} | {ratio:.2f}x |", flush=True)
    if args.skip_long:
        return
    print(f"\nCost after {args.long_steps} steps vs after 200 (148 tensors, dims / 32, "
          "median over 200 steps, all in lockstep):\n")
    print(f"| policy | us/step at 200 | us/step at {args.long_steps} | ratio | ratio / torch's |")
    print("|---|---:|---:|---:|---:|")
    rows = long_run_table(args.long_steps)
    drift = rows[0][3]  # torch's clip does the same work at both points: machine drift
    for name, early, late, ratio in rows:
        label = name if name.startswith("torch") else f"Guard(clip={name})"
        print(f"| {label} | {early * 1e6:.0f} | {late * 1e6:.0f} | {ratio:.2f}x "
              f"| {ratio / drift:.2f}x |")


if __name__ == "__main__":
    main()
