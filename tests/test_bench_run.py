"""One benchmark run (:mod:`gradguard.bench.run`): deterministic, divergence judged, the
norm summary and the short trace."""

from __future__ import annotations

import math

import pytest

from gradguard.bench import tasks as T
from gradguard.bench.run import downsample, norm_stats, run_one

ALL_TASKS = ["adding-rnn", "deep-mlp-digits", "deep-linear", "charlm-postln",
             "spike-injection:x100", "spike-injection:nan", "spike-injection:clean"]


def _same(xs, ys):
    """Bitwise-equal lists of floats, NaN equal to NaN (the NaN spike's loss)."""
    return len(xs) == len(ys) and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(xs, ys, strict=True))


@pytest.mark.parametrize("task", ALL_TASKS)
def test_task_runs_deterministically(task):
    a = run_one(task, "none", 1e-5, seed=1, steps=3, full_trace=True)
    b = run_one(task, "none", 1e-5, seed=1, steps=3, full_trace=True)
    assert _same(a["full"]["loss"], b["full"]["loss"])
    assert _same(a["full"]["grad_norm"], b["full"]["grad_norm"])
    assert _same([a["metric"]], [b["metric"]])
    assert a["steps_run"] == 3 and a["task"] == task and a["method"] == "none"


def test_huge_lr_diverges_and_stops_early():
    r = run_one("deep-mlp-digits", "none", 1e3, seed=0, steps=40)
    assert r["diverged"] and r["reason"] == "nonfinite_params"
    assert r["steps_run"] < 40 and r["score"] == T.get_task("deep-mlp-digits").trivial_metric
    r = run_one("deep-mlp-digits", "clip:1", 1e-3, seed=0, steps=5)
    assert not r["diverged"] and r["reason"] is None


def test_nan_batch_diverges_without_skip():
    task = T.get_task("spike-injection:nan")
    steps = 12
    (bad,) = task.corruption_steps(0, steps)
    r = run_one("spike-injection:nan", "clip:1", 0.01, seed=0, steps=steps)
    assert r["diverged"] and r["diverged_step"] == bad and r["corrupt_steps"] == [bad]


def test_norm_stats_and_downsample():
    norms = [float(i) for i in range(200)] + [math.nan]
    s = norm_stats(norms)
    assert s["step0"] == 0.0 and s["median_first25"] == 12.0 and s["max"] == 199.0
    assert s["median_last100"] == pytest.approx(150.0) and s["n_nonfinite"] == 1
    tr = downsample([1.0] * 10, [1.0, 9.0] * 5, points=5)
    assert tr["step"] == [0, 2, 4, 6, 8] and tr["grad_norm_max"] == [9.0] * 5


def test_bad_run_arguments():
    with pytest.raises(ValueError, match="lr must be"):
        run_one("deep-linear", "none", float("nan"), 0, steps=1)
