"""The ``gradguard`` command line: ``demo``, ``bench``, ``probe`` and ``report``.

Each sub-command lives in the module that owns the feature and exposes two functions,
``cli_arguments(parser)`` and ``cli_main(args) -> int``. Only the chosen one is imported,
so ``gradguard --help`` stays fast and optional dependencies stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("gradguard.demo", "train an explosion-prone model with and without protection"),
    "bench": ("gradguard.bench.cli", "run the stability benchmark suite"),
    "probe": ("gradguard.probe", "diagnose exploding/vanishing gradients before training"),
    "report": ("gradguard.report.cli", "turn a Guard log (JSONL) into an HTML post-mortem"),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    from gradguard import __version__

    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Stop deep-network training from blowing up.",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).cli_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.cli_main(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
