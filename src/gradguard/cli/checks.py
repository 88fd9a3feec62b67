"""What every ``gradguard`` sub-command uses to refuse bad input in one line.

:class:`CLIError` is the refusal (:func:`gradguard.cli.main` prints it on one line and
exits with status 2); :func:`require_extra` and :func:`missing_extra` turn a missing
optional dependency into one, naming the extra to install; :func:`positive_int` and
:func:`positive_float` are argparse ``type`` callables whose errors name the value.
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable

__all__ = ["CLIError", "finite_above", "missing_extra", "positive_float", "positive_int",
           "require_extra"]

#: The distribution that provides each optional module, and the extra that installs it.
EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "bench"),
    "matplotlib": ("matplotlib", "bench"),
    "numpy": ("numpy", "bench"),
    "rich": ("rich", "bench"),
}


class CLIError(Exception):
    """Bad command-line input. :func:`gradguard.cli.main` prints ``gradguard COMMAND:
    error: MESSAGE`` (one line, no traceback) and returns 2. The message should say what
    to do."""


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
    if top in EXTRAS:
        package, extra = EXTRAS[top]
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


def finite_above(bound: float) -> Callable[[str], float]:
    """An argparse ``type`` factory: a finite number ``> bound``.

    Returns:
        A callable that parses its text or raises :class:`argparse.ArgumentTypeError`
        naming the value (argparse adds the option).
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > bound):
            raise argparse.ArgumentTypeError(
                f"expected a finite number > {bound:g}, got {text!r}")
        return value

    return parse


#: An argparse ``type``: a finite number ``> 0``.
positive_float = finite_above(0.0)
