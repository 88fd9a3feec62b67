"""Helpers of the report tests (``tests/test_report_*.py``, ``tests/test_cli_report.py``):
an HTML safety check, a synthetic Guard log and synthetic benchmark results."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from gradguard.bench.grid import SCHEMA
from gradguard.bench.table import aggregate
from gradguard.log.events import Event
from gradguard.log.sinks import JSONLSink

HOSTILE = [
    "</script><img src=x onerror=alert(1)>",
    "a&b\"c'",
    "w$\\frac{1}{$x",  # would be mathtext (and fail to parse) if $ were not escaped
    "<svg onload=alert(2)>",
    "layer\nwith-newline",
]
NASTY_TAGS = {"script", "img", "iframe", "object", "embed", "link", "foreignobject", "base"}


class _Page(HTMLParser):
    """Collects tags, attributes and text (entities decoded) of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []
        self.svg_text: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        self._stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._stack and self._stack[-1] == "text":
            self.svg_text.append(data)


def parse(html: str) -> _Page:
    p = _Page()
    p.feed(html)
    p.close()
    return p


def assert_safe(html: str) -> _Page:
    """No injected element, no event-handler attribute, nothing fetched from outside."""
    p = parse(html)
    assert not NASTY_TAGS & set(p.tags), NASTY_TAGS & set(p.tags)
    assert not [a for a in p.attrs if a[1].lower().startswith("on")]
    for tag, key, value in p.attrs:
        if key.lower() in ("src", "href", "xlink:href", "action", "poster", "srcset"):
            v = (value or "").strip().lower()
            assert v.startswith(("data:", "#")), (tag, key, value)
    assert "http://" not in html and "https://" not in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    return p


def record(step_first: int, n: int, layers: list[float], **kw: Any) -> dict[str, Any]:
    """A synthetic interval record of ``n`` steps from ``step_first``."""
    pre = kw.pop("pre", 2.0)
    rec = {
        "step_first": step_first, "step_last": step_first + n - 1, "n_steps": n,
        "pre_norm_min": pre / 2, "pre_norm_max": pre * 3, "pre_norm_mean": pre,
        "pre_norm_last": pre, "pre_norm_max_step": step_first + 1,
        "post_norm_mean": min(pre, 1.0), "post_norm_max": 1.0, "threshold_last": 1.0,
        "coef_min": 0.5, "clipped": n // 2, "nonfinite": 0, "skipped": 0, "spikes": 0,
        "clip_rate": 0.5, "loss_mean": 2.0 / (1 + step_first), "loss_last": 1.0 / (1 + step_first),
        "layer_norm_mean": layers, "layer_norm_max": layers,
        "layer_nonfinite": [0] * len(layers), "top_layer": None, "top_layer_norm": math.nan,
        "rank": 0, "time": 0.0,
    }
    rec.update(kw)
    return rec


def write_log(path: Path, names: list[str], n_intervals: int, *, every: int = 10,
              policy: str = "Fixed(max_norm=1.0)") -> Path:
    """A synthetic Guard log: a spike at interval 5, a NaN in the last layer at 8."""
    with JSONLSink(path) as sink:
        sink.write_meta({"names": names, "log_every": every, "policy": policy,
                         "nonfinite": "skip", "norm_type": 2.0, "time": 1.7e9,
                         "gradguard_version": "test"})
        for j in range(n_intervals):
            layers = [0.1 * (i + 1) * (1 + j % 3) for i in range(len(names))]
            kw: dict[str, Any] = {"top_layer": names[-1], "top_layer_norm": max(layers)}
            if j == 5:
                kw.update(pre=80.0, spikes=1)
                sink.write_event(Event(j * every + 3, "spike", f"spike in {names[0]} <b>x</b>",
                                       names[:2], {"norm": 240.0}))
            if j == 8:
                layers[-1] = math.nan
                kw.update(nonfinite=1, skipped=1, layer_nonfinite=[0] * (len(names) - 1) + [1])
                sink.write_event(Event(j * every + 2, "nonfinite", "NaN gradient; step skipped",
                                       names[-1:]))
            sink.write_record(record(j * every + 1, every, layers, **kw))
        sink.write_event(Event(n_intervals * every, "lr_backoff", "lr x0.5", []))
        sink.write_event(Event(n_intervals * every, "my_custom_kind", "a user's own event", []))
    return path


def bench_results() -> dict[str, Any]:
    """Synthetic benchmark results: two toy tasks, a hostile method name, a failed run."""
    tasks_info = {
        "toy-acc": {"metric": "test_acc", "higher_is_better": True, "trivial_metric": 0.1,
                    "loss_cap": 23.0, "steps": 50, "lrs": None,
                    "references": ["Someone 2020, <i>A paper</i>"]},
        "toy-mse": {"metric": "test_mse", "higher_is_better": False, "trivial_metric": 1.0,
                    "loss_cap": 10.0, "steps": 50, "lrs": None, "references": []},
    }
    runs = []
    for task, good in (("toy-acc", 0.9), ("toy-mse", 0.01)):
        for method in ("none", "clip:1", "<img src=x onerror=alert(6)>"):
            for lr in (0.01, 0.1, 1.0):
                for seed in (0, 1):
                    div = method == "none" and lr >= 0.1 and seed == 0
                    triv = tasks_info[task]["trivial_metric"]
                    score = triv if div else good * (1 + 0.1 * seed) / (1 + lr)
                    runs.append({
                        "task": task, "method": method, "lr": lr, "seed": seed, "steps": 50,
                        "score": score, "metric": None if div else score, "diverged": div,
                        "frac_clipped": 0.0 if method == "none" else 0.4, "frac_skipped": 0.0,
                        "sec_per_step": 0.01, "ctl_ms_per_step": 1.0 + (method != "none"),
                        "norm_stats": {"step0": 1.0, "median": 1.0, "max": 3.0},
                    })
    return {
        "schema": SCHEMA,
        "config": {"lrs": [0.01, 0.1, 1.0], "seeds": [0, 1], "steps": 50, "torch": "x",
                   "python": "3", "elapsed_sec": 12.0, "skipped": ["peer-zclip: not installed"]},
        "tasks": tasks_info,
        "aggregates": aggregate(runs, tasks_info, {"tuned": ("clip:1",)}),
        "spike": [],
        "errors": [{"task": "toy-acc", "method": "clip:1", "lr": 1.0, "seed": 9,
                    "error": "RuntimeError: <boom>"}],
        "runs": runs,
    }
