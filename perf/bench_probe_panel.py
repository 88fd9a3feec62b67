"""The probe on the panel of real architectures: verdicts, independent measurements, fixes,
and the probe's wall time per model.

Usage:  python perf/bench_probe_panel.py [--seeds 0] [--threads 2] [--repeats 3]
                                          [--models gpt2 vit ...] [--full-gpt2]

For every model of ``tests/signal_panel.py`` (Hugging Face GPT-2, BERT and Llama from small
configs, a ResNet-18-style CNN, a pre-LN ViT, LSTM language models, and their broken
variants) and every seed, prints one markdown row:

* the independent measurement (plain autograd, not the probe's code): the gradient norm at
  the first block's input over that at the last block's output, the RMS growth between the
  same two points, and for LSTMs the growth through time (last step's cotangent, first over
  last input step);
* the probe's verdict and its gradient gain, the median wall time of ``gg.probe`` over
  ``--repeats`` runs (the issue's budget: 30 s per model on 2 cores);
* after ``report.fix`` (broken models only): the verdict, the number of parameter tensors
  changed and the independent measurement again.

``--full-gpt2`` adds GPT-2 small at its real size (124M parameters, 12 layers, vocabulary
50257, from ``GPT2Config()``) on 2 x 128 tokens: the model of the issue.

``transformers`` is needed for the Hugging Face rows (they are left out without it);
nothing is downloaded. OpenMP threads wait passively (as in the tests): spinning threads
on a shared 2-core machine multiply the wall time.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when OpenMP starts: before torch
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gradguard import probe
from signal_panel import PANEL, Built, stream_gain, time_gain


def _fmt(v: float) -> str:
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.1e}"


def _measure(built: Built) -> str:
    back, fwd = stream_gain(built)
    text = f"grad {_fmt(back)}, act {_fmt(fwd)}"
    if isinstance(built.first, torch.nn.RNNBase):
        whole, _ = time_gain(built)
        text += f", time {_fmt(whole)}"
    return text


def _same_blocks(model: torch.nn.Module, built: Built) -> Built:
    names = {id(m): n for n, m in built.model.named_modules()}
    modules = dict(model.named_modules())
    return Built(model, built.inputs, modules[names[id(built.first)]],
                 modules[names[id(built.last)]])


def gpt2_small(seed: int) -> Built:
    """GPT-2 small at its real size, from ``GPT2Config()``, on 2 x 128 token ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config())
    ids = torch.randint(1, 50257, (2, 128), generator=torch.Generator().manual_seed(seed))
    return Built(model, {"input_ids": ids}, model.transformer.h[0], model.transformer.h[-1])


def row(name: str, seed: int, repeats: int) -> str | None:
    """One markdown row for ``name`` at ``seed`` (None if transformers is missing)."""
    factory, label, needs_hf = PANEL.get(name) or (gpt2_small, "measured", True)
    try:
        built = factory(seed)
    except BaseException as e:  # pytest.importorskip raises Skipped (a BaseException)
        if needs_hf and type(e).__name__ == "Skipped":
            return None
        raise
    before = _measure(factory(seed))
    times, report = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        report = probe(built.model, built.inputs)
        times.append(time.perf_counter() - t0)
    assert report is not None
    probed = f"{report.verdict} ({_fmt(report.backward_gain)})"
    after = "-"
    if report.verdict != "healthy":
        model = copy.deepcopy(built.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # modules left as they were are in the report
            result = report.fix(model)
        after = (f"{result.after.verdict} ({result.changed} tensors); "
                 f"{_measure(_same_blocks(model, built))}")
        if result.restored:
            after += f"; NOT FIXED: {result.reason}"
    return (f"| {name} | {seed} | {label} | {before} | {probed} | "
            f"{statistics.median(times):.2f} | {after} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(PANEL), choices=list(PANEL))
    parser.add_argument("--full-gpt2", action="store_true",
                        help="add GPT-2 small at its real size (124M parameters)")
    args = parser.parse_args()
    if args.full_gpt2:
        args.models.append("gpt2_small_124M")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} probe runs per model (median)")
    print("| model | seed | label | measured (first block in / last block out) | probe "
          "(gradient gain) | probe s | after fix |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for seed in args.seeds:
            line = row(name, seed, args.repeats)
            if line is not None:
                print(line, flush=True)


if __name__ == "__main__":
    main()
