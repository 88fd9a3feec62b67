"""Values in gradguard's JSON logs: non-finite floats as strings, both ways.

JSON has no NaN or infinity, so non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (the spellings of JavaScript's ``Number()`` and
Python's ``float()``). Reading turns them back into floats everywhere except in the text
fields (names, messages), so a parameter literally named ``"NaN"`` survives. The writer
(:mod:`gradguard.log.sinks`) and the reader (:mod:`gradguard.log.readback`) share this
one module, so the two directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from gradguard.log.events import Event

__all__ = ["TEXT_KEYS", "decode_json_value", "dumps", "encode_json_value"]

_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

#: Keys whose values are free text (parameter names, messages): never decoded, so a
#: layer named "NaN" stays a string.
TEXT_KEYS = frozenset({"type", "kind", "message", "names", "layers", "top_layer"})


def encode_json_value(obj: Any) -> Any:
    """Make ``obj`` strict-JSON serialisable: non-finite floats become strings.

    Dicts, lists and tuples are walked; :class:`~gradguard.log.events.Event` and
    dataclasses become dicts; 0-d tensors and numpy scalars become Python numbers
    (``.item()``: a host read, which is fine here because sinks only ever run on the host
    at flush time).

    Returns:
        A structure of dict/list/str/int/float/bool/None with only finite floats.

    Raises:
        TypeError: for a value JSON cannot hold (naming its type).
    """
    if isinstance(obj, float):  # numpy float64 too (a float subclass)
        if math.isfinite(obj):
            return float(obj)
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): encode_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_json_value(v) for v in obj]
    if isinstance(obj, Event):
        return encode_json_value(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return encode_json_value(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return encode_json_value(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON: {obj!r}")


def decode_json_value(obj: Any, key: str | None = None) -> Any:
    """The inverse of :func:`encode_json_value` for values read back from JSON.

    The strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` become floats, except
    under the :data:`TEXT_KEYS` (``names``, ``layers``, ``message``, ``kind``,
    ``top_layer``).

    Args:
        obj: a value parsed by :func:`json.loads`.
        key: the key ``obj`` was found under, if any.
    """
    if key in TEXT_KEYS:
        return obj
    if isinstance(obj, str):
        return _STR_TO_NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: decode_json_value(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_json_value(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """``obj`` as one line of strict JSON (non-finite floats encoded, text kept readable).

    ``ensure_ascii=False``: names stay readable; JSON itself escapes quotes, backslashes
    and control characters, so a newline in a name never splits a line.
    """
    return json.dumps(encode_json_value(obj), ensure_ascii=False, allow_nan=False)
