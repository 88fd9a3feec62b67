"""``gradguard bench`` (:mod:`gradguard.cli.bench`): a tiny grid end to end, resume, and
bad input refused in one line before any run."""

from __future__ import annotations

import json
import sys

import pytest

from cli_utils import PIP_BENCH, forbid_work, refused
from gradguard.bench.grid import SCHEMA
from gradguard.cli import main

_BENCH_FAST = ["--tasks", "deep-linear", "--methods", "none", "--seeds", "1", "--lrs", "0.1",
               "--steps", "2", "--workers", "1", "--no-progress"]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_work(monkeypatch)


def test_cli_tiny_grid_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--tasks", "deep-linear", "--methods", "none,clip:1,value",
               "--seeds", "2", "--lrs", "0.01,0.1", "--steps", "4", "--workers", "1",
               "--out", str(out), "--no-progress", "--full-traces", "none"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert data["schema"] == SCHEMA and len(data["runs"]) == 12
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
    assert main(["bench", "--out", str(tmp_path), "--no-progress", *argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_bad_full_traces(tmp_path, capsys):
    argv = ["bench", "--out", str(tmp_path), "--no-progress", "--tasks", "deep-linear",
            "--methods", "none", "--full-traces", "nope"]
    assert main(argv) == 2
    assert "--full-traces" in capsys.readouterr().err


def test_bench_refuses_a_file_as_out(tmp_path, capsys, no_work):
    (tmp_path / "notes").write_text("x")
    refused(["bench", "--out", str(tmp_path / "notes"), *_BENCH_FAST], capsys,
            "--out", "is a file; give a directory")
    refused(["bench", "--out", str(tmp_path / "notes" / "sub"), *_BENCH_FAST], capsys,
            "--out", "is a file, not a directory")


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps"), (["--workers", "0"], "--workers"),
    (["--tasks", "nope"], "nope"), (["--methods", "nope"], "nope"),
    (["--seeds", "0,0"], "seeds"), (["--lrs", "inf"], "--lrs"),
])
def test_bench_refuses_bad_options_in_one_line(tmp_path, capsys, no_work, argv, needle):
    refused(["bench", "--out", str(tmp_path), *_BENCH_FAST, *argv], capsys, needle)


def test_bench_without_scikit_learn(tmp_path, capsys, monkeypatch, no_work):
    from gradguard.bench import tasks

    monkeypatch.setattr(tasks, "_DATA_CACHE", {})
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    argv = [a if a != "deep-linear" else "deep-linear,deep-mlp-digits" for a in _BENCH_FAST]
    refused(["bench", "--out", str(tmp_path / "b"), *argv], capsys,
            "deep-mlp-digits", "scikit-learn", PIP_BENCH)
    assert not (tmp_path / "b").exists()
