"""``gradguard demo``: an explosion-prone model trained three ways, side by side.

The default is the benchmark task ``deep-mlp-digits`` (a 50-layer ReLU MLP without
normalisation on scikit-learn's digits, SGD with momentum 0.9) at learning rate 0.3,
trained from the same seeds

* without protection,
* with ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` after every backward,
* with ``gradguard.Guard(model, clip="auto")`` attached to the optimizer,

in parallel worker processes. It prints a table (diverged or not, final accuracy, largest
gradient norm, steps clipped, the Guard's events) and writes a self-contained HTML report
with the Guard's post-mortem of the first seed and the probe's verdict on the
initialisation. Nothing is downloaded; it takes about a minute on 2 cores.

Where the outputs go (``--out``): a folder (default ``gradguard-demo``) receives
``report.html`` and the Guard's log ``guard.jsonl``, so the demo leaves one folder behind
and nothing else; a ``FILE.html`` is the report itself, with its log beside it as
``FILE.jsonl``. Both are checked before any training.

What depends on the machine: the runs are chaotic (a diverging network amplifies every
rounding difference), so the exact accuracies, the largest gradient norm of a diverged run
and which seeds diverge change with the CPU's vector instructions and the thread count.
What holds everywhere: without protection most seeds diverge, torch's clipping at 1.0
ends at the score of the best constant predictor, and the Guard trains well above it
(``tests/test_demo.py``).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gradguard.cli import CLIError, missing_extra, positive_float, positive_int, require_extra

__all__ = ["DEFAULT_OUT", "METHODS", "cli_arguments", "cli_main", "compare", "output_paths"]

#: (method spec, label) of the three ways the demo trains.
METHODS = (("none", "no protection"), ("clip:1", "torch clip_grad_norm_(1.0)"),
           ("auto", 'gradguard Guard(clip="auto")'))
#: The default ``--out``: a folder for the report and the Guard's log.
DEFAULT_OUT = "gradguard-demo"
_REPORT_NAME, _LOG_NAME = "report.html", "guard.jsonl"


def output_paths(out: str) -> tuple[Path, Path]:
    """The report and the Guard log that ``--out`` stands for, checked to be writable.

    Args:
        out: a folder (existing, ending with a separator, or any path that does not end in
            ``.html``/``.htm``), which gets ``report.html`` and ``guard.jsonl``; or the
            report's file name ``FILE.html``, whose log is ``FILE.jsonl`` beside it.

    Returns:
        ``(report, log)``; nothing is created.

    Raises:
        ValueError: naming ``--out``, for a path that cannot be written.
    """
    from gradguard._paths import names_directory, output_dir, output_file

    if not names_directory(out) and Path(out).suffix.lower() in (".html", ".htm"):
        report = output_file(out, name="--out")
        log = output_file(report.with_suffix(".jsonl"), name="--out (the Guard's log)")
        return report, log
    if Path(out).is_file():
        raise ValueError(f"--out {out!r} is an existing file; give a folder (it gets "
                         f"{_REPORT_NAME} and {_LOG_NAME}) or a file name ending in .html")
    folder = output_dir(out, name="--out")
    return (output_file(folder / _REPORT_NAME, name="--out"),
            output_file(folder / _LOG_NAME, name="--out"))


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _run(job: tuple[str, str, float, int, int | None]) -> dict[str, Any]:
    from gradguard.bench import runner

    task, method, lr, seed, steps = job
    result = runner.run_one(task, method, lr, seed, steps)
    result.pop("trace", None)
    return result


def compare(
    task: str, lr: float, seeds: int, steps: int | None = None, workers: int = 1
) -> dict[str, list[dict[str, Any]]]:
    """Train ``task`` from seeds ``0 .. seeds-1`` with each of :data:`METHODS`.

    Args:
        task: a benchmark task spec (:func:`gradguard.bench.tasks.get_task`).
        lr: the learning rate.
        seeds: how many seeds per method.
        steps: training steps per run (``None``: the task's).
        workers: worker processes (spawned, one torch thread each); 1 runs in this process.

    Returns:
        For each method spec of :data:`METHODS`, its runs in seed order
        (:func:`gradguard.bench.runner.run_one` results, without the trace).
    """
    jobs = [(task, m, lr, s, steps) for m, _ in METHODS for s in range(seeds)]
    if workers == 1:
        results = [_run(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            results = pool.map(_run, jobs)
    return {m: results[i * seeds:(i + 1) * seeds] for i, (m, _) in enumerate(METHODS)}


def _logged_run(
    task: str, lr: float, seed: int, steps: int | None, log: Path
) -> tuple[dict[str, Any], Any]:
    """The Guard's run of ``seed`` again, in this process, with its JSONL log (the same
    numbers as the worker's run: one thread, same seed)."""
    from gradguard.bench import runner

    keep: dict[str, Any] = {}
    result = runner.run_one(task, "auto", lr, seed, steps, log=str(log), keep=keep)
    return result, keep["controller"].guard


def _probe_line(task: str, seed: int) -> str:
    from gradguard.bench import tasks
    from gradguard.probe import probe

    t = tasks.get_task(task)
    model = t.build_model(seed)
    x, _ = t.new_sampler(t.batch_generator(seed))(0)
    report = probe(model, x)
    return f"probe at initialisation: {report.headline()}"


def _fmt_acc(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _task_specs() -> list[str]:
    from gradguard.bench import tasks

    specs: list[str] = []
    for name in tasks.TASKS:  # each name, then its variants (spike-injection:nan, ...)
        specs += [name, *(s for s in tasks.expand_task_specs([name]) if s not in specs)]
    return list(dict.fromkeys(specs))


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gradguard demo`` options to ``parser``."""
    specs = _task_specs()
    parser.add_argument("--task", default="deep-mlp-digits", choices=specs, metavar="TASK",
                        help=f"the benchmark task, one of: {', '.join(specs)} "
                             "(default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=0.3,
                        help="learning rate (default: %(default)s)")
    parser.add_argument("--seeds", type=positive_int, default=3,
                        help="seeds per method, 0 .. SEEDS-1 (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="worker processes, one torch thread each (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per run (default: the task's, 300)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR|FILE.html",
                        help=f"a folder for {_REPORT_NAME} and the Guard's log {_LOG_NAME}, "
                             "or the report's FILE.html (its log goes beside it as FILE.jsonl) "
                             "(default: %(default)s)")


def _prepare(spec: str, out: str) -> tuple[Any, Path, Path]:
    """Everything that can be refused, before any training: the outputs, the report's
    matplotlib, the task's data (scikit-learn for the digits tasks)."""
    from gradguard.bench import tasks

    try:
        report, log = output_paths(out)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    require_extra("matplotlib", "numpy", purpose="the demo's report")
    t = tasks.get_task(spec)
    try:
        t.data()
    except ImportError as e:
        raise missing_extra(e, f"the task {spec}") from None
    return t, report, log


def cli_main(args: argparse.Namespace) -> int:
    """Run the demo: print the table, write the report; 0 on success."""
    _init_worker()
    t, out, log = _prepare(args.task, args.out)
    t0 = time.perf_counter()
    steps = args.steps or t.steps
    print(f"gradguard demo: {t.spec}, learning rate {args.lr:g}, {steps} steps, "
          f"seeds 0-{args.seeds - 1}")
    print("  " + " ".join((type(t).__doc__ or "").split(".")[0].split()) + ".")
    probe_line = _probe_line(t.spec, 0)
    print(f"  {probe_line}\n")

    runs = compare(t.spec, args.lr, args.seeds, args.steps, args.workers)
    logged, guard = _logged_run(t.spec, args.lr, 0, args.steps, log)
    events = Counter(e.kind for e in guard.events)

    metric = "test accuracy" if t.higher_is_better else t.metric_name
    header = (f"{'method':<30}{'diverged':>9}  {metric + ' (mean ± sd)':<26}"
              f"{'max grad norm':>14}{'steps clipped':>15}  events (seed 0)")
    print(header)
    print("-" * len(header))
    for spec, label in METHODS:
        rs = runs[spec]
        div = sum(r["diverged"] for r in rs)
        maxima = [r["norm_stats"]["max"] for r in rs]  # None: no finite norm at all
        max_norm = max((m if m is not None else math.inf) for m in maxima)
        clipped = statistics.mean(r["frac_clipped"] for r in rs)
        ev = (", ".join(f"{k} x{v}" for k, v in sorted(events.items())) or "none") \
            if spec == "auto" else "-"
        print(f"{label:<30}{f'{div}/{len(rs)}':>9}  {_fmt_acc([r['score'] for r in rs]):<26}"
              f"{max_norm:>14.3g}{clipped:>14.0%}  {ev}")
    print(f"\n(a run that diverged, or ended worse than the best constant predictor, scores "
          f"that predictor's {t.trivial_metric:.3f}; 'max grad norm' is before clipping; "
          "exact figures vary with the CPU and thread count)")

    from gradguard.report import write_run_report

    def mean_score(spec: str) -> float:
        return statistics.mean(r["score"] for r in runs[spec])

    diagnosis = [
        probe_line,
        f"without protection {sum(r['diverged'] for r in runs['none'])}/{args.seeds} seeds "
        f"diverged; torch's clipping at 1.0 reached {mean_score('clip:1'):.3f}; "
        f"Guard(clip='auto') reached {mean_score('auto'):.3f} ({metric}, mean over "
        f"{args.seeds} seeds).",
        f"this report: the Guard's run of seed 0 ({metric} {logged['metric']:.3f}).",
    ]
    path = write_run_report(log, out, title=f"gradguard demo: {t.spec} at lr {args.lr:g}",
                            diagnosis=diagnosis)
    print(f"\nreport: {path}  (Guard log: {log})")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
