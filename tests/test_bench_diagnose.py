"""Is a task's failure a gradient explosion? (:mod:`gradguard.bench.diagnose`)."""

from __future__ import annotations

from gradguard.bench.diagnose import diagnose_task, remedy_advice


def _fake_run(method, lr, score, *, diverged=False, step0=2.0, top=3.0, nonfinite=0, seed=0):
    return {"task": "t", "method": method, "lr": lr, "seed": seed, "score": score,
            "diverged": diverged,
            "norm_stats": {"step0": step0, "max": top, "n_nonfinite": nonfinite}}


_INFO = {"higher_is_better": True, "trivial_metric": 0.1}


def test_diagnosis_explosion_when_clipping_rescues():
    runs = []
    for seed in range(3):
        runs += [_fake_run("none", 0.01, 0.8, seed=seed),
                 _fake_run("none", 0.3, 0.1, diverged=True, nonfinite=5, seed=seed),
                 _fake_run("clip:1", 0.01, 0.8, seed=seed),
                 _fake_run("clip:1", 0.3, 0.7, seed=seed)]
    d = diagnose_task("t", runs, _INFO)
    assert d["verdict"] == "explosion" and d["failing_lrs"] == [0.3]
    assert "non-finite" in d["message"] and "rescues lr 0.3" in d["message"]


def test_diagnosis_not_an_explosion_when_no_method_changes_the_outcome():
    runs = []
    for seed in range(3):
        runs += [_fake_run("none", 0.003, 0.9, seed=seed),
                 _fake_run("none", 0.1, 0.1, top=4.0, seed=seed),
                 _fake_run("clip:1", 0.003, 0.9, seed=seed),
                 _fake_run("clip:1", 0.1, 0.11, top=4.0, seed=seed)]
    d = diagnose_task("t", runs, _INFO)
    assert d["verdict"] == "not_explosion" and d["failing_lrs"] == [0.1]
    assert "not a gradient explosion" in d["message"] and "within 2x" in d["message"]


def test_diagnosis_of_the_post_ln_task_points_to_warmup():
    assert "warm-up" in remedy_advice("charlm-postln")
    assert "Pre-LN" in remedy_advice("charlm-postln")
    assert "Post-LN" not in remedy_advice("deep-mlp-digits")


def test_diagnosis_with_only_unprotected_runs():
    runs = [_fake_run("none", 0.3, 0.1, diverged=True, nonfinite=5, seed=s) for s in range(2)]
    d = diagnose_task("t", runs, _INFO)
    assert d["verdict"] == "unknown" and "run a clipping method" in d["message"]
