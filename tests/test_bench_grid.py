"""The benchmark grid (:mod:`gradguard.bench.grid`): its configuration checked, worker
processes equal to one process, resume."""

from __future__ import annotations

import json

import pytest

from gradguard.bench.grid import GridConfig, run_grid


def test_grid_config_errors():
    for kw, match in [({"lrs": [0.1, -1]}, "lrs"), ({"seeds": [-1]}, "seeds"),
                      ({"workers": 0}, "workers"), ({"steps": 0}, "steps")]:
        with pytest.raises(ValueError, match=match):
            GridConfig(**kw).validate()


def test_grid_config_rejects_empty_lists_and_repeats():
    for kw, match in [({"tasks": []}, "tasks"), ({"methods": []}, "methods"),
                      ({"seeds": [0, 0]}, "seeds must not repeat"),
                      ({"lrs": [0.1, 0.1]}, "lrs must not repeat")]:
        with pytest.raises(ValueError, match=match):
            GridConfig(**kw).validate()


@pytest.mark.slow
def test_grid_in_worker_processes_matches_in_process(tmp_path):
    """The spawn pool gives the same runs as the in-process path (one thread each)."""
    cfg = dict(tasks=["deep-linear"], methods=["clip:1"], lrs=[0.03], seeds=[0, 1], steps=3)
    par = run_grid(GridConfig(workers=2, **cfg), tmp_path / "par", progress=False)
    seq = run_grid(GridConfig(workers=1, **cfg), None, progress=False)
    key = lambda r: r["seed"]  # noqa: E731
    assert [r["trace"]["loss"] for r in sorted(par["runs"], key=key)] == [
        r["trace"]["loss"] for r in sorted(seq["runs"], key=key)]
    assert json.loads((tmp_path / "par" / "results.json").read_text())["config"]["workers"] == 2


def test_resume_does_not_reuse_runs_without_the_full_traces_asked_for(tmp_path):
    cfg = dict(tasks=["deep-linear"], methods=["none"], lrs=[0.01], seeds=[0], steps=2,
               workers=1)
    run_grid(GridConfig(**cfg), tmp_path, progress=False)
    again = run_grid(GridConfig(full_trace_methods=["none"], **cfg), tmp_path,
                     progress=False, resume=True)
    assert "full" in again["runs"][0]
    expanded = run_grid(GridConfig(full_trace_methods=["tuned"], **cfg), None,
                        progress=False)  # a meta-method is expanded, not refused
    assert len(expanded["runs"]) == 1


def test_each_task_runs_its_own_grid_unless_one_is_given():
    from gradguard.bench.gpt import GPT
    from gradguard.bench.grid import DEFAULT_LRS, plan

    tasks = ["deep-linear", "gpt:preln", "spike-injection:clean"]

    def lrs(**kw):
        jobs, _ = plan(GridConfig(tasks=tasks, methods=["none"], seeds=[0], **kw))
        return {t: sorted(j.lr for j in jobs if j.task == t) for t in tasks}

    assert lrs() == {"deep-linear": list(DEFAULT_LRS), "gpt:preln": list(GPT.default_lrs),
                     "spike-injection:clean": [0.003]}  # a fixed lrs always wins
    assert lrs(lrs=[0.05]) == {"deep-linear": [0.05], "gpt:preln": [0.05],
                               "spike-injection:clean": [0.003]}
