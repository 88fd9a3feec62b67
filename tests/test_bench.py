"""Tests of gradguard.bench: tasks, the method registry, the runner and the CLI (fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradguard.bench import methods as M
from gradguard.bench import runner as R
from gradguard.bench import tasks as T

ALL_TASKS = ["adding-rnn", "deep-mlp-digits", "deep-linear", "charlm-postln",
             "spike-injection:x100", "spike-injection:nan", "spike-injection:clean"]



# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ALL_TASKS)
def test_task_runs_deterministically(task):
    a = R.run_one(task, "none", 1e-5, seed=1, steps=3, full_trace=True)
    b = R.run_one(task, "none", 1e-5, seed=1, steps=3, full_trace=True)
    assert _same(a["full"]["loss"], b["full"]["loss"])
    assert _same(a["full"]["grad_norm"], b["full"]["grad_norm"])
    assert _same([a["metric"]], [b["metric"]])
    assert a["steps_run"] == 3 and a["task"] == task and a["method"] == "none"


def _same(xs, ys):
    """Bitwise-equal lists of floats, NaN equal to NaN (the NaN spike's loss)."""
    return len(xs) == len(ys) and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(xs, ys, strict=True))


def test_seed_changes_init_and_batches_but_not_test_set():
    task = T.get_task("deep-mlp-digits")
    w0 = task.build_model(0)[0].weight
    w1 = task.build_model(1)[0].weight
    assert not torch.equal(w0, w1)
    assert torch.equal(task.build_model(0)[0].weight, w0)
    s0, s1 = task.new_sampler(task.batch_generator(0)), task.new_sampler(task.batch_generator(1))
    assert not torch.equal(s0(0)[0], s1(0)[0])
    assert task.data() is T.get_task("deep-mlp-digits").data()  # cached per process


def test_build_model_leaves_global_rng_alone():
    state = torch.get_rng_state()
    T.get_task("adding-rnn").build_model(3)
    assert torch.equal(torch.get_rng_state(), state)


def test_task_specs_as_specified():
    rnn = T.get_task("adding-rnn")
    model = rnn.build_model(0)
    assert model.rnn.hidden_size == 128 and model.rnn.nonlinearity == "tanh"
    assert abs(float(model.rnn.weight_hh_l0.detach().std()) - 1.5 / math.sqrt(128)) < 0.01
    assert abs(rnn.trivial_metric - 1 / 6) < 0.02  # always answering 1
    x, y = T.adding_problem(5, 50, torch.Generator().manual_seed(0))
    assert x.shape == (5, 50, 2) and torch.equal(x[..., 1].sum(1), torch.full((5,), 2.0))
    assert torch.allclose((x[..., 0] * x[..., 1]).sum(1), y)

    mlp = T.get_task("deep-mlp-digits")
    linears = [m for m in mlp.build_model(0) if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 50 and all(m.in_features == 64 for m in linears)
    d = mlp.data()
    assert d["x"].shape == (1500, 64) and d["x_test"].shape == (297, 64)
    assert abs(float(d["x"].mean())) < 1e-5

    lin = [m for m in T.get_task("deep-linear").build_model(0)]
    assert len(lin) == 20 and all(m.weight.shape == (32, 32) and m.bias is None for m in lin)

    lm = T.get_task("charlm-postln")
    model = lm.build_model(0)
    layer = model.blocks.layers[0]
    assert len(model.blocks.layers) == 4 and not layer.norm_first
    assert layer.self_attn.embed_dim == 64 and layer.self_attn.num_heads == 4
    assert isinstance(lm.build_optimizer(model.parameters(), 1e-3), torch.optim.Adam)


def test_spike_schedule_is_seeded_and_one_percent():
    task = T.get_task("spike-injection:x100")
    s = task.corruption_steps(0, 300)
    assert s == task.corruption_steps(0, 300) and len(s) == 3 and min(s) >= 10
    assert s != task.corruption_steps(1, 300)
    assert T.get_task("spike-injection:clean").corruption_steps(0, 300) == frozenset()
    x = torch.ones(4, 64)
    assert torch.equal(task.corrupt((x, x))[0], x * 100)
    bad = T.get_task("spike-injection:nan").corrupt((x, x))[0]
    assert bool(bad[0].isnan().all()) and bool(bad[1:].isfinite().all())


def test_task_spec_errors_and_expansion():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        T.get_task("nope")
    with pytest.raises(ValueError, match="variant"):
        T.get_task("spike-injection:x7")
    with pytest.raises(ValueError, match="takes no variant"):
        T.get_task("adding-rnn:x")
    assert T.expand_task_specs(["spike-injection"]) == [
        "spike-injection:x100", "spike-injection:nan", "spike-injection:clean"]
    assert T.expand_task_specs(["spike-injection:nan"]) == [
        "spike-injection:nan", "spike-injection:clean"]
    assert len(T.expand_task_specs(["all"])) == 7


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


def test_method_specs_canonical_and_errors():
    assert M.get_method("clip:1.0").spec == "clip:1"
    assert M.get_method("value").arg == 1.0 and M.get_method("value").spec == "value:1"
    assert M.get_method("agc").spec == "agc:0.01"
    assert M.get_method("none").spec == "none"
    for bad, match in [("clip", "needs an argument"), ("clip:-1", "must be in"),
                       ("clip:abc", "must be a number"), ("none:3", "takes no argument"),
                       ("bogus", "unknown method 'bogus'"), ("tuned", "meta-method"),
                       ("clip:nan", "must be in"), ("", "non-empty")]:
        with pytest.raises(ValueError, match=match):
            M.get_method(bad)
    specs, metas = M.expand_method_specs(["none", "tuned", "clip:1"])
    assert specs == ["none", "clip:0.1", "clip:0.3", "clip:1", "clip:3", "clip:10"]
    assert metas == {"tuned": ("clip:0.1", "clip:0.3", "clip:1", "clip:3", "clip:10")}


def _ctx(seed=0):
    task = T.get_task("deep-mlp-digits")
    model = task.build_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: inspect clipped grads
    x, y = task.new_sampler(task.batch_generator(seed))(0)
    (task.loss(model, (x, y)) * 50).backward()
    return M.MethodContext(model, opt, tuple(task.head_parameters(model)))


def test_clip_controller_matches_torch():
    ctx = _ctx()
    ref = [p.grad.clone() for p in ctx.parameters()]
    info = M.get_method("clip:1").build(ctx).step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref]))
    assert float(info.norm) == pytest.approx(float(total), rel=1e-5) and info.clipped
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ctx.parameters()]))
    assert float(after) == pytest.approx(1.0, rel=1e-4)


