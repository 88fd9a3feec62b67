"""Self-contained HTML reports: one file, no server, no network.

* :func:`write_run_report` turns a Guard's JSON Lines log into a post-mortem: loss,
  gradient-norm trace with threshold and events, per-layer heatmap, event table.
* :func:`write_bench_report` turns the stability benchmark's ``results.json`` into
  metric-vs-learning-rate plots and the summary tables.

Figures are drawn with matplotlib (``pip install 'gradguard[bench]'``), imported only when
a report is rendered; ``import gradguard.report`` needs nothing beyond gradguard. The
command line equivalent is ``gradguard report RUN.jsonl`` (or a ``results.json``).

Example:
    >>> from gradguard.report import write_run_report
    >>> write_run_report("run.jsonl", "run.html",
    ...                  diagnosis="not a gradient explosion: use warm-up")  # doctest: +SKIP
"""

from gradguard.report.bench import load_bench_results, render_bench_report, write_bench_report
from gradguard.report.run import (
    load_run_log,
    render_run_report,
    summarize_run,
    write_run_report,
)

__all__ = [
    "load_bench_results",
    "load_run_log",
    "render_bench_report",
    "render_run_report",
    "summarize_run",
    "write_bench_report",
    "write_run_report",
]
