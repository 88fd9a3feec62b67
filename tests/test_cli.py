"""The ``gradguard`` command line: bad input is refused in one line, before any work.

Each refusal test runs under ``no_work``, which makes every entry point that trains or
probes fail the test if it is reached; so "before any training" is checked by what is
called, not by the clock.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import _paths
from gradguard.cli import COMMANDS, CLIError, main, missing_extra, require_extra

PIP_BENCH = 'pip install "gradguard[bench]"'

ZOO = """\
import torch.nn as nn

def deep():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

def needs(width):
    return nn.Linear(width, width)

class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

def number():
    return 3

def fails():
    raise RuntimeError("the weights file is missing")
"""


def _fail(*args, **kwargs):
    raise AssertionError("the command started working before refusing its input")


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradguard.bench.cli
    import gradguard.bench.runner
    import gradguard.demo

    monkeypatch.setattr(gradguard.bench.runner, "run_one", _fail)
    monkeypatch.setattr(gradguard.bench.runner, "run_grid", _fail)
    monkeypatch.setattr(gradguard.bench.cli, "run_grid", _fail)
    monkeypatch.setattr(gradguard.demo.mp, "get_context", _fail)
    monkeypatch.setattr(_probe_module(), "probe", _fail)


def _probe_module():
    # ``gradguard.probe`` as an attribute is the re-exported function, not the module.
    return importlib.import_module("gradguard.probe")


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    path = tmp_path / "zoo.py"
    path.write_text(ZOO)
    return path


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


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------

_DEMO_FAST = ["--steps", "2", "--seeds", "1", "--workers", "1"]


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
    from gradguard.bench import tasks

    monkeypatch.setattr(tasks, "_DATA_CACHE", {})  # the digits must be loaded afresh
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, f"{module}.datasets", None)
    refused(["demo", "--out", str(tmp_path), *_DEMO_FAST], capsys, package, PIP_BENCH)
    assert list(tmp_path.iterdir()) == []


def test_demo_output_paths(tmp_path):
    from gradguard.demo import DEFAULT_OUT, output_paths

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


# --------------------------------------------------------------------------------------
# probe
# --------------------------------------------------------------------------------------


def test_probe_fix_refuses_a_directory(zoo, tmp_path, capsys, no_work):
    refused(["probe", f"{zoo}:deep", "--input-shape", "4", "8", "--fix", str(tmp_path)],
            capsys, "--fix", "is a directory", "fixed.pt")
    refused(["probe", f"{zoo}:deep", "--input-shape", "4", "8", "--fix", f"{zoo}/x.pt"],
            capsys, "--fix", "is a file, not a directory")


@pytest.mark.parametrize("factory, needles", [
    ("needs", ("needs arguments (width)", "def build():")),
    ("Block", ("needs arguments (width)",)),
    ("number", ("returned int, not an nn.Module",)),
    ("fails", ("fails() raised RuntimeError: the weights file is missing",)),
    ("missing", ("'missing' is not a callable",)),
])
def test_probe_refuses_bad_factories(zoo, capsys, no_work, factory, needles):
    refused(["probe", f"{zoo}:{factory}", "--input-shape", "4", "8"], capsys, *needles)


def test_probe_refuses_bad_targets(zoo, tmp_path, capsys, no_work):
    refused(["probe", "no_such_module_xyz:build", "--input-shape", "4"], capsys,
            "cannot import 'no_such_module_xyz'", "path of a .py file")
    refused(["probe", str(tmp_path / "absent.py") + ":build", "--input-shape", "4"], capsys,
            "no such file")
    refused(["probe", str(zoo), "--input-shape", "4"], capsys, "MODULE:FACTORY expected")
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise ValueError('bad config')\n")
    refused(["probe", f"{broken}:build", "--input-shape", "4"], capsys,
            "importing", "ValueError: bad config")
    needs_dep = tmp_path / "needs_dep.py"
    needs_dep.write_text("import no_such_dependency_xyz\n")
    line = refused(["probe", f"{needs_dep}:build", "--input-shape", "4"], capsys,
                   "no_such_dependency_xyz")
    assert "path of a .py file" not in line  # the file was found; its import was not


@pytest.mark.parametrize("argv, needles", [
    (["--input-shape", "4", "9"], ("--input-shape 4 9", "mat1 and mat2", "batch first")),
    (["--input-shape", "4", "8", "--input-shape", "4", "8"], ("forward fails",)),
    (["--input-shape", "4", "8", "--input-dtype", "long"], ("--input-dtype",)),
    (["--input-shape", "0", "8"], ("--input-shape", "'0'")),
    (["--input-shape", "4", "-8"], ("--input-shape", "'-8'")),
    (["--input-shape", "4", "x"], ("--input-shape",)),
    (["--input-shape", "4", "8", "--tolerance", "1"], ("--tolerance",)),
    (["--input-shape", "4", "8", "--n-batches", "0"], ("--n-batches",)),
    (["--input-shape", "4", "8", "--vocab", "0"], ("--vocab",)),
    ([], ("--input-shape",)),
])
def test_probe_refuses_inputs_the_model_does_not_take(zoo, capsys, no_work, argv, needles):
    refused(["probe", f"{zoo}:deep", *argv], capsys, *needles)


def test_probe_input_check_leaves_the_model_as_it_was(zoo, capsys, monkeypatch):
    """The forward pass that checks the inputs runs in eval mode without gradients and
    restores every module's mode: BatchNorm's running statistics do not move."""
    probe_module = _probe_module()
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    model[2].eval()  # mixed modes survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def fake_probe(m, example, **kwargs):
        seen["modes"] = [x.training for x in m.modules()]
        seen["state"] = {k: v.clone() for k, v in m.state_dict().items()}
        raise ValueError("stop here")

    monkeypatch.setattr(probe_module, "probe", fake_probe)
    args = argparse.Namespace(target="x:y", input_shape=[[16, 8]], input_dtype="float32",
                              vocab=10, n_batches=1, eval=False, tolerance=20.0, seed=0,
                              max_rows=10, fix=None)
    monkeypatch.setattr(probe_module, "_load_factory", lambda target: lambda: model)
    with pytest.raises(CLIError, match="stop here"):
        probe_module.cli_main(args)
    assert seen["modes"] == [True, True, True, False]
    for k, v in before.items():
        assert torch.equal(seen["state"][k], v), k


# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------

_BENCH_FAST = ["--tasks", "deep-linear", "--methods", "none", "--seeds", "1", "--lrs", "0.1",
               "--steps", "2", "--workers", "1", "--no-progress"]


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


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


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
    assert main(["report", str(guard_log), "-o", str(out)]) == 0
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


# --------------------------------------------------------------------------------------
# help, dispatcher, helpers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_with_its_default(command):
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).cli_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help, (command, action.option_strings)
        assert ("default" in action.help) != action.required, (command, action.help)


def test_demo_help_lists_the_tasks_of_the_registry(capsys, monkeypatch):
    from gradguard.bench import tasks

    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap at hyphens
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in tasks.TASKS:
        assert name in text
    assert "(default: deep-mlp-digits)" in text and "(default: gradguard-demo)" in text
    parser = argparse.ArgumentParser()
    importlib.import_module("gradguard.demo").cli_arguments(parser)
    (task,) = [a for a in parser._actions if a.dest == "task"]
    assert set(task.choices) == set(tasks.TASKS) | set(tasks.expand_task_specs(["all"]))


def test_help_version_and_no_command(capsys):
    assert main(["--version"]) == 0
    assert "gradguard" in capsys.readouterr().out
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_cli_error_messages_are_flattened_to_one_line(capsys, monkeypatch):
    import gradguard.report.cli as report_cli

    def two_lines(args):
        raise CLIError("first\nsecond")

    monkeypatch.setattr(report_cli, "cli_main", two_lines)
    assert main(["report", "x"]) == 2
    assert capsys.readouterr().err == "gradguard report: error: first second\n"


def test_require_extra_and_missing_extra(monkeypatch):
    require_extra("math", purpose="x")  # present: nothing happens
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(CLIError, match=r'^the thing needs rich, which is not installed: '
                                       r'pip install "gradguard\[bench\]"$'):
        require_extra("rich", purpose="the thing")
    wrapped = ImportError("the digits tasks need scikit-learn")
    wrapped.__cause__ = ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
    assert "needs scikit-learn" in str(missing_extra(wrapped, "the task"))
    other = missing_extra(ImportError("cannot import name 'x'"), "the task")
    assert "cannot import name 'x'" in str(other) and PIP_BENCH in str(other)


def test_paths_helpers(tmp_path):
    file = tmp_path / "f.txt"
    file.write_text("x")
    assert _paths.output_file(file, name="o") == file  # replaced when written
    assert _paths.output_file(tmp_path, name="o", default_name="r.html") == tmp_path / "r.html"
    assert _paths.output_file(str(tmp_path / "n") + "/", name="o", default_name="r.html") \
        == tmp_path / "n" / "r.html"
    assert _paths.output_dir(tmp_path / "a" / "b", name="o") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing is created
    with pytest.raises(ValueError, match=r"'o' .* is a directory; give a file name"):
        _paths.output_file(tmp_path, name="'o'")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        _paths.output_dir(file, name="o")
    with pytest.raises(ValueError, match="must be a path"):
        _paths.output_file("  ", name="o")
    with pytest.raises(TypeError, match="o must be a path, got int 3"):
        _paths.output_dir(3, name="o")
    assert _paths.names_directory(tmp_path) and _paths.names_directory("nowhere/")
    assert not _paths.names_directory(file) and not _paths.names_directory("nowhere")
