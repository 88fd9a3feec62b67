"""``gradguard demo``: an explosion-prone model trained three ways, side by side.

The experiment is :mod:`gradguard.bench.demo`: the benchmark task ``deep-mlp-digits``
(a 50-layer ReLU MLP without normalisation) at learning rate 0.3, trained from the same
seeds without protection, with ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` and with
``gradguard.Guard(model, clip="auto")``. This command prints its table and writes a
self-contained HTML report with the Guard's post-mortem of the first seed and the probe's
verdict on the initialisation. Nothing is downloaded; it takes about a minute on 2 cores.

Where the outputs go (``--out``): a folder (default ``gradguard-demo``) receives
``report.html`` and the Guard's log ``guard.jsonl``, so the demo leaves one folder behind
and nothing else; a ``FILE.html`` is the report itself, with its log beside it as
``FILE.jsonl``. Both are checked before any training.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from gradguard._paths import names_directory, output_dir, output_file
from gradguard.bench.demo import compare, diagnosis_lines, logged_run, probe_line, results_table
from gradguard.bench.run import init_worker
from gradguard.bench.tasks import TASKS, Task, expand_task_specs, get_task
from gradguard.cli.checks import (
    CLIError,
    missing_extra,
    positive_float,
    positive_int,
    require_extra,
)

__all__ = ["DEFAULT_OUT", "cli_arguments", "cli_main", "output_paths"]

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


def _task_specs() -> list[str]:
    specs: list[str] = []
    for name in TASKS:  # each name, then its variants (spike-injection:nan, ...)
        specs += [name, *(s for s in expand_task_specs([name]) if s not in specs)]
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


def _prepare(spec: str, out: str) -> tuple[Task, Path, Path]:
    """Everything that can be refused, before any training: the outputs, the report's
    matplotlib, the task's data (scikit-learn for the digits tasks)."""
    try:
        report, log = output_paths(out)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    require_extra("matplotlib", "numpy", purpose="the demo's report")
    t = get_task(spec)
    try:
        t.data()
    except ImportError as e:
        raise missing_extra(e, f"the task {spec}") from None
    return t, report, log


def cli_main(args: argparse.Namespace) -> int:
    """Run the demo: print the table, write the report; 0 on success."""
    init_worker()
    t, out, log = _prepare(args.task, args.out)
    t0 = time.perf_counter()
    steps = args.steps or t.steps
    print(f"gradguard demo: {t.spec}, learning rate {args.lr:g}, {steps} steps, "
          f"seeds 0-{args.seeds - 1}")
    print("  " + " ".join((type(t).__doc__ or "").split(".")[0].split()) + ".")
    probe_verdict = probe_line(t.spec, 0)
    print(f"  {probe_verdict}\n")

    runs = compare(t.spec, args.lr, args.seeds, args.steps, args.workers)
    logged, guard = logged_run(t.spec, args.lr, 0, args.steps, log)
    print(results_table(t, runs, Counter(e.kind for e in guard.events)))

    from gradguard.report.run import write_run_report

    path = write_run_report(log, out, title=f"gradguard demo: {t.spec} at lr {args.lr:g}",
                            diagnosis=diagnosis_lines(t, runs, probe_verdict, logged))
    print(f"\nreport: {path}  (Guard log: {log})")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
