"""Helpers of the command-line tests (``tests/test_cli*.py``): a refusal checker and a
guard that fails the test when a command starts working before refusing its input."""

from __future__ import annotations

import importlib

import pytest

from gradguard.cli import main

PIP_BENCH = 'pip install "gradguard[bench]"'


def _fail(*args, **kwargs):
    raise AssertionError("the command started working before refusing its input")


def forbid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every entry point that trains or probes fail the test if it is reached; so
    "before any training" is checked by what is called, not by the clock."""
    bench_run = importlib.import_module("gradguard.bench.run")
    bench_grid = importlib.import_module("gradguard.bench.grid")
    bench_demo = importlib.import_module("gradguard.bench.demo")
    cli_bench = importlib.import_module("gradguard.cli.bench")
    cli_probe = importlib.import_module("gradguard.cli.probe")
    # ``gradguard.signal.probe`` as an attribute may be the re-exported function
    signal_probe = importlib.import_module("gradguard.signal.probe")

    for module in (bench_run, bench_grid, bench_demo):
        monkeypatch.setattr(module, "run_one", _fail)
    monkeypatch.setattr(bench_grid, "run_grid", _fail)
    monkeypatch.setattr(cli_bench, "run_grid", _fail)
    monkeypatch.setattr(bench_demo.mp, "get_context", _fail)
    monkeypatch.setattr(cli_probe, "probe", _fail)
    monkeypatch.setattr(signal_probe, "probe", _fail)


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run ``gradguard argv``; assert exit status 2, one line on stderr naming the
    command and containing ``needles``, nothing on stdout, no traceback; return the line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gradguard {argv[0]}: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