def test_value_and_agc_controllers():
    ctx = _ctx()
    info = M.get_method("value:0.01").build(ctx).step()
    assert info.clipped and max(float(p.grad.abs().max()) for p in ctx.parameters()) <= 0.01
    ctx = _ctx()
    head_before = [p.grad.clone() for p in ctx.head]
    info = M.get_method("agc:0.001").build(ctx).step()
    assert info.clipped and not info.skipped
    assert all(torch.equal(a, p.grad) for a, p in zip(head_before, ctx.head, strict=True))


@pytest.mark.parametrize("spec", ["peer-zclip", "peer-zclip:none", "peer-autoclip"])
def test_peer_methods(spec):
    m = M.get_method(spec)
    if not m.definition.available():
        with pytest.raises(M.MethodUnavailable, match="not installed"):
            m.build(_ctx())
        return
    r = R.run_one("deep-linear", spec, 0.01, seed=0, steps=3)
    assert r["steps_run"] >= 1 and r["method"] == m.spec


def test_guard_style_method_plugs_in():
    """A method that works inside optimizer.step() (as an attached Guard does), in a few
    lines: the protocol the Guard methods will use."""

    class FakeGuard:  # stands in for gg.Guard(params, clip=...) + attach(optimizer)
        def __init__(self, params, clip):
            self.params, self.clip = list(params), clip

        def attach(self, opt):
            opt.register_step_pre_hook(lambda *_: self._run())

        def _run(self):
            self.last_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.last_clipped = self.last_norm > self.clip
            self.last_skipped = torch.tensor(False)

    name = "fakeguard-test"
    try:
        @M.register_method(name, parse=M.float_arg(name, 1.0), help="test only")
        def _fake(ctx: M.MethodContext, clip: float) -> M.Controller:
            guard = FakeGuard(ctx.model.parameters(), clip=clip)
            guard.attach(ctx.optimizer)
            return M.StepThenReport(ctx.optimizer, lambda: M.StepInfo(
                guard.last_norm, guard.last_clipped, guard.last_skipped))

        M.register_alias("fakeauto-test", f"{name}:1")
        a = R.run_one("deep-linear", "fakeauto-test", 0.03, seed=0, steps=5, full_trace=True)
        b = R.run_one("deep-linear", "clip:1", 0.03, seed=0, steps=5, full_trace=True)
        assert a["method"] == f"{name}:1"
        assert a["full"]["loss"] == b["full"]["loss"] and a["frac_clipped"] == 1.0
        with pytest.raises(ValueError, match="already registered"):
            M.register_method(name)
    finally:
        M.METHODS.pop(name, None)
        M._ALIASES.pop("fakeauto-test", None)


