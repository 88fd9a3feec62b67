"""``gradguard report`` (:mod:`gradguard.cli.report`): a run or benchmark report from the
command line; bad input and outputs refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from cli_utils import PIP_BENCH, refused
from gradguard.cli import main as cli
from gradguard.log.readback import read_jsonl


@pytest.fixture
def guard_log(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    log = tmp_path / "run.jsonl"
    guard = gg.Guard(model, clip=1.0, sinks=[str(log)], log_every=2)
    for _ in range(4):
        model.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        guard.step()
    guard.close()
    return log


def test_report_into_a_directory(guard_log, tmp_path, capsys):
    out = tmp_path / "pages"
    out.mkdir()
    assert cli(["report", str(guard_log), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert "<html" in (out / "report.html").read_text(encoding="utf-8")


def test_report_refuses_unwritable_outputs(guard_log, tmp_path, capsys):
    refused(["report", str(guard_log), "-o", f"{guard_log}/x.html"], capsys,
            "-o/--output", "is a file, not a directory")
    refused(["report", str(guard_log), "-o", str(guard_log)], capsys, "overwrite the input")


def test_report_without_matplotlib(guard_log, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    refused(["report", str(guard_log)], capsys, "matplotlib", PIP_BENCH)
    assert not guard_log.with_suffix(".html").exists()


def test_cli_run_and_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from report_utils import bench_results, write_log

    log = write_log(tmp_path / "run.jsonl", ["w", "b"], 3)
    assert cli(["report", str(log), "--title", "T", "--diagnosis", "line one"]) == 0
    out = tmp_path / "run.html"
    assert capsys.readouterr().out.strip() == str(out)
    assert "line one" in out.read_text(encoding="utf-8")

    (tmp_path / "results.json").write_text(json.dumps(bench_results(), indent=1))
    target = tmp_path / "x" / "bench.html"
    assert cli(["report", str(tmp_path / "results.json"), "-o", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert "toy-mse" in target.read_text(encoding="utf-8")


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    assert cli(["report", str(bad)]) == 2
    assert "neither a Guard JSON Lines log" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert not (tmp_path / "notes.html").exists()


def test_malformed_log_lines_give_a_clear_error(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    lines = ['{"type":"event","step":1.5,"kind":"k","message":"m"}',
             '{"type":"event","step":1,"kind":"k","message":"m","data":[1,2]}',
             '{"type":"event","step":1,"kind":"k","message":"m","layers":5}',
             '{"type":"meta","names":5}']
    for i, line in enumerate(lines):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=f"bad{i}.jsonl:1: malformed"):
            read_jsonl(bad)
        assert cli(["report", str(bad)]) == 2
        assert "malformed" in capsys.readouterr().err
