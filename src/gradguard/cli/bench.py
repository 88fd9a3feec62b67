"""``gradguard bench``: run the stability benchmark; write ``results.json`` and ``table.md``.

Example::

    gradguard bench --tasks deep-mlp-digits,adding-rnn --methods none,tuned,agc \\
        --seeds 3 --out bench-out
"""

from __future__ import annotations

import argparse
import os
import sys

from gradguard._paths import output_dir
from gradguard.bench.gpt import GPT
from gradguard.bench.grid import DEFAULT_LRS, GridConfig, run_grid
from gradguard.bench.methods import META_METHODS, METHODS, expand_method_specs
from gradguard.bench.tasks import SUITES, TASKS, expand_task_specs, get_task
from gradguard.cli.checks import CLIError, missing_extra, positive_int

__all__ = ["cli_arguments", "cli_main", "parse_lrs", "parse_seeds"]


def _grid(lrs: tuple[float, ...] | None) -> str:
    return ",".join(f"{x:g}" for x in lrs or ())


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_seeds(text: str) -> list[int]:
    """``"3"`` means seeds 0, 1, 2; a comma list (``"0,5"``, or ``"7,"`` for one) is taken
    as given.

    Raises:
        ValueError: naming ``--seeds`` and the value.
    """
    try:
        if "," in text:
            seeds = [int(s) for s in _csv(text)]
        else:
            n = int(text)
            if n < 1:
                raise ValueError
            seeds = list(range(n))
    except ValueError:
        raise ValueError(
            f"--seeds must be a count >= 1 or a comma-separated list of ints >= 0, got {text!r}"
        ) from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be ints >= 0, got {text!r}")
    return seeds


def parse_lrs(text: str) -> list[float]:
    """A comma-separated list of learning rates > 0.

    Raises:
        ValueError: naming ``--lrs`` and the value.
    """
    try:
        lrs = [float(s) for s in _csv(text)]
    except ValueError:
        raise ValueError(f"--lrs must be comma-separated numbers, got {text!r}") from None
    if not lrs or any(not (lr > 0 and lr < float("inf")) for lr in lrs):
        raise ValueError(f"--lrs must be finite numbers > 0, got {text!r}")
    return lrs


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    task_names = ", ".join(TASKS)
    suites = ", ".join(SUITES)
    method_names = ", ".join(sorted([*METHODS, *META_METHODS]))
    parser.add_argument("--tasks", default="all",
                        help=f"comma-separated task specs or suites ({suites}). Tasks: "
                        f"{task_names}; spike-injection[:x100|nan|clean], "
                        "gpt[:preln|postln|corrupt|bf16] (default: %(default)s)")
    parser.add_argument("--methods", default="default",
                        help="comma-separated method specs, e.g. none,clip:1,tuned,value:1,"
                        "agc:0.01; 'default' = none,tuned,value,agc,peer-*. Methods: "
                        f"{method_names} (default: %(default)s)")
    parser.add_argument("--seeds", default="3",
                        help="a count (3 = seeds 0,1,2) or a comma list (default: %(default)s)")
    parser.add_argument("--lrs", default=None,
                        help="comma-separated learning-rate grid (default: each task's own: "
                        f"{_grid(DEFAULT_LRS)} for the SGD tasks, {_grid(GPT.default_lrs)} "
                        "for the gpt tasks)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per run (default: each task's, 300)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="worker processes, one torch thread each (default: the CPU "
                        "count, %(default)s here)")
    parser.add_argument("--out", default="bench-out", metavar="DIR",
                        help="output directory for runs.jsonl, results.json, table.md "
                        "(default: %(default)s)")
    parser.add_argument("--full-traces", default="", metavar="METHODS",
                        help="comma-separated methods whose runs keep every step's loss and "
                        "gradient norm in results.json (default: none)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs already in DIR/runs.jsonl (default: off)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress reports (default: progress on stderr)")


def _config(args: argparse.Namespace) -> GridConfig:
    """The grid the arguments ask for, validated.

    Raises:
        ValueError: naming the option and the value.
    """
    config = GridConfig(
        tasks=_csv(args.tasks),
        methods=_csv(args.methods),
        lrs=None if args.lrs is None else parse_lrs(args.lrs),
        seeds=parse_seeds(args.seeds),
        steps=args.steps,
        workers=args.workers,
        full_trace_methods=_csv(args.full_traces),
    )
    config.validate()
    expand_task_specs(config.tasks)
    expand_method_specs(config.methods)
    try:
        expand_method_specs(config.full_trace_methods)
    except ValueError as e:
        raise ValueError(f"--full-traces: {e}") from None
    return config


def _load_task_data(config: GridConfig) -> None:
    """Each task's data, once, in this process: a missing optional dependency (scikit-learn
    for the digits tasks) is refused here, before the first run, not in a worker."""
    for spec in expand_task_specs(config.tasks):
        try:
            get_task(spec).data()
        except ImportError as e:
            raise missing_extra(e, f"the task {spec}") from None


def cli_main(args: argparse.Namespace) -> int:
    """Run the grid; 0 on success, 1 if some runs raised.

    Raises:
        CLIError: for bad arguments, an output directory that cannot be written or a
            missing optional dependency, before any run.
    """
    try:
        config = _config(args)
        out = output_dir(args.out, name="--out")
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    _load_task_data(config)
    results = run_grid(config, out, progress=not args.no_progress, resume=args.resume)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}", file=sys.stderr)
    return 1 if results["errors"] else 0
