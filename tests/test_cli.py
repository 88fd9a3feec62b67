"""The ``gradguard`` dispatcher (:mod:`gradguard.cli`): help, version, one-line errors."""

from __future__ import annotations

import argparse
import importlib

import pytest

from gradguard.cli import COMMANDS, CLIError, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_with_its_default(command):
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).cli_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help, (command, action.option_strings)
        assert ("default" in action.help) != action.required, (command, action.help)


def test_help_version_and_no_command(capsys):
    assert main(["--version"]) == 0
    assert "gradguard" in capsys.readouterr().out
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_cli_error_messages_are_flattened_to_one_line(capsys, monkeypatch):
    import gradguard.cli.report as report_cli

    def two_lines(args):
        raise CLIError("first\nsecond")

    monkeypatch.setattr(report_cli, "cli_main", two_lines)
    assert main(["report", "x"]) == 2
    assert capsys.readouterr().err == "gradguard report: error: first second\n"
