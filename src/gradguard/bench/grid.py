"""The benchmark grid: tasks x methods x learning rates x seeds, in parallel worker processes.

:func:`run_grid` plans the runs (:func:`plan`: longest first, meta-methods expanded,
methods whose optional package is missing skipped with a message), runs them in a
``multiprocessing`` pool (``spawn`` context; every worker uses one torch thread and
flushes denormals, see :func:`gradguard.bench.run.init_worker`), shows a progress bar, and
appends each result to ``runs.jsonl`` as it arrives, so an interrupted grid can be
resumed. The results (:func:`build_results`) are aggregated by
:mod:`gradguard.bench.table`, which writes ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradguard.bench.diagnose import diagnose_task
from gradguard.bench.methods import expand_method_specs, get_method, unavailable_message
from gradguard.bench.run import init_worker, run_one
from gradguard.bench.table import (
    aggregate,
    fault_summary,
    jsonable,
    spike_summary,
    write_outputs,
)
from gradguard.bench.taskbase import Task
from gradguard.bench.tasks import expand_task_specs, get_task

__all__ = ["DEFAULT_LRS", "SCHEMA", "GridConfig", "Job", "build_results", "plan", "run_grid",
           "task_lrs"]

DEFAULT_LRS: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
#: The ``schema`` field of ``results.json``.
SCHEMA = "gradguard.bench/1"
# Relative CPU cost of one run, to start the longest runs first (better load balance).
_COST = {"charlm-postln": 5.0, "gpt": 4.0, "adding-rnn": 3.0, "deep-mlp-digits": 3.0,
         "spike-injection": 3.0, "deep-linear": 1.0}


@dataclass(frozen=True)
class Job:
    """One training run of the grid."""

    task: str
    method: str
    lr: float
    seed: int
    steps: int | None = None  # None: the task's default
    full_trace: bool = False

    def key(self) -> tuple[str, str, float, int, int | None]:
        return (self.task, self.method, self.lr, self.seed, self.steps)


def _run_job(job: Job) -> dict[str, Any]:
    try:
        return run_one(job.task, job.method, job.lr, job.seed, job.steps,
                       full_trace=job.full_trace)
    except Exception as e:  # one broken run must not lose the grid
        return {"task": job.task, "method": job.method, "lr": job.lr, "seed": job.seed,
                "steps": job.steps, "error": f"{type(e).__name__}: {e}"}


@dataclass
class GridConfig:
    """A benchmark grid.

    Attributes:
        tasks: task specs (``spike-injection`` expands to its variants).
        methods: method specs (``tuned`` and ``default`` expand).
        lrs: the learning-rate grid (tasks with a fixed ``lrs`` use those); ``None``: each
            task's own grid (``Task.default_lrs``), else :data:`DEFAULT_LRS`.
        seeds: the seeds.
        steps: training steps per run (``None``: each task's).
        workers: worker processes (``1``: in this process).
        full_trace_methods: methods whose runs keep every step's loss and norm.
    """

    tasks: Sequence[str] = ("all",)
    methods: Sequence[str] = ("default",)
    lrs: Sequence[float] | None = None
    seeds: Sequence[int] = (0, 1, 2)
    steps: int | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    full_trace_methods: Sequence[str] = ()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.lrs is not None and (not self.lrs or any(
            not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0 for x in self.lrs
        )):
            raise ValueError(f"lrs must be finite numbers > 0, got {list(self.lrs)!r}")
        if not self.seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds
        ):
            raise ValueError(f"seeds must be ints >= 0, got {list(self.seeds)!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        for name, values in (("lrs", self.lrs or ()), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value, got {list(values)!r}")


def task_lrs(task: Task, lrs: Sequence[float] | None) -> tuple[float, ...]:
    """The learning rates ``task`` runs at in a grid whose learning rates are ``lrs``: the
    task's fixed ``lrs`` if it has them, else ``lrs``, else the task's own grid, else
    :data:`DEFAULT_LRS`."""
    if task.lrs is not None:
        return tuple(task.lrs)
    if lrs is not None:
        return tuple(lrs)
    return tuple(task.default_lrs if task.default_lrs is not None else DEFAULT_LRS)


def plan(config: GridConfig) -> tuple[list[Job], dict[str, Any]]:
    """The jobs of a grid (longest first) and what was expanded or skipped.

    Returns:
        ``(jobs, info)`` with ``info = {"tasks", "methods", "metas", "skipped"}``:
        canonical task and method specs, the meta-methods' expansions, and messages for
        methods skipped because an optional package is missing.
    """
    config.validate()
    task_specs = expand_task_specs(config.tasks)
    method_specs, metas = expand_method_specs(config.methods)
    full_specs, _ = expand_method_specs(config.full_trace_methods)
    full = {get_method(s).spec for s in full_specs}
    skipped = []
    runnable = []
    for s in method_specs:
        if get_method(s).definition.available():
            runnable.append(s)
        else:
            skipped.append(unavailable_message(s))
    jobs = []
    for ts in task_specs:
        lrs = task_lrs(get_task(ts), config.lrs)
        for ms in runnable:
            for lr in lrs:
                for seed in config.seeds:
                    jobs.append(Job(ts, ms, float(lr), int(seed), config.steps, ms in full))
    jobs.sort(key=lambda j: -_COST.get(j.task.partition(":")[0], 1.0))
    return jobs, {"tasks": task_specs, "methods": runnable, "metas": metas, "skipped": skipped}


class _Progress:
    """A rich progress bar when rich is installed and the stream is a terminal; plain
    lines (every ~5%) otherwise."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()
        self._rich: Any = None
        self._next_pct = 0
        if not enabled:
            return
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            return
        if sys.stderr.isatty():
            self._rich = Progress(
                TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.description}"), transient=False,
            )
            self._rich.start()
            self._id = self._rich.add_task("", total=total)

    def update(self, result: dict[str, Any]) -> None:
        self.done += 1
        if not self.enabled:
            return
        label = f"{result['task']} {result['method']} lr={result['lr']:g} seed={result['seed']}"
        if self._rich is not None:
            self._rich.update(self._id, advance=1, description=label)
            return
        pct = 100 * self.done // max(self.total, 1)
        if pct >= self._next_pct or self.done == self.total:
            el = time.perf_counter() - self.t0
            eta = el / self.done * (self.total - self.done)
            print(f"[bench] {self.done}/{self.total} ({pct}%) {el:.0f}s elapsed, "
                  f"eta {eta:.0f}s  last: {label}", file=sys.stderr, flush=True)
            self._next_pct = pct + 5

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def _iter_results(jobs: list[Job], workers: int) -> Iterator[dict[str, Any]]:
    if workers == 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        init_worker()
        try:
            for job in jobs:
                yield _run_job(job)
        finally:
            torch.set_num_threads(threads)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs)), initializer=init_worker) as pool:
        yield from pool.imap_unordered(_run_job, jobs, chunksize=1)


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def _run_key(r: dict[str, Any]) -> tuple[str, str, float, int, int | None]:
    steps = r.get("steps_requested", r.get("steps"))
    return (r["task"], r["method"], float(r["lr"]), int(r["seed"]), steps)


