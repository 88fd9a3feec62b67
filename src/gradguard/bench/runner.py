"""The grid runner: tasks x methods x learning rates x seeds, in parallel worker processes.

Each run (:func:`run_one`) trains one task with one method at one learning rate and seed,
records the loss and the pre-clip gradient norm at every step, and returns a plain dict.
:func:`run_grid` runs many in a ``multiprocessing`` pool (``spawn`` context; every worker
uses one torch thread and flushes denormals, without which a saturated tanh RNN runs
hundreds of times slower), shows a progress bar, and appends each result to
``runs.jsonl`` as it arrives (so an interrupted grid can be resumed). :func:`aggregate`
turns runs into one row per (task, method), and :func:`write_outputs` writes
``results.json`` and ``table.md``.

Definitions (per task and method, over the grid of learning rates x seeds):

* **diverged** (one run): its parameters became non-finite, or its final loss (the loss
  on the task's fixed test set after training) is non-finite or above the task's cap
  (10x the loss of the all-zero output). A non-finite *training* loss alone is not a
  divergence: a method that skips a NaN batch and carries on has not diverged.
* **divergence rate**: diverged runs / runs, over the whole grid.
* **max stable lr**: the largest grid learning rate at which no seed diverged (``None``
  if there is none); ``stable_below`` says whether every smaller grid learning rate was
  stable too (``False`` flags a non-monotone, lucky stable point).
* **score** of a run: its final metric, except that a diverged run, and any run whose
  metric is worse than the task's trivial predictor (the best constant answer: 0.167 MSE
  on the adding problem, the majority class on digits), scores the trivial predictor's
  metric. A diverged model is worth what a model that learned nothing is worth: it is
  thrown away and replaced by a constant. Clamping every run at the trivial score
  (rather than only diverged ones) keeps the order consistent (a run that just avoided
  the cap is never scored worse than one that crossed it) and keeps one NaN or one
  astronomically bad loss from dominating a mean.
* **best metric**: the best, over learning rates, of the mean score over seeds at that
  learning rate; ``best_spread``: the standard deviation over seeds there.
* **mean metric**: the mean score over the whole grid; ``mean_spread``: the standard
  deviation over seeds of each seed's mean over learning rates (the spread to compare
  two methods' grid means against).
* **fraction clipped** / **skipped**: steps the method clipped / skipped, over the steps
  run, averaged over runs.
* **overhead**: CPU milliseconds per step spent in ``controller.step()`` (clipping plus
  ``optimizer.step()``), and the difference with ``none``'s on the same task. CPU time of
  a single-threaded process is used because it does not count the time the process
  waited for a core, so it is meaningful on a shared machine.
* **tuned**: for each task, the ``clip:<t>`` row with the best mean metric, ties broken
  by lower divergence rate, then by smaller threshold.

``spike-injection`` runs additionally give, per method and variant, the accuracy lost to
the spikes, paired by seed against the same method's ``clean`` run, and against
``none``'s clean run.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradguard.bench import methods as _methods
from gradguard.bench import tasks as _tasks
from gradguard.bench.diagnose import diagnose_task

__all__ = [
    "DEFAULT_LRS",
    "GridConfig",
    "Job",
    "aggregate",
    "markdown_table",
    "run_grid",
    "run_one",
    "spike_summary",
    "write_outputs",
]

DEFAULT_LRS: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
SCHEMA = "gradguard.bench/1"
# Relative CPU cost of one run, to start the longest runs first (better load balance).
_COST = {"charlm-postln": 5.0, "adding-rnn": 3.0, "deep-mlp-digits": 3.0, "spike-injection": 3.0,
         "deep-linear": 1.0}


# ======================================================================================
# One run
# ======================================================================================


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


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.median(xs) if xs else None


def _quantile(xs: Sequence[float], q: float) -> float | None:
    xs = sorted(x for x in xs if math.isfinite(x))
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def norm_stats(norms: Sequence[float]) -> dict[str, float | int | None]:
    """Summary of a run's per-step pre-clip gradient norms (non-finite values skipped):
    the norm at step 0, its median over the first 25 steps and over the last 100 steps
    run, the median and 90th percentile over all steps, the max, and the number of
    non-finite norms."""
    finite = [x for x in norms if math.isfinite(x)]
    return {
        "step0": _finite(norms[0]) if norms else None,
        "median_first25": _median(norms[:25]),
        "median_last100": _median(norms[-100:]),
        "median": _median(norms),
        "p90": _quantile(norms, 0.9),
        "max": max(finite) if finite else None,
        "n_nonfinite": len(norms) - len(finite),
    }


def downsample(
    losses: Sequence[float], norms: Sequence[float], points: int = 60
) -> dict[str, list[Any]]:
    """A short trace: per bucket of consecutive steps, the first step, the mean finite
    loss, and the median and max finite norm (``None`` where a bucket has none), so a
    spike between two points is never lost."""
    n = len(losses)
    size = max(1, math.ceil(n / max(points, 1)))
    out: dict[str, list[Any]] = {"step": [], "loss": [], "grad_norm": [], "grad_norm_max": []}
    for s in range(0, n, size):
        lb = [x for x in losses[s : s + size] if math.isfinite(x)]
        nb = [x for x in norms[s : s + size] if math.isfinite(x)]
        out["step"].append(s)
        out["loss"].append(sum(lb) / len(lb) if lb else None)
        out["grad_norm"].append(statistics.median(nb) if nb else None)
        out["grad_norm_max"].append(max(nb) if nb else None)
    return out


def run_one(
    task: str,
    method: str,
    lr: float,
    seed: int,
    steps: int | None = None,
    *,
    full_trace: bool = False,
    trace_points: int = 60,
    log: str | None = None,
    keep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``task`` with ``method`` at learning rate ``lr`` from ``seed``; return the result.

    Deterministic: the same arguments on one thread give the same losses, bit for bit.
    Training stops early once the parameters are non-finite (they cannot recover).

    Args:
        task: a task spec (:func:`gradguard.bench.tasks.get_task`).
        method: a concrete method spec (:func:`gradguard.bench.methods.get_method`).
        lr: the learning rate (``> 0``).
        seed: the seed of the initialisation, the batch order and any corruption.
        steps: training steps (``None``: the task's, 300).
        full_trace: also return every step's loss, norm and clipped flag.
        trace_points: the number of points of the downsampled trace.
        log: a JSONL path for methods that keep a log (the Guard's); it also gets the loss.
        keep: if given, filled with the trained ``model`` and the ``controller``.

    Returns:
        A JSON-ready dict: ``task, method, lr, seed, steps, steps_run, metric`` (raw),
        ``score`` (see the module docstring), ``final_loss, diverged, reason,
        diverged_step, frac_clipped, frac_skipped, sec_per_step, ctl_ms_per_step,
        wall_sec, norm_stats, trace`` (and ``full`` with ``full_trace``).

    Raises:
        ValueError: for a bad task, method, learning rate, seed or step count.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    t = _tasks.get_task(task)
    m = _methods.get_method(method)
    n_steps = t.steps if steps is None else steps
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")

    model = t.build_model(seed)
    optimizer = t.build_optimizer(model.parameters(), lr)
    ctl = m.build(
        _methods.MethodContext(model, optimizer, tuple(t.head_parameters(model)), log=log)
    )
    observe_loss = getattr(ctl, "observe_loss", None)
    sample = t.new_sampler(t.batch_generator(seed))
    corrupt = t.corruption_steps(seed, n_steps)

    losses: list[float] = []
    norms: list[float] = []
    clipped: list[bool] = []
    skipped: list[bool] = []
    reason: str | None = None
    diverged_step: int | None = None
    cpu_total = cpu_ctl = 0.0
    wall0 = time.perf_counter()
    for step in range(n_steps):
        c0 = time.process_time()
        batch = sample(step)
        if step in corrupt:
            batch = t.corrupt(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = t.loss(model, batch)
        loss.backward()
        if observe_loss is not None:
            observe_loss(loss)
        c1 = time.process_time()
        info = ctl.step()
        c2 = time.process_time()
        cpu_ctl += c2 - c1
        cpu_total += c2 - c0
        loss_v = float(loss.detach())
        losses.append(loss_v)
        norms.append(float(info.norm))
        clipped.append(bool(info.clipped))
        skipped.append(bool(info.skipped))
        # A non-finite loss is the only way non-finite parameters show up; check then.
        if not math.isfinite(loss_v) and not _params_finite(model):
            reason, diverged_step = "nonfinite_params", step
            break
    wall = time.perf_counter() - wall0
    steps_run = len(losses)
    close = getattr(ctl, "close", None)
    if close is not None:
        close()

    metric = final_loss = math.nan
    if reason is None and not _params_finite(model):
        reason, diverged_step = "nonfinite_params", steps_run - 1
    if reason is None:
        metric, final_loss = t.evaluate(model)
        if not math.isfinite(final_loss) or not math.isfinite(metric):
            reason = "nonfinite_loss"
        elif final_loss > t.loss_cap:
            reason = "loss_cap"
    diverged = reason is not None
    trivial = t.trivial_metric
    if diverged or not math.isfinite(metric):
        score = trivial
    else:
        score = max(metric, trivial) if t.higher_is_better else min(metric, trivial)

    result: dict[str, Any] = {
        "task": t.spec,
        "method": m.spec,
        "lr": lr,
        "seed": seed,
        "steps": n_steps,
        "steps_run": steps_run,
        "metric": metric,
        "score": score,
        "final_loss": final_loss,
        "diverged": diverged,
        "reason": reason,
        "diverged_step": diverged_step,
        "frac_clipped": sum(clipped) / max(steps_run, 1),
        "frac_skipped": sum(skipped) / max(steps_run, 1),
        "sec_per_step": cpu_total / max(steps_run, 1),
        "ctl_ms_per_step": 1e3 * cpu_ctl / max(steps_run, 1),
        "wall_sec": wall,
        "corrupt_steps": sorted(corrupt),
        "norm_stats": norm_stats(norms),
        "trace": downsample(losses, norms, trace_points),
    }
    if full_trace:
        result["full"] = {"loss": losses, "grad_norm": norms, "clipped": clipped}
    if keep is not None:
        keep.update(model=model, controller=ctl)
    return result


# ======================================================================================
# The grid
# ======================================================================================


def _init_worker() -> None:
    """One torch thread per worker and denormals flushed (see the module docstring)."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


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
        lrs: the learning-rate grid (tasks with their own ``lrs`` use those).
        seeds: the seeds.
        steps: training steps per run (``None``: each task's).
        workers: worker processes (``1``: in this process).
        full_trace_methods: methods whose runs keep every step's loss and norm.
    """

    tasks: Sequence[str] = ("all",)
    methods: Sequence[str] = ("default",)
    lrs: Sequence[float] = DEFAULT_LRS
    seeds: Sequence[int] = (0, 1, 2)
    steps: int | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    full_trace_methods: Sequence[str] = ()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not self.lrs or any(
            not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0 for x in self.lrs
        ):
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
        for name, values in (("lrs", self.lrs), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value, got {list(values)!r}")


def plan(config: GridConfig) -> tuple[list[Job], dict[str, Any]]:
    """The jobs of a grid (longest first) and what was expanded or skipped.

    Returns:
        ``(jobs, info)`` with ``info = {"tasks", "methods", "metas", "skipped"}``:
        canonical task and method specs, the meta-methods' expansions, and messages for
        methods skipped because an optional package is missing.
    """
    config.validate()
    tasks = _tasks.expand_task_specs(config.tasks)
    methods, metas = _methods.expand_method_specs(config.methods)
    full_specs, _ = _methods.expand_method_specs(config.full_trace_methods)
    full = {_methods.get_method(s).spec for s in full_specs}
    skipped = []
    runnable = []
    for s in methods:
        if _methods.get_method(s).definition.available():
            runnable.append(s)
        else:
            skipped.append(_methods.unavailable_message(s))
    jobs = []
    for ts in tasks:
        task = _tasks.get_task(ts)
        lrs = task.lrs if task.lrs is not None else tuple(config.lrs)
        for ms in runnable:
            for lr in lrs:
                for seed in config.seeds:
                    jobs.append(Job(ts, ms, float(lr), int(seed), config.steps, ms in full))
    jobs.sort(key=lambda j: -_COST.get(j.task.partition(":")[0], 1.0))
    return jobs, {"tasks": tasks, "methods": runnable, "metas": metas, "skipped": skipped}


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
        _init_worker()
        try:
            for job in jobs:
                yield _run_job(job)
        finally:
            torch.set_num_threads(threads)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
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
            # a run saved without full traces cannot stand in for one that asks for them
            wanted = {j.key(): j.full_trace for j in jobs}
            old = [r for r in _load_jsonl(jsonl) if "error" not in r and _run_key(r) in wanted
                   and ("full" in r or not wanted[_run_key(r)])]
            runs.extend(old)
            have = {_run_key(r) for r in old}
            jobs = [j for j in jobs if j.key() not in have]
            if old:
                log(f"resuming: {len(old)} runs reused from {jsonl}")
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
                    f.write(json.dumps(_jsonable(r), allow_nan=False) + "\n")
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


# ======================================================================================
# Aggregation
# ======================================================================================


def _better(higher: bool) -> Callable[[float, float], bool]:
    return (lambda a, b: a > b) if higher else (lambda a, b: a < b)


def _std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) >= 2 else 0.0


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def aggregate(
    runs: Sequence[dict[str, Any]],
    tasks_info: dict[str, dict[str, Any]],
    metas: dict[str, tuple[str, ...]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (task, method), as defined in the module docstring.

    Args:
        runs: results of :func:`run_one` (runs with an ``error`` are ignored).
        tasks_info: ``{task spec: {"higher_is_better": bool, ...}}`` (``Task.describe()``).
        metas: meta-methods to add rows for, ``{"tuned": ("clip:0.1", ...)}``.

    Returns:
        Rows with ``task, method, n_runs, n_diverged, divergence_rate, max_stable_lr,
        stable_below, lrs, per_lr, best_metric, best_lr, best_spread, mean_metric,
        mean_spread, frac_clipped, frac_skipped, sec_per_step, ctl_ms_per_step,
        ctl_overhead_ms, norm`` (and ``tuned_threshold`` on ``tuned`` rows).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if "error" not in r:
            groups[(r["task"], r["method"])].append(r)
    rows: list[dict[str, Any]] = []
    for (task, method), rs in groups.items():
        higher = bool(tasks_info[task]["higher_is_better"])
        better = _better(higher)
        lrs = sorted({float(r["lr"]) for r in rs})
        seeds = sorted({int(r["seed"]) for r in rs})
        per_lr: dict[float, list[dict[str, Any]]] = {lr: [] for lr in lrs}
        for r in rs:
            per_lr[float(r["lr"])].append(r)
        stable = {lr: not any(r["diverged"] for r in per_lr[lr]) for lr in lrs}
        stable_lrs = [lr for lr in lrs if stable[lr]]
        max_stable = max(stable_lrs) if stable_lrs else None
        stable_below = (
            all(stable[lr] for lr in lrs if lr <= max_stable) if max_stable is not None else None
        )
        lr_rows = []
        best = best_lr = best_spread = None
        for lr in lrs:
            scores = [float(r["score"]) for r in per_lr[lr]]
            mean = sum(scores) / len(scores)
            lr_rows.append({
                "lr": lr, "mean_score": mean, "spread": _std(scores),
                "n_diverged": sum(bool(r["diverged"]) for r in per_lr[lr]), "n": len(scores),
            })
            if best is None or better(mean, best):
                best, best_lr, best_spread = mean, lr, _std(scores)
        seed_means = []
        for s in seeds:
            sc = [float(r["score"]) for r in rs if int(r["seed"]) == s]
            seed_means.append(sum(sc) / len(sc))
        n_div = sum(bool(r["diverged"]) for r in rs)
        norms = [r["norm_stats"] for r in rs if r.get("norm_stats")]
        rows.append({
            "task": task,
            "method": method,
            "n_runs": len(rs),
            "n_diverged": n_div,
            "divergence_rate": n_div / len(rs),
            "max_stable_lr": max_stable,
            "stable_below": stable_below,
            "lrs": lrs,
            "per_lr": lr_rows,
            "best_metric": best,
            "best_lr": best_lr,
            "best_spread": best_spread,
            "mean_metric": sum(float(r["score"]) for r in rs) / len(rs),
            "mean_spread": _std(seed_means),
            "frac_clipped": _mean(float(r["frac_clipped"]) for r in rs),
            "frac_skipped": _mean(float(r["frac_skipped"]) for r in rs),
            "sec_per_step": _mean(float(r["sec_per_step"]) for r in rs),
            "ctl_ms_per_step": _mean(float(r["ctl_ms_per_step"]) for r in rs),
            "ctl_overhead_ms": None,
            "norm": {
                "step0_median": _median([n["step0"] for n in norms if n["step0"] is not None]),
                "median_median": _median([n["median"] for n in norms if n["median"] is not None]),
                "max": max((n["max"] for n in norms if n["max"] is not None), default=None),
            },
        })
    by_key = {(r["task"], r["method"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["task"], "none"))
        if ref is not None:
            r["ctl_overhead_ms"] = r["ctl_ms_per_step"] - ref["ctl_ms_per_step"]
    for meta, members in (metas or {}).items():
        for task in sorted({r["task"] for r in rows}):
            cands = [by_key[(task, m)] for m in members if (task, m) in by_key]
            if not cands:
                continue
            better = _better(bool(tasks_info[task]["higher_is_better"]))
            # Candidates come in increasing threshold order: on a tie the smaller wins.
            chosen = cands[0]
            for c in cands[1:]:
                if better(c["mean_metric"], chosen["mean_metric"]) or (
                    c["mean_metric"] == chosen["mean_metric"]
                    and c["divergence_rate"] < chosen["divergence_rate"]
                ):
                    chosen = c
            row = dict(chosen)
            row["method"] = meta
            row["tuned_threshold"] = _methods.get_method(chosen["method"]).arg
            row["tuned_from"] = chosen["method"]
            row["tuned_candidates"] = [c["method"] for c in cands]
            rows.append(row)
    order = {t: i for i, t in enumerate(tasks_info)}
    rows.sort(key=lambda r: (order.get(r["task"], len(order)), r["method"] != "none"))
    return rows


def spike_summary(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy lost to spikes: per (method, variant), the mean over seeds of
    ``score(variant) - score(clean)`` paired by seed, for the same method's clean run and
    for ``none``'s clean run (the unprotected reference)."""
    prefix = _tasks.SpikeInjection.name + ":"
    cell: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in runs:
        if "error" in r or not str(r["task"]).startswith(prefix):
            continue
        cell[(r["method"], r["task"][len(prefix):], int(r["seed"]))] = r
    out = []
    methods = sorted({m for m, _, _ in cell})
    variants = [v for v in _tasks.SpikeInjection.variants if v != "clean"]
    for m in methods:
        for v in variants:
            seeds = sorted(s for mm, vv, s in cell if mm == m and vv == v)
            if not seeds:
                continue
            acc = [float(cell[(m, v, s)]["score"]) for s in seeds]
            d_same = [float(cell[(m, v, s)]["score"]) - float(cell[(m, "clean", s)]["score"])
                      for s in seeds if (m, "clean", s) in cell]
            d_none = [float(cell[(m, v, s)]["score"]) - float(cell[("none", "clean", s)]["score"])
                      for s in seeds if ("none", "clean", s) in cell]
            out.append({
                "method": m, "variant": v, "n": len(seeds),
                "acc": sum(acc) / len(acc), "acc_spread": _std(acc),
                "n_diverged": sum(bool(cell[(m, v, s)]["diverged"]) for s in seeds),
                "delta_vs_clean": _mean(d_same), "delta_vs_clean_spread": _std(d_same),
                "delta_vs_none_clean": _mean(d_none),
            })
    return out


def build_results(
    runs: list[dict[str, Any]], config: GridConfig, info: dict[str, Any], elapsed: float = 0.0
) -> dict[str, Any]:
    """The dict written to ``results.json``."""
    tasks_info = {}
    for ts in info["tasks"]:
        tasks_info[ts] = _tasks.get_task(ts).describe()
    return {
        "schema": SCHEMA,
        "config": {
            "tasks": list(info["tasks"]),
            "methods": list(info["methods"]),
            "metas": {k: list(v) for k, v in info["metas"].items()},
            "skipped": list(info["skipped"]),
            "lrs": list(config.lrs),
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
        "errors": [r for r in runs if "error" in r],
        "runs": [r for r in runs if "error" not in r],
    }


# ======================================================================================
# Output
# ======================================================================================


def _jsonable(x: Any) -> Any:
    """Non-finite floats become ``None`` (strict JSON); tuples become lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.2e}"


def markdown_table(results: dict[str, Any]) -> str:
    """The results as markdown: per task, a summary table and a learning-rate table."""
    lines: list[str] = ["# gradguard bench", ""]
    cfg = results["config"]
    lines.append(f"seeds {cfg['seeds']}, lrs {cfg['lrs']}, torch {cfg['torch']}")
    for msg in cfg.get("skipped", []):
        lines.append(f"- {msg}")
    lines.append("")
    for task, tinfo in results["tasks"].items():
        rows = [r for r in results["aggregates"] if r["task"] == task]
        if not rows:
            continue
        arrow = "↑" if tinfo["higher_is_better"] else "↓"
        lines += [
            f"## {task}",
            "",
            f"metric `{tinfo['metric']}` ({arrow}); trivial predictor "
            f"{_fmt(tinfo['trivial_metric'])}; divergence cap on final loss "
            f"{_fmt(tinfo['loss_cap'])}",
            "",
        ]
        diagnosis = results.get("diagnosis", {}).get(task)
        if diagnosis:
            lines += [f"**Diagnosis:** {diagnosis['message']}.", ""]
        lines += [
            "| method | div. rate | max stable lr | best (lr) | mean over grid ± seeds "
            "| clipped | ms/step | ctl overhead ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            name = r["method"]
            if "tuned_threshold" in r:
                name += f" (= {r['tuned_from']})"
            msl = "none" if r["max_stable_lr"] is None else _fmt(r["max_stable_lr"])
            if r["stable_below"] is False:
                msl += "*"
            lines.append(
                f"| {name} | {r['divergence_rate']:.0%} | {msl} | "
                f"{_fmt(r['best_metric'])} ± {_fmt(r['best_spread'], 2)} ({_fmt(r['best_lr'])}) | "
                f"{_fmt(r['mean_metric'])} ± {_fmt(r['mean_spread'], 2)} | "
                f"{r['frac_clipped']:.0%} | {1e3 * r['sec_per_step']:.1f} | "
                f"{_fmt(r['ctl_overhead_ms'], 2)} |"
            )
        lrs = sorted({lr for r in rows for lr in r["lrs"]})
        if len(lrs) > 1:
            lines += ["", "score by learning rate (mean over seeds; ✗k: k seeds diverged)", "",
                      "| method | " + " | ".join(_fmt(lr) for lr in lrs) + " |",
                      "|---|" + "---|" * len(lrs)]
            for r in rows:
                cells = {c["lr"]: c for c in r["per_lr"]}
                out = []
                for lr in lrs:
                    c = cells.get(lr)
                    if c is None:
                        out.append("")
                        continue
                    s = _fmt(c["mean_score"])
                    if c["n_diverged"]:
                        s += f" ✗{c['n_diverged']}"
                    out.append(s)
                lines.append(f"| {r['method']} | " + " | ".join(out) + " |")
        lines.append("")
    if results.get("spike"):
        lines += [
            "## spike-injection: accuracy lost to 1% corrupted batches",
            "",
            "| method | variant | acc ± seeds | diverged | Δ vs same method clean "
            "| Δ vs none clean |",
            "|---|---|---|---|---|---|",
        ]
        for s in results["spike"]:
            lines.append(
                f"| {s['method']} | {s['variant']} | {_fmt(s['acc'])} ± "
                f"{_fmt(s['acc_spread'], 2)} | {s['n_diverged']}/{s['n']} | "
                f"{_fmt(s['delta_vs_clean'])} ± {_fmt(s['delta_vs_clean_spread'], 2)} | "
                f"{_fmt(s['delta_vs_none_clean'])} |"
            )
        lines.append("")
    lines.append("max stable lr*: a smaller grid learning rate diverged.")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> None:
    """Write ``results.json`` (strict JSON: non-finite numbers become null) and
    ``table.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False))
    (out / "table.md").write_text(markdown_table(results))
