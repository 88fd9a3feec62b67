"""Time gradguard.probe on a deep MLP against a plain forward+backward of the same model.

Usage:  python perf/bench_probe.py [--depth 100] [--width 64] [--batch 256] [--repeats 5]
                                          [--threads 1]

The probe traces every layer with hooks, runs the batch forward and backward with a random
cotangent and computes per-layer statistics; the reference is one forward and one backward
of the same model on the same batch (``output.square().mean().backward()``), the least any
gradient measurement has to do. Prints median milliseconds over interleaved repeats and the
ratio to the reference. (The probe's own cost used to be asserted in a test; wall-clock time
depends on the machine and its load, so it is measured here instead.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians

from gradguard import probe


def he_relu_mlp(depth: int, width: int, seed: int = 0) -> nn.Sequential:
    """``depth`` Linear+ReLU layers with He init (a healthy net: the probe's usual case)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def bench(depth: int, width: int, batch: int, repeats: int) -> tuple[float, float, str]:
    """Median seconds of one probe and of one forward+backward, and the probe's verdict."""
    model = he_relu_mlp(depth, width)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    verdicts: list[str] = []
    t = interleaved_medians(
        {"probe": lambda: verdicts.append(probe(model, x).verdict),
         "forward+backward": forward_backward},
        repeats=repeats)
    return t["probe"], t["forward+backward"], verdicts[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[100])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the project's CPU runs use one per process)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved repeats\n")
    print("| model | probe verdict | probe ms | forward+backward ms | ratio |")
    print("|---|---|---:|---:|---:|")
    for depth in args.depth:
        t_probe, t_ref, verdict = bench(depth, args.width, args.batch, args.repeats)
        label = f"{depth}-layer ReLU MLP, width {args.width}, batch {args.batch}"
        print(f"| {label} | {verdict} | {t_probe * 1e3:.1f} | {t_ref * 1e3:.2f} | "
              f"{t_probe / t_ref:.0f}x |")


if __name__ == "__main__":
    main()
