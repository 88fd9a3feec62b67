"""Tests of gradguard.log.jsonvalues: non-finite floats in strict JSON, both ways."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gradguard.log.events import Event
from gradguard.log.jsonvalues import TEXT_KEYS, decode_json_value, dumps, encode_json_value
from log_utils import same as _same

NAN, INF = math.nan, math.inf


def test_encode_decode_nonfinite_values():
    obj = {"a": NAN, "b": [INF, -INF, 1.5], "c": (1, "x"), "t": torch.tensor([1.0, NAN])}
    enc = encode_json_value(obj)
    assert enc == {
        "a": "NaN",
        "b": ["Infinity", "-Infinity", 1.5],
        "c": [1, "x"],
        "t": [1.0, "NaN"],
    }
    json.dumps(enc, allow_nan=False)  # strict JSON
    dec = decode_json_value(enc)
    assert _same(dec, {"a": NAN, "b": [INF, -INF, 1.5], "c": [1, "x"], "t": [1.0, NAN]})
    # Text keys are never decoded: a layer named "NaN" stays a string.
    assert decode_json_value({"layers": ["NaN"], "top_layer": "Infinity"}) == {
        "layers": ["NaN"],
        "top_layer": "Infinity",
    }
    with pytest.raises(TypeError, match="object"):
        encode_json_value(object())


@dataclass
class _Point:
    x: float
    where: Path


def test_events_dataclasses_and_paths_are_encoded():
    ev = Event(3, "spike", "m", ["w"], {"ratio": INF}, rank=1)
    assert encode_json_value(ev) == {"step": 3, "kind": "spike", "message": "m",
                                     "layers": ["w"], "data": {"ratio": "Infinity"}, "rank": 1}
    assert encode_json_value(_Point(NAN, Path("a/b"))) == {"x": "NaN", "where": "a/b"}
    assert encode_json_value({1: torch.tensor(2.5)}) == {"1": 2.5}


def test_dumps_is_one_line_of_strict_readable_json():
    line = dumps({"names": ["a\nb", "\u4e2d"], "v": -INF})
    assert "\n" not in line and "\u4e2d" in line
    assert json.loads(line) == {"names": ["a\nb", "\u4e2d"], "v": "-Infinity"}
    assert {"names", "layers", "message", "kind", "top_layer"} <= TEXT_KEYS
