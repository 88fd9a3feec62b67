"""``gradguard report INPUT [-o OUT.html] [--title T] [--diagnosis LINE ...]``.

INPUT is either a Guard JSON Lines log (a run report) or the stability benchmark's
output: ``results.json``, its directory, or ``runs.jsonl`` (a benchmark report). Which
one is decided by the content, not the file name. The path written is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gradguard._paths import output_file
from gradguard.cli.checks import CLIError, require_extra

__all__ = ["cli_arguments", "cli_main", "detect_kind"]

_RUN_TYPES = frozenset({"meta", "record", "event"})


def detect_kind(path: str | Path) -> str:
    """``"run"`` for a Guard log, ``"bench"`` for benchmark results or runs.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is neither.
    """
    p = Path(path)
    if p.is_dir():
        return "bench"
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {str(p)!r}")
    with open(p, encoding="utf-8", errors="replace") as f:
        first = ""
        for line in f:
            if line.strip():
                first = line
                break
    try:
        obj = json.loads(first) if first else None
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        if obj.get("type") in _RUN_TYPES:
            return "run"
        if all(k in obj for k in ("task", "method", "lr")):
            return "bench"
    from gradguard.report.bench import looks_like_bench_results

    try:
        whole = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        whole = None
    if looks_like_bench_results(whole):
        return "bench"
    raise ValueError(
        f"{str(p)!r} is neither a Guard JSON Lines log (lines with \"type\": meta, record or "
        "event) nor gradguard benchmark results (results.json or runs.jsonl)"
    )


def _default_output(src: Path) -> Path:
    if src.is_dir():
        return src / "report.html"
    return src.with_suffix(".html")


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` sub-command's arguments."""
    parser.add_argument(
        "input",
        help="a Guard JSON Lines log (RUN.jsonl), or benchmark results: results.json, the "
        "bench output directory, or its runs.jsonl",
    )
    parser.add_argument(
        "-o", "--output", default=None, metavar="OUT.html|DIR",
        help="the HTML file to write, or a directory to write report.html in (default: "
        "INPUT with the suffix .html; report.html inside an INPUT directory)",
    )
    parser.add_argument("--title", default=None,
                        help="the page title (default: from the input's file name)")
    parser.add_argument(
        "--diagnosis", action="append", default=None, metavar="LINE",
        help="a line shown prominently at the top of a run report (repeatable; default: "
        "none)",
    )


def cli_main(args: argparse.Namespace) -> int:
    """Write the report; print its path. Returns 0.

    Raises:
        CLIError: for an input that is not a Guard log or benchmark results, an output
            that cannot be written, or a missing matplotlib.
    """
    src = Path(args.input)
    try:
        kind = detect_kind(src)
        if args.output:
            out = output_file(args.output, name="-o/--output", default_name="report.html")
        else:
            out = output_file(_default_output(src), name="the output (give -o/--output)")
        if out.resolve() == src.resolve():
            raise ValueError(f"the output {str(out)!r} would overwrite the input; give "
                             "-o/--output")
    except (ValueError, TypeError, OSError) as e:
        raise CLIError(str(e)) from None
    require_extra("matplotlib", "numpy", purpose="the HTML report")
    try:
        if kind == "run":
            from gradguard.report.run import write_run_report

            path = write_run_report(src, out, title=args.title, diagnosis=args.diagnosis)
        else:
            from gradguard.report.bench import write_bench_report

            if args.diagnosis:
                print("gradguard report: --diagnosis applies to run reports; ignored",
                      file=sys.stderr)
            path = write_bench_report(src, out, title=args.title)
    except (ValueError, OSError) as e:  # the input is read (and judged) while rendering
        raise CLIError(str(e)) from None
    print(path)
    return 0
