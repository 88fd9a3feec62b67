"""One benchmark run: a task trained with one method at one learning rate and seed.

:func:`run_one` records the loss and the pre-clip gradient norm at every step, judges the
trained model and returns a plain, JSON-ready dict. The grid of many runs is
:mod:`gradguard.bench.grid`; their aggregation, :mod:`gradguard.bench.table`.

Definitions:

* **diverged**: the parameters became non-finite, or the final loss (the loss on the
  task's fixed test set after training) is non-finite or above the task's cap (10x the
  loss of the all-zero output). A non-finite *training* loss alone is not a divergence: a
  method that skips a NaN batch and carries on has not diverged.
* **score**: the final metric, except that a diverged run, and any run whose metric is
  worse than the task's trivial predictor (the best constant answer: 0.167 MSE on the
  adding problem, the majority class on digits), scores the trivial predictor's metric. A
  diverged model is worth what a model that learned nothing is worth: it is thrown away and
  replaced by a constant. Clamping every run at the trivial score (rather than only
  diverged ones) keeps the order consistent (a run that just avoided the cap is never
  scored worse than one that crossed it) and keeps one NaN or one astronomically bad loss
  from dominating a mean.
* **sec_per_step** / **ctl_ms_per_step**: CPU time per step of the whole step / of
  ``controller.step()`` (clipping plus ``optimizer.step()``). CPU time of a
  single-threaded process is used because it does not count the time the process waited
  for a core, so it is meaningful on a shared machine.

Every run executes with one torch thread and denormals flushed (:func:`init_worker`);
without the flush a saturated tanh RNN runs hundreds of times slower.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradguard.bench.methods import MethodContext, get_method
from gradguard.bench.taskbase import Faults, Task
from gradguard.bench.tasks import get_task

__all__ = ["downsample", "init_worker", "norm_stats", "run_one"]


def init_worker() -> None:
    """One torch thread and denormals flushed: how every benchmark run executes (in a
    worker process, or in this one)."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def median(xs: Sequence[float]) -> float | None:
    """The median of the finite values of ``xs`` (``None`` if there is none)."""
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
        "median_first25": median(norms[:25]),
        "median_last100": median(norms[-100:]),
        "median": median(norms),
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


@dataclass
class _Trace:
    """What the training loop records, step by step."""

    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    clipped: list[bool] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    reason: str | None = None
    diverged_step: int | None = None
    cpu_total: float = 0.0
    cpu_ctl: float = 0.0
    wall: float = 0.0


def _train(
    t: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctl: Any,
    sample: Callable[[int], Any], faults: Faults, n_steps: int, lr: float,
) -> _Trace:
    """The training loop; it stops early once the parameters are non-finite (they
    cannot recover)."""
    observe_loss = getattr(ctl, "observe_loss", None)
    trace = _Trace()
    wall0 = time.perf_counter()
    for step in range(n_steps):
        c0 = time.process_time()
        step_lr = lr * t.lr_factor(step, n_steps)  # lr * 1.0 == lr: constant tasks unchanged
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        batch = faults.batch(step, sample(step))
        optimizer.zero_grad(set_to_none=True)
        loss = t.loss(model, batch)
        loss.backward()
        faults.gradients(step, model)
        if observe_loss is not None:
            observe_loss(loss)
        c1 = time.process_time()
        info = ctl.step()
        c2 = time.process_time()
        trace.cpu_ctl += c2 - c1
        trace.cpu_total += c2 - c0
        loss_v = float(loss.detach())
        trace.losses.append(loss_v)
        trace.norms.append(float(info.norm))
        trace.clipped.append(bool(info.clipped))
        trace.skipped.append(bool(info.skipped))
        # A non-finite loss is the only way non-finite parameters show up; check then.
        if not math.isfinite(loss_v) and not _params_finite(model):
            trace.reason, trace.diverged_step = "nonfinite_params", step
            break
    trace.wall = time.perf_counter() - wall0
    return trace


def _judge(t: Task, model: torch.nn.Module, trace: _Trace) -> tuple[float, float, float]:
    """``(metric, final_loss, score)`` of the trained model; sets ``trace.reason`` (and
    ``diverged_step``) when it diverged (see the module docstring)."""
    metric = final_loss = math.nan
    if trace.reason is None and not _params_finite(model):
        trace.reason, trace.diverged_step = "nonfinite_params", len(trace.losses) - 1
    if trace.reason is None:
        metric, final_loss = t.evaluate(model)
        if not math.isfinite(final_loss) or not math.isfinite(metric):
            trace.reason = "nonfinite_loss"
        elif final_loss > t.loss_cap:
            trace.reason = "loss_cap"
    trivial = t.trivial_metric
    if trace.reason is not None or not math.isfinite(metric):
        score = trivial
    else:
        score = max(metric, trivial) if t.higher_is_better else min(metric, trivial)
    return metric, final_loss, score


def _check(lr: float, seed: int) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


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
    _check(lr, seed)
    t = get_task(task)
    m = get_method(method)
    n_steps = t.steps if steps is None else steps
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")

    model = t.build_model(seed)
    optimizer = t.build_optimizer(model.parameters(), lr)
    ctl = m.build(
        MethodContext(model, optimizer, tuple(t.head_parameters(model)), log=log)
    )
    sample = t.new_sampler(t.batch_generator(seed))
    faults = t.faults(seed, n_steps)
    trace = _train(t, model, optimizer, ctl, sample, faults, n_steps, lr)
    steps_run = len(trace.losses)
    close = getattr(ctl, "close", None)
    if close is not None:
        close()
    metric, final_loss, score = _judge(t, model, trace)

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
        "diverged": trace.reason is not None,
        "reason": trace.reason,
        "diverged_step": trace.diverged_step,
        "frac_clipped": sum(trace.clipped) / max(steps_run, 1),
        "frac_skipped": sum(trace.skipped) / max(steps_run, 1),
        "sec_per_step": trace.cpu_total / max(steps_run, 1),
        "ctl_ms_per_step": 1e3 * trace.cpu_ctl / max(steps_run, 1),
        "wall_sec": trace.wall,
        "corrupt_steps": sorted(faults.steps),
        "norm_stats": norm_stats(trace.norms),
        "trace": downsample(trace.losses, trace.norms, trace_points),
    }
    if full_trace:
        result["full"] = {"loss": trace.losses, "grad_norm": trace.norms,
                          "clipped": trace.clipped}
    if keep is not None:
        keep.update(model=model, controller=ctl)
    return result
