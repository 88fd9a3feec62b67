"""``gradguard probe MODULE:FACTORY --input-shape N ...``: the probe from the command line.

Loads the model from a zero-argument factory (an importable module or a ``.py`` path). The
example inputs are random inputs of the shapes given (``--input-shape`` per positional
argument; ``--input-ids-shape B T`` for a keyword ``input_ids``, as Hugging Face models
take, with ids below the model's ``config.vocab_size``), or the factory returns them itself
as ``(model, example_inputs)`` (anything :func:`gradguard.probe` takes: a tensor, a tuple,
a dict of keyword arguments). One forward pass checks that the model takes them, then
:func:`gradguard.probe` runs and its summary and per-layer table are printed; with
``--fix OUT.pt`` the recommended initialisation is applied, the model probed again and the
fixed ``state_dict`` saved (or the reason it could not be fixed printed). The exit status is
0 when the (final) verdict is healthy, 1 otherwise, 2 for input refused before probing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard._paths import output_file
from gradguard.cli.checks import CLIError, finite_above, positive_int
from gradguard.signal.inputs import Call, as_batches
from gradguard.signal.probe import probe

__all__ = ["cli_arguments", "cli_main", "load_factory"]


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gradguard probe`` arguments to ``parser``."""
    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="an importable module (or a .py path) and a zero-argument "
                             "callable returning an nn.Module, or (model, example_inputs), "
                             "e.g. mypkg.models:build")
    parser.add_argument("--input-shape", type=positive_int, nargs="+", action="append",
                        metavar="N",
                        help="shape of one input batch, batch first, e.g. --input-shape 64 3 "
                             "32 32 (repeat the option for several positional inputs; "
                             "default: none, the inputs FACTORY returns)")
    parser.add_argument("--input-ids-shape", type=positive_int, nargs="+", metavar="N",
                        help="shape of a keyword input input_ids of token ids, e.g. "
                             "--input-ids-shape 8 128 for a Hugging Face model (ids below "
                             "the model's config.vocab_size, or --vocab; default: none)")
    parser.add_argument("--input-dtype", choices=("float32", "float64", "long"),
                        default="float32",
                        help="--input-shape inputs are N(0,1) floats or integer ids "
                             "(default: %(default)s)")
    parser.add_argument("--vocab", type=positive_int, default=None,
                        help="integer inputs are drawn from [0, vocab) (default: the model's "
                             "config.vocab_size, else 1000)")
    parser.add_argument("--n-batches", type=positive_int, default=1,
                        help="batches to average (default: %(default)s)")
    parser.add_argument("--eval", action="store_true",
                        help="probe in eval mode (default: training mode)")
    parser.add_argument("--tolerance", type=finite_above(1.0), default=20.0,
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


def _vocab(args: argparse.Namespace, model: nn.Module) -> int:
    """``--vocab``, else the model's ``config.vocab_size`` (Hugging Face), else 1000."""
    if args.vocab is not None:
        return int(args.vocab)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else 1000


def _cli_inputs(args: argparse.Namespace, model: nn.Module) -> Any:
    """The random inputs the shape options describe, or None if there are none."""
    gen = torch.Generator().manual_seed(args.seed)
    vocab = _vocab(args, model)
    inputs = []
    for shape in args.input_shape or []:
        if args.input_dtype == "long":
            inputs.append(torch.randint(0, vocab, tuple(shape), generator=gen))
        else:
            inputs.append(torch.randn(tuple(shape), generator=gen,
                                      dtype=getattr(torch, args.input_dtype)))
    ids_shape = getattr(args, "input_ids_shape", None)
    if ids_shape:
        ids = {"input_ids": torch.randint(0, vocab, tuple(ids_shape), generator=gen)}
        return Call(tuple(inputs), ids) if inputs else ids
    if not inputs:
        return None
    return inputs[0] if len(inputs) == 1 else tuple(inputs)


def _describe(args: argparse.Namespace) -> str:
    """The inputs, as the options that gave them (or the factory)."""
    parts = [f"{args.input_dtype} inputs --input-shape {' '.join(map(str, s))}"
             for s in args.input_shape or []]
    ids_shape = getattr(args, "input_ids_shape", None)
    if ids_shape:
        parts.append(f"--input-ids-shape {' '.join(map(str, ids_shape))}")
    return " ".join(parts) if parts else "the example inputs FACTORY returned"


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
        call_args, call_kwargs = as_batches(example, 1)[0]
        with torch.no_grad():
            model(*call_args, **call_kwargs)
    except Exception as e:  # whatever the user's forward raises on these inputs
        complaint = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"the model's forward fails on {_describe(args)}: {type(e).__name__}: "
            f"{complaint} (give the shape of one batch, batch first, one --input-shape per "
            "forward argument, and the right --input-dtype; --input-ids-shape for a keyword "
            "input_ids)") from None
    finally:
        for m, training in modes:
            m.training = training


