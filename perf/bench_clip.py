"""Time gradguard's clipping against torch's, side by side in one process.

Usage:  python perf/bench_clip.py [--repeats 9] [--shapes gpt2-small 2000x1000]

Prints median milliseconds per call over interleaved repeats and the ratio to the
reference. Gradients are restored (untimed) before every call, so "clipping active"
really clips each time. Reference points:

* clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ (foreach), clipping active and
  inactive (gradguard skips the multiply on CPU when nothing is clipped);
* clip_grad_agc_ vs torch's global clip (AGC must also read the parameters: its floor is
  about 4/3 of torch's 3 passes) and vs a straightforward per-parameter loop (timm style).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SHAPE_SETS, interleaved_medians, make_params, total_numel

import gradguard as gg


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def agc_per_parameter_loop(params, clipping: float = 0.01, eps: float = 1e-3) -> None:
    """The straightforward per-parameter AGC loop (as in timm's ``adaptive_clip_grad``)."""
    for p in params:
        if p.grad is None:
            continue
        max_norm = _unitwise_norm(p.detach()).clamp_(min=eps).mul_(clipping)
        grad_norm = _unitwise_norm(p.grad.detach())
        clipped = p.grad * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, p.grad, clipped))


def bench(shape_set: str, repeats: int) -> list[tuple[str, float, str, float]]:
    params = make_params(SHAPE_SETS[shape_set]())
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    norm = float(torch.nn.utils.get_total_norm(grads))
    active, inactive = 0.5 * norm, 10.0 * norm
    # AGC threshold chosen so that about half of the units are clipped.
    ratio = torch.cat([(gn / wn.clamp_min(1e-3)).flatten() for gn, wn in zip(
        gg.unit_norms(grads), gg.unit_norms([p.detach() for p in params]), strict=True)])
    agc_clip = float(ratio.median())

    cases = {
        "torch clip (active)": lambda: torch.nn.utils.clip_grad_norm_(params, active, foreach=True),
        "gradguard clip (active)": lambda: gg.clip_grad_norm_(params, active),
        "torch clip (inactive)": lambda: torch.nn.utils.clip_grad_norm_(
            params, inactive, foreach=True),
        "gradguard clip (inactive)": lambda: gg.clip_grad_norm_(params, inactive),
        "gradguard agc": lambda: gg.clip_grad_agc_(params, clipping=agc_clip),
        "per-parameter agc loop": lambda: agc_per_parameter_loop(params, clipping=agc_clip),
    }
    t = interleaved_medians(cases, repeats=repeats, setup=restore)
    return [
        ("clip_grad_norm_, clipping active", t["gradguard clip (active)"],
         "torch clip_grad_norm_", t["torch clip (active)"]),
        ("clip_grad_norm_, nothing clipped", t["gradguard clip (inactive)"],
         "torch clip_grad_norm_", t["torch clip (inactive)"]),
        ("clip_grad_agc_", t["gradguard agc"], "torch clip_grad_norm_ (active)",
         t["torch clip (active)"]),
        ("clip_grad_agc_", t["gradguard agc"], "per-parameter AGC loop",
         t["per-parameter agc loop"]),
    ], total_numel(params), len(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPE_SETS), choices=list(SHAPE_SETS))
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved repeats\n")
    print("| shapes | gradguard | ms | reference | ms | ratio |")
    print("|---|---|---:|---|---:|---:|")
    for shape_set in args.shapes:
        rows, numel, n = bench(shape_set, args.repeats)
        label = f"{shape_set} ({n} tensors, {numel / 1e6:.1f}M)"
        for ours, t_ours, ref, t_ref in rows:
            print(f"| {label} | {ours} | {t_ours * 1e3:.2f} | {ref} | {t_ref * 1e3:.2f} | "
                  f"{t_ours / t_ref:.2f}x |")


if __name__ == "__main__":
    main()
