"""Can this output path be written? One answer for every writer, asked before the work.

``gradguard demo --out``, ``gradguard probe --fix``, ``gradguard bench --out`` and
``gradguard report -o`` (and the report writers behind them) decide here whether their
output can be written, so a bad path is refused in one line before any training, not with
a traceback after it. The checks only look: nothing is created, so a refused or failed run
leaves no empty folder behind.

A path *names a directory* when it exists as one or is spelled with a trailing separator
(``out/``); :func:`output_file` then puts ``default_name`` inside it where there is one.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["names_directory", "output_dir", "output_file"]


def names_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an existing directory or ends with a path separator."""
    text = os.fspath(path)
    seps = (os.sep, os.altsep) if os.altsep else (os.sep,)
    return text.endswith(seps) or Path(text).is_dir()


def output_file(
    path: object, *, name: str, default_name: str | None = None, example: str = "out.html"
) -> Path:
    """Check that a file can be written at ``path`` (it may exist: it is replaced).

    Args:
        path: the file to write, a ``str`` or ``os.PathLike``.
        name: how the caller calls this argument (``"--out"``, ``"out_path"``), for errors.
        default_name: the file name to use inside ``path`` when ``path`` names a directory;
            ``None`` refuses a directory.
        example: a file name to suggest when a directory is refused.

    Returns:
        The file to write (``path/default_name`` for a directory).

    Raises:
        TypeError: if ``path`` is not a path.
        ValueError: naming ``name`` and the path, if it is empty, a directory (without
            ``default_name``), not writable, or under something that is not a writable
            directory.
    """
    text = _text(path, name)
    out = Path(text)
    if names_directory(text):
        if default_name is None:
            raise ValueError(f"{name} {text!r} is a directory; give a file name, e.g. "
                             f"{str(out / example)!r}")
        if out.exists():
            _check_writable_dir(out, name, text)
        out = out / default_name
        if out.is_dir():
            raise ValueError(f"{name} {text!r}: {str(out)!r} is a directory; give a file name")
    if out.exists():
        if not out.is_file():
            raise ValueError(f"{name} {text!r} exists and is not a regular file")
        if not os.access(out, os.W_OK):
            raise ValueError(f"{name} {text!r} is not writable (permission denied)")
        return out
    _check_creatable(out, name, text)
    return out


def output_dir(path: object, *, name: str) -> Path:
    """Check that ``path`` is, or can be made, a writable directory.

    Args:
        path: the directory, a ``str`` or ``os.PathLike``.
        name: how the caller calls this argument, for errors.

    Returns:
        ``path`` as a :class:`~pathlib.Path` (not created).

    Raises:
        TypeError: if ``path`` is not a path.
        ValueError: naming ``name`` and the path, if it is empty, an existing file, not
            writable, or under something that is not a writable directory.
    """
    text = _text(path, name)
    out = Path(text)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{name} {text!r} is a file; give a directory (it is created "
                             "if missing)")
        _check_writable_dir(out, name, text)
        return out
    _check_creatable(out, name, text)
    return out


def _text(path: object, name: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(path).__name__} {path!r}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str path, got {text!r}")
    if not text.strip():
        raise ValueError(f"{name} must be a path, got {text!r}")
    return text


def _check_writable_dir(directory: Path, name: str, text: str) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {text!r}: cannot write in {str(directory)!r} "
                         "(permission denied)")


def _check_creatable(target: Path, name: str, text: str) -> None:
    """``target`` does not exist: its nearest existing ancestor must be a writable
    directory (the folders in between are created by the writer)."""
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{name} {text!r}: {str(ancestor)!r} is a file, not a directory")
    _check_writable_dir(ancestor, name, text)
