"""Helpers shared by the log's tests: hostile names, a record, NaN-aware equality."""

from __future__ import annotations

import math

NAN, INF = math.nan, math.inf

# Names a user's model may really produce, and some it may not but we must survive.
NASTY_NAMES = [
    'attn."q_proj".weight',
    "mlp\nfc1\r\n.bias",
    "ln_f.\u00e9\u4e2d\u6587.\U0001f525",
    "</script><script>alert('x')</script>&amp;",
    "comma,semicolon;tab\there",
    "back\\slash",
    "line\u2028separator\u2029para",
    "NaN",
    "Infinity",
]


def same(a: object, b: object) -> bool:
    """Equality where NaN equals NaN (the round trip must keep NaN, not turn it to None)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def record(names: list[str]) -> dict:
    """An interval record full of non-finite values and hostile names."""
    n = len(names)
    return {
        "step_first": 1,
        "step_last": 100,
        "n_steps": 100,
        "pre_norm_max": INF,
        "pre_norm_mean": NAN,
        "pre_norm_min": -INF,
        "pre_norm_max_step": None,
        "clip_rate": 0.25,
        "layer_norm_mean": [float(i) if i % 3 else NAN for i in range(n)],
        "layer_norm_max": [INF] * n,
        "layer_nonfinite": list(range(n)),
        "top_layer": names[-2],  # the layer literally named "NaN"
    }