# --------------------------------------------------------------------------------------
# Runner: divergence and aggregation
# --------------------------------------------------------------------------------------


def test_huge_lr_diverges_and_stops_early():
    r = R.run_one("deep-mlp-digits", "none", 1e3, seed=0, steps=40)
    assert r["diverged"] and r["reason"] == "nonfinite_params"
    assert r["steps_run"] < 40 and r["score"] == T.get_task("deep-mlp-digits").trivial_metric
    r = R.run_one("deep-mlp-digits", "clip:1", 1e-3, seed=0, steps=5)
    assert not r["diverged"] and r["reason"] is None


def test_nan_batch_diverges_without_skip():
    task = T.get_task("spike-injection:nan")
    steps = 12
    (bad,) = task.corruption_steps(0, steps)
    r = R.run_one("spike-injection:nan", "clip:1", 0.01, seed=0, steps=steps)
    assert r["diverged"] and r["diverged_step"] == bad and r["corrupt_steps"] == [bad]


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
    rows = {r["method"]: r for r in R.aggregate(runs, info)}
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
    rows = R.aggregate(runs, info, {"tuned": ("clip:0.1", "clip:0.3", "clip:1", "clip:10")})
    tuned = next(r for r in rows if r["method"] == "tuned")
    assert tuned["tuned_threshold"] == 1.0 and tuned["tuned_from"] == "clip:1"
    assert tuned["best_metric"] == 0.2


def test_spike_summary_pairs_by_seed():
    runs = [_run("spike-injection:clean", "none", 0.01, s, 0.9) for s in (0, 1)]
    runs += [_run("spike-injection:clean", "g", 0.01, s, 0.8) for s in (0, 1)]
    runs += [_run("spike-injection:x100", "g", 0.01, 0, 0.7),
             _run("spike-injection:x100", "g", 0.01, 1, 0.8)]
    (row,) = R.spike_summary(runs)
    assert row["method"] == "g" and row["variant"] == "x100"
    assert row["delta_vs_clean"] == pytest.approx(-0.05)
    assert row["delta_vs_none_clean"] == pytest.approx(-0.15)


def test_norm_stats_and_downsample():
    norms = [float(i) for i in range(200)] + [math.nan]
    s = R.norm_stats(norms)
    assert s["step0"] == 0.0 and s["median_first25"] == 12.0 and s["max"] == 199.0
    assert s["median_last100"] == pytest.approx(150.0) and s["n_nonfinite"] == 1
    tr = R.downsample([1.0] * 10, [1.0, 9.0] * 5, points=5)
    assert tr["step"] == [0, 2, 4, 6, 8] and tr["grad_norm_max"] == [9.0] * 5


