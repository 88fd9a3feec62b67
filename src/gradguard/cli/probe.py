"""``gradguard probe MODULE:FACTORY --input-shape N ...``: the probe from the command line.

Loads the model from a zero-argument factory (an importable module or a ``.py`` path),
draws random inputs of the given shapes, checks in one forward pass that the model takes
them, runs :func:`gradguard.probe` and prints its summary and per-layer table; with
``--fix OUT.pt`` it applies the recommended initialisation, probes again and saves the
fixed ``state_dict``. The exit status is 0 when the (final) verdict is healthy, 1
otherwise, 2 for input refused before probing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard._paths import output_file
from gradguard.cli.checks import CLIError, positive_int
from gradguard.signal.probe import probe

__all__ = ["cli_arguments", "cli_main", "load_factory"]


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gradguard probe`` arguments to ``parser``."""
    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="an importable module (or a .py path) and a zero-argument "
                             "callable returning an nn.Module, e.g. mypkg.models:build")
    parser.add_argument("--input-shape", type=positive_int, nargs="+", action="append",
                        required=True, metavar="N",
                        help="shape of one input batch, batch first, e.g. --input-shape 64 3 "
                             "32 32 (repeat the option for several inputs; required)")
    parser.add_argument("--input-dtype", choices=("float32", "float64", "long"),
                        default="float32",
                        help="inputs are N(0,1) floats or integer ids (default: %(default)s)")
    parser.add_argument("--vocab", type=positive_int, default=1000,
                        help="integer inputs are drawn from [0, vocab) (default: %(default)s)")
    parser.add_argument("--n-batches", type=positive_int, default=1,
                        help="batches to average (default: %(default)s)")
    parser.add_argument("--eval", action="store_true",
                        help="probe in eval mode (default: training mode)")
    parser.add_argument("--tolerance", type=_tolerance, default=20.0,
                        help="the verdict's band factor: a gain outside [1/T, T] is exploding "
                             "or vanishing (> 1; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the inputs and the backward cotangent "
                             "(default: %(default)s)")
    parser.add_argument("--max-rows", type=positive_int, default=60,
                        help="rows of the per-layer table, first and last "
                             "(default: %(default)s)")
    parser.add_argument("--fix", metavar="OUT.pt", default=None,
                        help="apply the recommended initialisation, probe again and save "
                             "the fixed state_dict to OUT.pt (default: no fix)")


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 1):
        raise argparse.ArgumentTypeError(f"expected a finite number > 1, got {text!r}")
    return value


def load_factory(target: str) -> Callable[[], nn.Module]:
    """The zero-argument callable that ``MODULE:FACTORY`` names.

    Raises:
        ValueError: saying what is wrong with ``target`` and what to give instead: no
            ``:``, a module that is missing or fails to import, a name that is not a
            callable, or a callable that needs arguments.
    """
    import inspect

    if ":" not in target:
        raise ValueError(f"MODULE:FACTORY expected, e.g. mypkg.models:build or "
                         f"models.py:build, got {target!r}")
    mod_name, fn_name = target.rsplit(":", 1)
    path = Path(mod_name)
    spec = None
    if mod_name.endswith(".py") or path.exists():
        if not path.is_file():
            raise ValueError(f"no such file: {mod_name!r}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import {mod_name!r}")
    elif "" not in sys.path:
        sys.path.insert(0, "")
    try:
        if spec is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        hint = ""
        if e.name is not None and (mod_name + ".").startswith(e.name + "."):
            hint = " (give an importable module or the path of a .py file)"
        raise ValueError(f"cannot import {mod_name!r}: {e}{hint}") from None
    except Exception as e:  # the user's module failed while importing
        raise ValueError(f"importing {mod_name!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{fn_name!r} is not a callable in {mod_name!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: calling it will tell
        return fn
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise ValueError(
            f"{target} needs arguments ({', '.join(required)}); the probe calls FACTORY "
            f"with none: add a function such as 'def build(): return {fn_name}(...)' and "
            f"pass {mod_name}:build")
    return fn


def _cli_inputs(args: argparse.Namespace) -> Any:
    gen = torch.Generator().manual_seed(args.seed)
    inputs = []
    for shape in args.input_shape:
        if args.input_dtype == "long":
            inputs.append(torch.randint(0, args.vocab, tuple(shape), generator=gen))
        else:
            inputs.append(torch.randn(tuple(shape), generator=gen,
                                      dtype=getattr(torch, args.input_dtype)))
    return inputs[0] if len(inputs) == 1 else tuple(inputs)


def _check_forward(model: nn.Module, example: Any, args: argparse.Namespace) -> None:
    """One forward pass without gradients, in eval mode (no BatchNorm statistics change,
    every module's mode is restored), so that inputs the model does not accept are refused
    in one line before the probe.

    Raises:
        ValueError: naming the shapes and the model's complaint.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*example) if isinstance(example, tuple) else model(example)
    except Exception as e:  # whatever the user's forward raises on these inputs
        shapes = " ".join(f"--input-shape {' '.join(map(str, s))}" for s in args.input_shape)
        complaint = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"the model's forward fails on {args.input_dtype} inputs {shapes}: "
            f"{type(e).__name__}: {complaint} (give the shape of one batch, batch first, "
            "one --input-shape per forward argument, and the right --input-dtype)") from None
    finally:
        for m, training in modes:
            m.training = training


def cli_main(args: argparse.Namespace) -> int:
    """Run ``gradguard probe``: print the table and verdict; exit 0 iff (finally) healthy.

    Raises:
        CLIError: before probing, for a target that does not load, a factory
            that needs arguments or returns no module, inputs the model does not accept or
            a ``--fix`` path that cannot be written.
    """
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    try:
        fix = None if args.fix is None else output_file(args.fix, name="--fix",
                                                        example="fixed.pt")
        factory = load_factory(args.target)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    try:
        model = factory()
    except Exception as e:  # the user's factory failed: one line, not our traceback
        raise CLIError(f"{args.target}() raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"{args.target} returned {type(model).__name__}, not an nn.Module; "
                       "FACTORY must return the model")
    example = _cli_inputs(args)
    try:
        _check_forward(model, example, args)
        report = probe(model, example, n_batches=args.n_batches, train=not args.eval,
                       tolerance=args.tolerance, seed=args.seed)
    except ValueError as e:  # e.g. no parameter requires grad
        raise CLIError(str(e)) from None
    print(report.summary())
    print(report.table(max_rows=args.max_rows))
    final = report
    if fix is not None:
        result = report.fix(model, force=False)
        print()
        print(result.init if result.init is not None else "nothing to fix")
        print()
        print(result.after.summary())
        print(result.after.table(max_rows=args.max_rows))
        fix.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), fix)
        print(f"\nfixed state_dict written to {fix}")
        final = result.after
    return 0 if final.verdict == "healthy" else 1
