"""``gradguard demo`` (:mod:`gradguard.cli.demo`): the run end to end, its outputs, and
bad input refused in one line before any training."""

from __future__ import annotations

import argparse
import html.parser
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_utils import PIP_BENCH, forbid_work, refused
from gradguard.bench import tasks
from gradguard.cli import demo as demo_cli
from gradguard.cli import main

_DEMO_FAST = ["--steps", "2", "--seeds", "1", "--workers", "1"]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_work(monkeypatch)


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_demo_prints_the_table_and_leaves_one_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--steps", "12", "--seeds", "1", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    for label in ("no protection", "torch clip_grad_norm_(1.0)", 'Guard(clip="auto")',
                  "probe at initialisation", "report: gradguard-demo/report.html",
                  "Guard log: gradguard-demo/guard.jsonl"):
        assert label in printed
    rows = [line for line in printed.splitlines()
            if line.startswith(("no prot", "torch", "gradguard Guard"))]
    assert len(rows) == 3 and all("/1" in r for r in rows)
    # the default --out is one folder: nothing else is left in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo_cli.DEFAULT_OUT]
    out = tmp_path / demo_cli.DEFAULT_OUT
    assert sorted(p.name for p in out.iterdir()) == ["guard.jsonl", "report.html"]
    parser = _Text()
    parser.feed((out / "report.html").read_text())
    page = " ".join(parser.text)
    assert "gradguard demo" in page and "probe at initialisation" in page


def test_demo_default_output_is_ignored_by_git():
    """Run from the repository root, the demo leaves ``git status`` clean."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("report.html", "guard.jsonl"):
        path = f"{demo_cli.DEFAULT_OUT}/{name}"
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0


def test_demo_refuses_an_existing_file_as_out(tmp_path, capsys, no_work):
    (tmp_path / "notes").write_text("x")
    refused(["demo", "--out", str(tmp_path / "notes"), *_DEMO_FAST], capsys,
            "--out", "is an existing file", ".html")


def test_demo_refuses_an_out_under_a_file(tmp_path, capsys, no_work):
    (tmp_path / "notes").write_text("x")
    for out in ("notes/report.html", "notes/folder", "notes/sub/"):
        refused(["demo", "--out", str(tmp_path / out), *_DEMO_FAST], capsys,
                "--out", "is a file, not a directory")


def test_demo_refuses_a_folder_named_like_the_report(tmp_path, capsys, no_work):
    (tmp_path / "out" / "report.html").mkdir(parents=True)
    refused(["demo", "--out", str(tmp_path / "out"), *_DEMO_FAST], capsys, "is a directory")


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes anywhere")
def test_demo_refuses_a_read_only_folder(tmp_path, capsys, no_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(["demo", "--out", str(ro / "new"), *_DEMO_FAST], capsys, "permission denied")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("argv, needle", [
    (["--task", "nope"], "deep-mlp-digits"),  # lists the valid tasks
    (["--seeds", "0"], "--seeds"), (["--workers", "-1"], "--workers"),
    (["--steps", "0"], "--steps"), (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--lr", "x"], "--lr"), (["--bogus"], "--bogus"),
])
def test_demo_refuses_bad_options_in_one_line(capsys, no_work, argv, needle):
    refused(["demo", *argv], capsys, needle, "gradguard demo --help")


@pytest.mark.parametrize("module, package", [("sklearn", "scikit-learn"),
                                             ("matplotlib", "matplotlib")])
def test_demo_without_the_bench_extra(tmp_path, capsys, monkeypatch, no_work, module, package):
    monkeypatch.setattr(tasks, "_DATA_CACHE", {})  # the digits must be loaded afresh
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, f"{module}.datasets", None)
    refused(["demo", "--out", str(tmp_path), *_DEMO_FAST], capsys, package, PIP_BENCH)
    assert list(tmp_path.iterdir()) == []


def test_demo_output_paths(tmp_path):
    from gradguard.cli.demo import DEFAULT_OUT, output_paths

    assert output_paths(DEFAULT_OUT) == (Path(DEFAULT_OUT, "report.html"),
                                         Path(DEFAULT_OUT, "guard.jsonl"))
    existing = tmp_path / "existing"
    existing.mkdir()
    for folder in (str(existing), str(tmp_path / "new") + "/", str(tmp_path / "plain")):
        assert output_paths(folder) == (Path(folder, "report.html"), Path(folder, "guard.jsonl"))
    page = tmp_path / "r.HTML"
    assert output_paths(str(page)) == (page, tmp_path / "r.jsonl")
    # a folder that happens to be called *.html is a folder
    (tmp_path / "x.html").mkdir()
    assert output_paths(str(tmp_path / "x.html"))[0] == tmp_path / "x.html" / "report.html"
    assert not (tmp_path / "new").exists() and not (tmp_path / "plain").exists()


def test_demo_help_lists_the_tasks_of_the_registry(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap at hyphens
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in tasks.TASKS:
        assert name in text
    assert "(default: deep-mlp-digits)" in text and "(default: gradguard-demo)" in text
    parser = argparse.ArgumentParser()
    importlib.import_module("gradguard.cli.demo").cli_arguments(parser)
    (task,) = [a for a in parser._actions if a.dest == "task"]
    assert set(task.choices) == set(tasks.TASKS) | set(tasks.expand_task_specs(["all"]))
