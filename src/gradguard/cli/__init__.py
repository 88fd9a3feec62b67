"""The ``gradguard`` command line: ``demo``, ``bench``, ``probe`` and ``report``.

Each sub-command is a module of this package (:mod:`gradguard.cli.demo`,
:mod:`~gradguard.cli.bench`, :mod:`~gradguard.cli.probe`, :mod:`~gradguard.cli.report`)
with two functions, ``cli_arguments(parser)`` and ``cli_main(args) -> int``: argument
parsing and the entry point only; the work is done by the library. Only the chosen
sub-command is imported, so ``gradguard --help`` stays fast and optional dependencies stay
optional.

Bad input is refused in one line on stderr, before any work, with exit status 2: argparse's
own errors (without the usage block), and :class:`CLIError` raised by a sub-command, which
checks its arguments, its output paths (:mod:`gradguard._paths`) and its optional
dependencies (:func:`require_extra`) before it trains or probes anything.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gradguard.cli.checks import (
    CLIError,
    missing_extra,
    positive_float,
    positive_int,
    require_extra,
)

__all__ = [
    "COMMANDS",
    "CLIError",
    "main",
    "missing_extra",
    "positive_float",
    "positive_int",
    "require_extra",
]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("gradguard.cli.demo", "train an explosion-prone model with and without protection"),
    "bench": ("gradguard.cli.bench", "run the stability benchmark suite"),
    "probe": ("gradguard.cli.probe", "diagnose exploding/vanishing gradients before training"),
    "report": ("gradguard.cli.report", "turn a Guard log (JSONL) into an HTML post-mortem"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line (the usage block is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _parsers(command: str | None) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The top-level parser and the sub-commands' parsers (only ``command``'s options are
    added: that imports only its module)."""
    from gradguard._version import __version__

    parser = _Parser(prog="gradguard", description="Stop deep-network training from blowing up.")
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).cli_arguments(p)
        subparsers[name] = p
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` console script.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for bad input (one line on stderr), otherwise the
        sub-command's own status (e.g. 1 when the probe finds a problem).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, subparsers = _parsers(command if command in COMMANDS else None)
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the sub-command's parser, which names the command
            subparsers.get(args.command, parser).error(
                f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help, --version, or an argparse error (already printed)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.cli_main(args) or 0)
    except CLIError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"gradguard {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