def test_grid_config_errors():
    for kw, match in [({"lrs": [0.1, -1]}, "lrs"), ({"seeds": [-1]}, "seeds"),
                      ({"workers": 0}, "workers"), ({"steps": 0}, "steps")]:
        with pytest.raises(ValueError, match=match):
            R.GridConfig(**kw).validate()
    with pytest.raises(ValueError, match="lr must be"):
        R.run_one("deep-linear", "none", float("nan"), 0, steps=1)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def test_cli_tiny_grid_writes_valid_json(tmp_path, capsys):
    from gradguard.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "--tasks", "deep-linear", "--methods", "none,clip:1,value",
               "--seeds", "2", "--lrs", "0.01,0.1", "--steps", "4", "--workers", "1",
               "--out", str(out), "--no-progress", "--full-traces", "none"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert data["schema"] == R.SCHEMA and len(data["runs"]) == 12
    rows = {r["method"] for r in data["aggregates"]}
    assert rows == {"none", "clip:1", "value:1"}
    assert all(len(r["full"]["loss"]) == r["steps_run"]
               for r in data["runs"] if r["method"] == "none")
    table = (out / "table.md").read_text()
    assert "## deep-linear" in table and "| clip:1 |" in table
    assert len((out / "runs.jsonl").read_text().splitlines()) == 12
    # resume reuses every run
    rc = main(["bench", "--tasks", "deep-linear", "--methods", "none,clip:1,value",
               "--seeds", "2", "--lrs", "0.01,0.1", "--steps", "4", "--workers", "1",
               "--out", str(out), "--no-progress", "--resume"])
    assert rc == 0 and "12 runs reused" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--seeds", "x"], "--seeds"), (["--lrs", "0.1,-2"], "--lrs"),
    (["--methods", "clip:-3"], "clip:-3"), (["--tasks", "nope"], "nope"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, match):
    from gradguard.cli import main

    assert main(["bench", "--out", str(tmp_path), "--no-progress", *argv]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
def test_grid_in_worker_processes_matches_in_process(tmp_path):
    """The spawn pool gives the same runs as the in-process path (one thread each)."""
    cfg = dict(tasks=["deep-linear"], methods=["clip:1"], lrs=[0.03], seeds=[0, 1], steps=3)
    par = R.run_grid(R.GridConfig(workers=2, **cfg), tmp_path / "par", progress=False)
    seq = R.run_grid(R.GridConfig(workers=1, **cfg), None, progress=False)
    key = lambda r: r["seed"]  # noqa: E731
    assert [r["trace"]["loss"] for r in sorted(par["runs"], key=key)] == [
        r["trace"]["loss"] for r in sorted(seq["runs"], key=key)]
    assert json.loads((tmp_path / "par" / "results.json").read_text())["config"]["workers"] == 2


def test_guard_methods_registered_and_skip_nan_batch():
    assert M.get_method("auto").spec == "guard:auto"
    assert M.get_method("guard:1.0").spec == "guard:1"
    with pytest.raises(ValueError, match="guard:bogus"):
        M.get_method("guard:bogus")
    specs, _ = M.expand_method_specs(["default"])
    assert {"guard:auto", "guard:zclip", "guard:autoclip", "guard:adagc"} <= set(specs)
    steps = 12
    (bad,) = T.get_task("spike-injection:nan").corruption_steps(0, steps)
    r = R.run_one("spike-injection:nan", "auto", 0.003, seed=0, steps=steps)
    assert not r["diverged"] and r["frac_skipped"] == pytest.approx(1 / steps)
    assert r["corrupt_steps"] == [bad]


# ----- diagnosis ------------------------------------------------------------------------------

def _fake_run(method, lr, score, *, diverged=False, step0=2.0, top=3.0, nonfinite=0, seed=0):
    return {"task": "t", "method": method, "lr": lr, "seed": seed, "score": score,
            "diverged": diverged,
            "norm_stats": {"step0": step0, "max": top, "n_nonfinite": nonfinite}}


_INFO = {"higher_is_better": True, "trivial_metric": 0.1}


def test_diagnosis_explosion_when_clipping_rescues():
    from gradguard.bench.diagnose import diagnose_task

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
    from gradguard.bench.diagnose import diagnose_task

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
    from gradguard.bench.diagnose import _advice

    assert "warm-up" in _advice("charlm-postln") and "Pre-LN" in _advice("charlm-postln")
    assert "Post-LN" not in _advice("deep-mlp-digits")


def test_grid_config_rejects_empty_lists_and_repeats():
    for kw, match in [({"tasks": []}, "tasks"), ({"methods": []}, "methods"),
                      ({"seeds": [0, 0]}, "seeds must not repeat"),
                      ({"lrs": [0.1, 0.1]}, "lrs must not repeat")]:
        with pytest.raises(ValueError, match=match):
            R.GridConfig(**kw).validate()


def test_cli_bad_full_traces(tmp_path, capsys):
    from gradguard.cli import main

    argv = ["bench", "--out", str(tmp_path), "--no-progress", "--tasks", "deep-linear",
            "--methods", "none", "--full-traces", "nope"]
    assert main(argv) == 2
    assert "--full-traces" in capsys.readouterr().err


def test_resume_does_not_reuse_runs_without_the_full_traces_asked_for(tmp_path):
    cfg = dict(tasks=["deep-linear"], methods=["none"], lrs=[0.01], seeds=[0], steps=2,
               workers=1)
    R.run_grid(R.GridConfig(**cfg), tmp_path, progress=False)
    again = R.run_grid(R.GridConfig(full_trace_methods=["none"], **cfg), tmp_path,
                       progress=False, resume=True)
    assert "full" in again["runs"][0]
    expanded = R.run_grid(R.GridConfig(full_trace_methods=["tuned"], **cfg), None,
                          progress=False)  # a meta-method is expanded, not refused
    assert len(expanded["runs"]) == 1


def test_diagnosis_with_only_unprotected_runs():
    from gradguard.bench.diagnose import diagnose_task

    runs = [_fake_run("none", 0.3, 0.1, diverged=True, nonfinite=5, seed=s) for s in range(2)]
    d = diagnose_task("t", runs, _INFO)
    assert d["verdict"] == "unknown" and "run a clipping method" in d["message"]
