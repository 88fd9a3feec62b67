"""The demo's experiment: an explosion-prone model trained three ways, side by side.

:func:`compare` trains a benchmark task (by default ``deep-mlp-digits``, a 50-layer ReLU
MLP without normalisation on scikit-learn's digits, SGD with momentum 0.9) from the same
seeds

* without protection,
* with ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` after every backward,
* with ``gradguard.Guard(model, clip="auto")`` attached to the optimizer,

in parallel worker processes. :func:`results_table` prints them side by side (diverged or
not, final accuracy, largest gradient norm, steps clipped, the Guard's events);
:func:`logged_run` repeats the Guard's run of one seed with its JSON Lines log for the
report, and :func:`probe_line` gives the probe's verdict on the initialisation. The
command is ``gradguard demo`` (:mod:`gradguard.cli.demo`).

What depends on the machine: the runs are chaotic (a diverging network amplifies every
rounding difference), so the exact accuracies, the largest gradient norm of a diverged run
and which seeds diverge change with the CPU's vector instructions and the thread count.
What holds everywhere: without protection most seeds diverge, torch's clipping at 1.0
ends at the score of the best constant predictor, and the Guard trains well above it
(``tests/test_bench_demo.py``).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from gradguard.bench.run import init_worker, run_one
from gradguard.bench.tasks import Task, get_task

__all__ = ["METHODS", "compare", "diagnosis_lines", "logged_run", "probe_line", "results_table"]

#: (method spec, label) of the three ways the demo trains.
METHODS = (("none", "no protection"), ("clip:1", "torch clip_grad_norm_(1.0)"),
           ("auto", 'gradguard Guard(clip="auto")'))


def _run(job: tuple[str, str, float, int, int | None]) -> dict[str, Any]:
    task, method, lr, seed, steps = job
    result = run_one(task, method, lr, seed, steps)
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
        (:func:`gradguard.bench.run.run_one` results, without the trace).
    """
    jobs = [(task, m, lr, s, steps) for m, _ in METHODS for s in range(seeds)]
    if workers == 1:
        results = [_run(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(workers, initializer=init_worker) as pool:
            results = pool.map(_run, jobs)
    return {m: results[i * seeds:(i + 1) * seeds] for i, (m, _) in enumerate(METHODS)}


def logged_run(
    task: str, lr: float, seed: int, steps: int | None, log: str | Path
) -> tuple[dict[str, Any], Any]:
    """The Guard's run of ``seed`` again, in this process, with its JSON Lines log (the
    same numbers as the worker's run: one thread, same seed).

    Returns:
        ``(result, guard)``: the :func:`~gradguard.bench.run.run_one` result and the
        trained run's :class:`gradguard.Guard` (its events, for the table).
    """
    keep: dict[str, Any] = {}
    result = run_one(task, "auto", lr, seed, steps, log=str(log), keep=keep)
    return result, keep["controller"].guard


def probe_line(task: str, seed: int) -> str:
    """``probe at initialisation: <verdict headline>`` for ``task``'s model from ``seed``
    on its first batch."""
    from gradguard.signal.probe import probe

    t = get_task(task)
    model = t.build_model(seed)
    x, _ = t.new_sampler(t.batch_generator(seed))(0)
    report = probe(model, x)
    return f"probe at initialisation: {report.headline()}"


def _fmt_acc(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def metric_label(task: Task) -> str:
    """What the table calls the task's metric (``test accuracy`` when higher is better)."""
    return "test accuracy" if task.higher_is_better else task.metric_name


def results_table(task: Task, runs: dict[str, list[dict[str, Any]]], events: Counter) -> str:
    """The demo's table: a row per method of :data:`METHODS` and a closing note.

    Args:
        task: the task the runs trained.
        runs: :func:`compare`'s result.
        events: the Guard's events by kind (shown on the Guard's row).

    Returns:
        The lines to print, joined (no trailing newline).
    """
    header = (f"{'method':<30}{'diverged':>9}  {metric_label(task) + ' (mean ± sd)':<26}"
              f"{'max grad norm':>14}{'steps clipped':>15}  events (seed 0)")
    lines = [header, "-" * len(header)]
    for spec, label in METHODS:
        rs = runs[spec]
        div = sum(r["diverged"] for r in rs)
        maxima = [r["norm_stats"]["max"] for r in rs]  # None: no finite norm at all
        max_norm = max((m if m is not None else math.inf) for m in maxima)
        clipped = statistics.mean(r["frac_clipped"] for r in rs)
        ev = (", ".join(f"{k} x{v}" for k, v in sorted(events.items())) or "none") \
            if spec == "auto" else "-"
        lines.append(f"{label:<30}{f'{div}/{len(rs)}':>9}  "
                     f"{_fmt_acc([r['score'] for r in rs]):<26}"
                     f"{max_norm:>14.3g}{clipped:>14.0%}  {ev}")
    lines.append(f"\n(a run that diverged, or ended worse than the best constant predictor, "
                 f"scores that predictor's {task.trivial_metric:.3f}; 'max grad norm' is before "
                 "clipping; exact figures vary with the CPU and thread count)")
    return "\n".join(lines)


def diagnosis_lines(
    task: Task, runs: dict[str, list[dict[str, Any]]], probe_verdict: str,
    logged: dict[str, Any],
) -> list[str]:
    """The lines at the top of the demo's report: the probe's verdict, what each method
    reached, which run the report shows.

    Args:
        task: the task the runs trained.
        runs: :func:`compare`'s result.
        probe_verdict: :func:`probe_line`'s line.
        logged: :func:`logged_run`'s result (the run the report shows).
    """
    seeds = len(runs["none"])
    metric = metric_label(task)

    def mean_score(spec: str) -> float:
        return statistics.mean(r["score"] for r in runs[spec])

    return [
        probe_verdict,
        f"without protection {sum(r['diverged'] for r in runs['none'])}/{seeds} seeds "
        f"diverged; torch's clipping at 1.0 reached {mean_score('clip:1'):.3f}; "
        f"Guard(clip='auto') reached {mean_score('auto'):.3f} ({metric}, mean over "
        f"{seeds} seeds).",
        f"this report: the Guard's run of seed 0 ({metric} {logged['metric']:.3f}).",
    ]