def _resumed(jobs: list[Job], jsonl: Path, log: Callable[[str], None]
             ) -> tuple[list[dict[str, Any]], list[Job]]:
    """The runs of ``jsonl`` that stand for jobs of this grid, and the jobs left to run."""
    # a run saved without full traces cannot stand in for one that asks for them
    wanted = {j.key(): j.full_trace for j in jobs}
    old = [r for r in _load_jsonl(jsonl) if "error" not in r and _run_key(r) in wanted
           and ("full" in r or not wanted[_run_key(r)])]
    have = {_run_key(r) for r in old}
    if old:
        log(f"resuming: {len(old)} runs reused from {jsonl}")
    return old, [j for j in jobs if j.key() not in have]


def run_grid(
    config: GridConfig,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    resume: bool = False,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, Any]:
    """Run a grid, aggregate it, and (with ``out_dir``) write the outputs.

    With ``config.workers == 1`` the runs execute in this process, with one torch thread
    (restored afterwards) and denormals flushed (left on); otherwise in a ``spawn`` pool.

    Args:
        config: the grid.
        out_dir: where ``runs.jsonl``, ``results.json`` and ``table.md`` go (``None``:
            nothing is written).
        progress: show a progress bar.
        resume: reuse the runs already in ``out_dir/runs.jsonl`` (same task, method,
            lr, seed, steps and full traces or not) instead of running them again.
        log: where messages (skipped methods) go.

    Returns:
        The results dict that ``results.json`` holds.
    """
    jobs, info = plan(config)
    for msg in info["skipped"]:
        log(msg)
    out = Path(out_dir) if out_dir is not None else None
    runs: list[dict[str, Any]] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        jsonl = out / "runs.jsonl"
        if resume:
            old, jobs = _resumed(jobs, jsonl, log)
            runs.extend(old)
        elif jsonl.exists():
            jsonl.unlink()
    t0 = time.perf_counter()
    bar = _Progress(len(jobs), enabled=progress)
    try:
        for r in _iter_results(jobs, config.workers):
            r["steps_requested"] = config.steps
            runs.append(r)
            if out is not None:
                with open(out / "runs.jsonl", "a") as f:
                    f.write(json.dumps(jsonable(r), allow_nan=False) + "\n")
            bar.update(r)
    finally:
        bar.close()
    for r in runs:
        if "error" in r:
            log(f"error: {r['task']} {r['method']} lr={r['lr']} seed={r['seed']}: {r['error']}")
    results = build_results(runs, config, info, elapsed=time.perf_counter() - t0)
    if out is not None:
        write_outputs(results, out)
    return results


def build_results(
    runs: list[dict[str, Any]], config: GridConfig, info: dict[str, Any], elapsed: float = 0.0
) -> dict[str, Any]:
    """The dict written to ``results.json``."""
    tasks_info = {}
    for ts in info["tasks"]:
        task = get_task(ts)
        tasks_info[ts] = {**task.describe(), "grid_lrs": list(task_lrs(task, config.lrs))}
    return {
        "schema": SCHEMA,
        "config": {
            "tasks": list(info["tasks"]),
            "methods": list(info["methods"]),
            "metas": {k: list(v) for k, v in info["metas"].items()},
            "skipped": list(info["skipped"]),
            "lrs": list(config.lrs) if config.lrs is not None else None,
            "seeds": list(config.seeds),
            "steps": config.steps,
            "workers": config.workers,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "elapsed_sec": elapsed,
        },
        "tasks": tasks_info,
        "aggregates": aggregate(runs, tasks_info, info["metas"]),
        "diagnosis": {ts: diagnose_task(ts, runs, tasks_info[ts]) for ts in info["tasks"]},
        "spike": spike_summary(runs),
        "faults": fault_summary(runs, tasks_info),
        "errors": [r for r in runs if "error" in r],
        "runs": [r for r in runs if "error" not in r],
    }
