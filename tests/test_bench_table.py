"""The benchmark's aggregation (:mod:`gradguard.bench.table`): rows per (task, method),
the tuned meta-method, the spike summary."""

from __future__ import annotations

import pytest

from gradguard.bench.table import aggregate, spike_summary


def _run(task, method, lr, seed, score, diverged=False, clipped=0.0, ms=1.0):
    return {"task": task, "method": method, "lr": lr, "seed": seed, "score": score,
            "metric": score, "diverged": diverged, "frac_clipped": clipped,
            "frac_skipped": 0.0, "sec_per_step": 0.01, "ctl_ms_per_step": ms,
            "norm_stats": {"step0": 1.0, "median": 2.0, "max": 5.0}}


def test_aggregation_math():
    info = {"t": {"higher_is_better": True}}
    runs = [
        # method a: lr 0.1 stable; lr 1 diverges on seed 1 (scored at trivial 0.1)
        _run("t", "a", 0.1, 0, 0.8), _run("t", "a", 0.1, 1, 0.6),
        _run("t", "a", 1.0, 0, 0.9, clipped=1.0), _run("t", "a", 1.0, 1, 0.1, diverged=True),
        # method none: lr 0.1 diverges, lr 1 stable (non-monotone)
        _run("t", "none", 0.1, 0, 0.1, diverged=True), _run("t", "none", 0.1, 1, 0.2),
        _run("t", "none", 1.0, 0, 0.3, ms=0.5), _run("t", "none", 1.0, 1, 0.3, ms=0.5),
    ]
    rows = {r["method"]: r for r in aggregate(runs, info)}
    a = rows["a"]
    assert a["divergence_rate"] == 0.25 and a["max_stable_lr"] == 0.1 and a["stable_below"]
    assert a["best_metric"] == pytest.approx(0.7) and a["best_lr"] == 0.1
    assert a["best_spread"] == pytest.approx(0.1414213, rel=1e-5)  # stdev(0.8, 0.6)
    assert a["mean_metric"] == pytest.approx(0.6)
    # per-seed grid means: seed 0 (0.8+0.9)/2 = 0.85, seed 1 (0.6+0.1)/2 = 0.35
    assert a["mean_spread"] == pytest.approx(0.3535534, rel=1e-5)
    assert a["frac_clipped"] == pytest.approx(0.25)
    assert a["ctl_overhead_ms"] == pytest.approx(0.25)
    n = rows["none"]
    assert n["max_stable_lr"] == 1.0 and n["stable_below"] is False
    assert n["best_metric"] == pytest.approx(0.3) and n["best_lr"] == 1.0


def test_tuned_picks_best_mean_and_lower_is_better():
    info = {"t": {"higher_is_better": False}}
    runs = [_run("t", "clip:0.1", 0.1, 0, 0.5), _run("t", "clip:1", 0.1, 0, 0.2),
            _run("t", "clip:10", 0.1, 0, 0.2, diverged=True)]
    rows = aggregate(runs, info, {"tuned": ("clip:0.1", "clip:0.3", "clip:1", "clip:10")})
    tuned = next(r for r in rows if r["method"] == "tuned")
    assert tuned["tuned_threshold"] == 1.0 and tuned["tuned_from"] == "clip:1"
    assert tuned["best_metric"] == 0.2


def test_spike_summary_pairs_by_seed():
    runs = [_run("spike-injection:clean", "none", 0.01, s, 0.9) for s in (0, 1)]
    runs += [_run("spike-injection:clean", "g", 0.01, s, 0.8) for s in (0, 1)]
    runs += [_run("spike-injection:x100", "g", 0.01, 0, 0.7),
             _run("spike-injection:x100", "g", 0.01, 1, 0.8)]
    (row,) = spike_summary(runs)
    assert row["method"] == "g" and row["variant"] == "x100"
    assert row["delta_vs_clean"] == pytest.approx(-0.05)
    assert row["delta_vs_none_clean"] == pytest.approx(-0.15)


def test_fault_summary_pairs_by_lr_and_seed_and_the_table_names_the_hf_default():
    from gradguard.bench.table import fault_summary, markdown_table

    info = {"c": {"higher_is_better": False, "reference": "p", "metric": "val_loss",
                  "trivial_metric": 3.0, "loss_cap": 40.0},
            "p": {"higher_is_better": False, "metric": "val_loss", "trivial_metric": 3.0,
                  "loss_cap": 40.0}}
    runs = [_run("p", "clip:1", lr, s, 2.0 + lr) for lr in (0.1, 1.0) for s in (0, 1)]
    runs += [_run("c", "clip:1", 0.1, 0, 2.2), _run("c", "clip:1", 0.1, 1, 2.1),
             _run("c", "clip:1", 1.0, 0, 3.0, diverged=True),
             _run("c", "clip:1", 1.0, 1, 3.1)]  # lr 1, seed 1: no reference run
    runs.pop(3)
    (row,) = fault_summary(runs, info)
    assert row["task"] == "c" and row["reference"] == "p" and row["n"] == 3
    # (2.2 - 2.1) + (2.1 - 2.1) + (3.0 - 3.0) over 3 pairs; seeds: 0 -> 0.05, 1 -> 0
    assert row["delta"] == pytest.approx(0.1 / 3) and row["n_diverged"] == 1
    assert row["delta_spread"] == pytest.approx(0.0353553, rel=1e-5)
    results = {"config": {"seeds": [0, 1], "lrs": None, "torch": "x"}, "tasks": info,
               "aggregates": aggregate(runs, info), "faults": [row]}
    table = markdown_table(results)
    assert "| clip:1 (HF default) | 25% |" in table and "each task's own grid" in table
    assert "| clip:1 (HF default) | 1/3 | +0.0333 ± 0.035 |" in table
