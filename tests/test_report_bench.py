"""The benchmark report (:mod:`gradguard.report.bench`): ``gradguard bench`` results as a
self-contained HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from gradguard.report.bench import (
    load_bench_results,
    render_bench_report,
    write_bench_report,
)
from report_utils import assert_safe, bench_results


def test_bench_report(tmp_path: Path) -> None:
    res = bench_results()
    out = write_bench_report(res, tmp_path / "bench.html", title="bench <b>t</b>")
    html = out.read_text(encoding="utf-8")
    p = assert_safe(html)
    text = " ".join(p.text)
    assert p.tags.count("svg") == 2  # one metric-vs-lr figure per task
    for s in ("toy-acc", "toy-mse", "higher is better", "lower is better", "tuned",
              "<img src=x onerror=alert(6)>", "RuntimeError: <boom>", "bench <b>t</b>",
              "peer-zclip: not installed", "Someone 2020, <i>A paper</i>"):
        assert s in text, s
    assert 'class="num best"' in html
    # the best divergence rate (0%) is highlighted, the worst (none's) is not
    row_none = html.split("<td>none</td>")[1].split("</tr>")[0]
    assert "best" not in row_none.split("</td>")[0]


def test_bench_report_tolerates_missing_fields(tmp_path: Path) -> None:
    html = render_bench_report({"aggregates": [{"task": "t", "method": "m"}]})
    assert "No per-learning-rate data" in html
    html = render_bench_report({"runs": [{"task": "t", "method": "m", "lr": 0.1, "score": 1.0}]})
    assert_safe(html)
    with pytest.raises(ValueError, match="results_or_path"):
        render_bench_report({"foo": 1})
    with pytest.raises(TypeError, match="results_or_path"):
        render_bench_report(3)


def test_bench_results_from_dir_and_runs_jsonl(tmp_path: Path) -> None:
    res = bench_results()
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert load_bench_results(tmp_path)["aggregates"] == json.loads(json.dumps(res))["aggregates"]
    runs = tmp_path / "r" / "runs.jsonl"
    runs.parent.mkdir()
    runs.write_text("".join(json.dumps(r) + "\n" for r in res["runs"] if r["task"] == "toy-acc"))
    # unknown task names: aggregated without the task's settings
    loaded = load_bench_results(runs)
    assert {r["method"] for r in loaded["aggregates"]} == {
        "none", "clip:1", "<img src=x onerror=alert(6)>"}