def _model_and_inputs(built: Any, args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The model and its example inputs, from what FACTORY returned and the options.

    Raises:
        CLIError: FACTORY returned no module, or inputs both from itself and the options,
            or there are no inputs at all.
    """
    shapes = bool(args.input_shape) or bool(getattr(args, "input_ids_shape", None))
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        if shapes:
            raise CLIError(f"{args.target} returned (model, example_inputs): drop "
                           "--input-shape/--input-ids-shape, or return the model alone")
        return built[0], built[1]
    if not isinstance(built, nn.Module):
        raise CLIError(f"{args.target} returned {type(built).__name__}, not an nn.Module; "
                       "FACTORY must return the model, or (model, example_inputs)")
    example = _cli_inputs(args, built)
    if example is None:
        raise CLIError("no example inputs: give --input-shape N ... (one per positional "
                       "input, batch first), --input-ids-shape B T (a keyword input_ids), or "
                       "a FACTORY that returns (model, example_inputs)")
    return built, example


def cli_main(args: argparse.Namespace) -> int:
    """Run ``gradguard probe``: print the table and verdict; exit 0 iff (finally) healthy.

    Raises:
        CLIError: before probing, for a target that does not load, a factory that needs
            arguments or returns no module, missing inputs, inputs the model does not
            accept or a ``--fix`` path that cannot be written.
    """
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    try:
        fix = None if args.fix is None else output_file(args.fix, name="--fix",
                                                        example="fixed.pt")
        factory = load_factory(args.target)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    try:
        built = factory()
    except Exception as e:  # the user's factory failed: one line, not our traceback
        raise CLIError(f"{args.target}() raised {type(e).__name__}: {e}") from None
    model, example = _model_and_inputs(built, args)
    try:
        _check_forward(model, example, args)
        report = probe(model, example, n_batches=args.n_batches, train=not args.eval,
                       tolerance=args.tolerance, seed=args.seed)
    except (TypeError, ValueError) as e:  # e.g. no parameter requires grad
        raise CLIError(str(e)) from None
    print(report.summary())
    print(report.table(max_rows=args.max_rows))
    if fix is None:
        return 0 if report.verdict == "healthy" else 1
    return _fix(model, report, fix, args.max_rows)


def _fix(model: nn.Module, report: Any, out: Path, max_rows: int) -> int:
    """Apply the fix, print what it did, save the state_dict; 0 iff the model is healthy."""
    result = report.fix(model, force=False)
    print()
    print(result.init if result.init is not None else "nothing to fix")
    print()
    print(result.after.summary())
    print(result.after.table(max_rows=max_rows))
    if result.restored:
        print(f"\nNOT FIXED: {result.reason}")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    what = "original (unfixed)" if result.restored else "fixed"
    print(f"\n{what} state_dict written to {out}")
    healthy = result.after.verdict == "healthy" and not result.restored
    return 0 if healthy or (result.init is None and report.verdict == "healthy") else 1
