"""The ``gradguard`` command line: ``demo``, ``bench``, ``probe`` and ``report``.

Each sub-command lives in the module that owns the feature and exposes two functions,
``cli_arguments(parser)`` and ``cli_main(args) -> int``. Only the chosen one is imported,
so ``gradguard --help`` stays fast and optional dependencies stay optional.

Bad input is refused in one line on stderr, before any work, with exit status 2: argparse's
own errors (without the usage block), and :class:`CLIError` raised by a sub-command, which
checks its arguments, its output paths (:mod:`gradguard._paths`) and its optional
dependencies (:func:`require_extra`) before it trains or probes anything.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

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
    "demo": ("gradguard.demo", "train an explosion-prone model with and without protection"),
    "bench": ("gradguard.bench.cli", "run the stability benchmark suite"),
    "probe": ("gradguard.probe", "diagnose exploding/vanishing gradients before training"),
    "report": ("gradguard.report.cli", "turn a Guard log (JSONL) into an HTML post-mortem"),
}

#: The distribution that provides each optional module, and the extra that installs it.
_EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "bench"),
    "matplotlib": ("matplotlib", "bench"),
    "numpy": ("numpy", "bench"),
    "rich": ("rich", "bench"),
}


class CLIError(Exception):
    """Bad command-line input. :func:`main` prints ``gradguard COMMAND: error: MESSAGE``
    (one line, no traceback) and returns 2. The message should say what to do."""


def missing_extra(error: ImportError, purpose: str) -> CLIError:
    """The one-line :class:`CLIError` for an optional dependency that failed to import.

    Args:
        error: the ImportError (its ``name``, or its cause's, is the missing module).
        purpose: what needs the module, e.g. ``"the demo's report"``.

    Returns:
        ``<purpose> needs scikit-learn, which is not installed: pip install
        "gradguard[bench]"`` (the extra that provides it).
    """
    module = error.name or getattr(error.__cause__, "name", None) or ""
    top = module.split(".")[0]
    if top in _EXTRAS:
        package, extra = _EXTRAS[top]
        return CLIError(f'{purpose} needs {package}, which is not installed: '
                        f'pip install "gradguard[{extra}]"')
    return CLIError(f'{purpose} needs a module that cannot be imported ({error}); the '
                    f'optional dependencies come with: pip install "gradguard[bench]"')


def require_extra(*modules: str, purpose: str) -> None:
    """Import ``modules`` now, or raise a :class:`CLIError` naming the extra to install.

    Importing (not only finding) them also catches a broken installation up front.

    Args:
        modules: module names, e.g. ``"sklearn"``, ``"matplotlib"``.
        purpose: what needs them, for the message (e.g. ``"the demo's report"``).

    Raises:
        CLIError: see :func:`missing_extra`.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            if e.name is None:
                e.name = module
            raise missing_extra(e, purpose) from None


def positive_int(text: str) -> int:
    """An argparse ``type``: an int ``>= 1``.

    Raises:
        argparse.ArgumentTypeError: naming the value (argparse adds the option).
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number ``> 0``.

    Raises:
        argparse.ArgumentTypeError: naming the value (argparse adds the option).
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line (the usage block is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _parsers(command: str | None) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The top-level parser and the sub-commands' parsers (only ``command``'s options are
    added: that imports only its module)."""
    from gradguard import __version__

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
