"""Tests of gradguard.report: the self-contained HTML run and benchmark reports."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

import gradguard as gg
from gradguard.cli import main as cli
from gradguard.events import Event, JSONLSink, RunLog, read_jsonl
from gradguard.report import (
    load_bench_results,
    render_bench_report,
    render_run_report,
    summarize_run,
    write_bench_report,
    write_run_report,
)

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


# --------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------


def _record(step_first: int, n: int, layers: list[float], **kw: Any) -> dict[str, Any]:
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
            sink.write_record(_record(j * every + 1, every, layers, **kw))
        sink.write_event(Event(n_intervals * every, "lr_backoff", "lr x0.5", []))
        sink.write_event(Event(n_intervals * every, "my_custom_kind", "a user's own event", []))
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("hostile")
    names = [*HOSTILE, "fc.weight", "fc.bias"]
    log = write_log(d / "run.jsonl", names, 12, policy="Evil(<script>alert(3)</script>)")
    out = write_run_report(log, d / "run.html", title="<script>alert(4)</script> & title",
                           diagnosis=["not a gradient explosion: norm stayed near 2",
                                      "<img src=x onerror=alert(5)>"])
    return log, out.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------
# Run report
# --------------------------------------------------------------------------------------


def test_run_report_synthetic_sections(hostile: tuple[Path, str]) -> None:
    _, html = hostile
    p = parse(html)
    text = " ".join(p.text)
    for heading in ("Diagnosis", "Loss", "Gradient norm", "Per-layer gradient norm",
                    "Events (4)", "Run settings"):
        assert heading in text
    assert p.tags.count("svg") == 3  # loss, norms, heatmap
    assert "not a gradient explosion: norm stayed near 2" in text
    assert "my_custom_kind" in text and "a user's own event" in text
    assert 'class="sev error"' in html and 'class="sev warning"' in html
    assert len(html) < 2_000_000


def test_run_report_escapes_everything(hostile: tuple[Path, str]) -> None:
    _, html = hostile
    p = assert_safe(html)
    text = "".join(p.text)
    # every hostile name is there as text (control characters shown escaped) ...
    for name in HOSTILE:
        assert name.replace("\n", "\\n") in text, name
    # ... in the heatmap's SVG tick labels too (searchable, escaped by matplotlib)
    svg_text = set(p.svg_text)
    for name in HOSTILE[:4]:
        assert name in svg_text, name
    assert "Evil(<script>alert(3)</script>)" in text
    assert "<script>alert(4)</script> & title" in text
    assert "<img src=x onerror=alert(5)>" in text
    assert "spike in </script><img src=x onerror=alert(1)> <b>x</b>" in text
    assert "b" not in p.tags  # the message's <b> stayed text


def test_summarize_run(hostile: tuple[Path, str]) -> None:
    log, _ = hostile
    s = summarize_run(log)
    assert s["steps"] == 120 and s["intervals"] == 12
    assert s["nonfinite"] == 1 and s["skipped"] == 1 and s["spike_steps"] == 1
    assert s["first_problem"]["step"] == 53 and s["first_problem"]["kind"] == "spike"
    assert s["clipped"] == 60 and s["clip_frac"] == pytest.approx(60 / 119)
    assert s["norm_max"] == pytest.approx(240.0) and s["norm_max_step"] == 52
    assert s["top_layer"]["name"] == "fc.bias"
    assert s["events_by_kind"]["spike"] == 1 and s["loss_observed"]


def _train(path: Path, steps: int = 60) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = gg.Guard(model, clip=0.5, sinks=[path], log_every=10).attach(opt)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for step in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 25:
            model[0].weight.grad[0, 0] = float("nan")
        guard.observe_loss(loss)
        opt.step()
    guard.close()


def test_run_report_real_guard_run(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    _train(log)
    s = summarize_run(log)
    assert s["steps"] == 60 and s["nonfinite"] == 1 and s["skipped"] == 1
    assert s["first_problem"]["step"] == 26
    out = write_run_report(read_jsonl(log), tmp_path / "sub" / "r.html", diagnosis="ok\nfine")
    html = out.read_text(encoding="utf-8")
    p = assert_safe(html)
    assert "0.weight" in "".join(p.svg_text)  # heatmap row label
    assert "nonfinite" in "".join(p.text)
    assert "<li>ok</li><li>fine</li>" in html
    assert p.tags.count("svg") == 3


def _meta(names: list[str]) -> dict[str, Any]:
    return {"names": names, "log_every": 10, "policy": "None", "nonfinite": "skip"}


EDGE_CASES = {
    "meta_only": RunLog(meta=_meta(["w"])),
    "events_only": RunLog(meta=_meta(["w"]), events=[Event(3, "nonfinite", "nan", ["w"])]),
    "all_nan": RunLog(meta=_meta(["a", "b"]), records=[
        {**_record(1, 10, [math.nan, math.nan], pre=math.nan), "pre_norm_min": math.nan,
         "pre_norm_max": math.nan, "post_norm_mean": math.nan, "loss_mean": math.nan,
         "loss_last": math.nan, "nonfinite": 10, "clip_rate": math.nan,
         "threshold_last": math.inf, "pre_norm_max_step": None},
        {**_record(11, 10, [math.nan, math.nan], pre=math.nan), "pre_norm_min": math.nan,
         "pre_norm_max": math.nan, "loss_mean": math.nan, "loss_last": math.nan},
    ]),
    "single_interval_one_layer": RunLog(meta=_meta(["only"]), records=[
        _record(1, 7, [0.5], loss_mean=math.nan, loss_last=math.nan)]),
    "no_names_sparse_record": RunLog(meta={}, records=[{"step_last": 5, "pre_norm_mean": 1.0}]),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_run_report_edge_cases(case: str) -> None:
    html = render_run_report(EDGE_CASES[case])
    p = assert_safe(html)
    text = " ".join(p.text)
    assert "Events" in text and "Run settings" in text
    if case in ("meta_only", "events_only"):
        assert "No interval record" in text
    if case in ("single_interval_one_layer", "no_names_sparse_record"):
        assert "No loss in this log" in text


def test_large_log_is_downsampled() -> None:
    names = [f"blocks.{i}.weight" for i in range(40)]
    recs = [_record(10 * j + 1, 10, [0.01 * (1 + i) * (1 + j % 5) for i in range(40)],
                    pre=1.0 + j % 7) for j in range(3000)]
    html = render_run_report(RunLog(meta=_meta(names), records=recs))
    assert "Each point merges 2 consecutive log intervals" in html
    assert "Each column merges 5 log intervals" in html
    assert len(html) < 2_000_000


def test_run_report_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="log_or_path"):
        render_run_report(42)
    with pytest.raises(FileNotFoundError, match="log_or_path"):
        render_run_report(tmp_path / "missing.jsonl")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"aggregates": []}, indent=1))
    with pytest.raises(ValueError, match=r"log_or_path.*write_bench_report"):
        render_run_report(results)
    other = tmp_path / "other.jsonl"
    other.write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="no meta, record or event"):
        render_run_report(other)
    log = write_log(tmp_path / "ok.jsonl", ["w"], 2)
    with pytest.raises(TypeError, match="diagnosis"):
        render_run_report(log, diagnosis=5)
    with pytest.raises(TypeError, match="title"):
        render_run_report(log, title=3)
    with pytest.raises(TypeError, match="out_path"):
        write_run_report(log, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out_path"):
        write_run_report(log, tmp_path)


def test_missing_matplotlib_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"gradguard\[bench\]"):
        render_run_report(RunLog(meta=_meta(["w"])))


def test_import_does_not_load_matplotlib() -> None:
    code = ("import sys, gradguard.report, gradguard.report.cli; "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------
# Benchmark report
# --------------------------------------------------------------------------------------


def _bench_results() -> dict[str, Any]:
    from gradguard.bench import runner

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
        "schema": runner.SCHEMA,
        "config": {"lrs": [0.01, 0.1, 1.0], "seeds": [0, 1], "steps": 50, "torch": "x",
                   "python": "3", "elapsed_sec": 12.0, "skipped": ["peer-zclip: not installed"]},
        "tasks": tasks_info,
        "aggregates": runner.aggregate(runs, tasks_info, {"tuned": ("clip:1",)}),
        "spike": [],
        "errors": [{"task": "toy-acc", "method": "clip:1", "lr": 1.0, "seed": 9,
                    "error": "RuntimeError: <boom>"}],
        "runs": runs,
    }


def test_bench_report(tmp_path: Path) -> None:
    res = _bench_results()
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
    res = _bench_results()
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert load_bench_results(tmp_path)["aggregates"] == json.loads(json.dumps(res))["aggregates"]
    runs = tmp_path / "r" / "runs.jsonl"
    runs.parent.mkdir()
    runs.write_text("".join(json.dumps(r) + "\n" for r in res["runs"] if r["task"] == "toy-acc"))
    # unknown task names: aggregated without the task's settings
    loaded = load_bench_results(runs)
    assert {r["method"] for r in loaded["aggregates"]} == {
        "none", "clip:1", "<img src=x onerror=alert(6)>"}


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def test_cli_run_and_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write_log(tmp_path / "run.jsonl", ["w", "b"], 3)
    assert cli(["report", str(log), "--title", "T", "--diagnosis", "line one"]) == 0
    out = tmp_path / "run.html"
    assert capsys.readouterr().out.strip() == str(out)
    assert "line one" in out.read_text(encoding="utf-8")

    (tmp_path / "results.json").write_text(json.dumps(_bench_results(), indent=1))
    target = tmp_path / "x" / "bench.html"
    assert cli(["report", str(tmp_path / "results.json"), "-o", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert "toy-mse" in target.read_text(encoding="utf-8")


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    assert cli(["report", str(bad)]) == 2
    assert "neither a Guard JSON Lines log" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert not (tmp_path / "notes.html").exists()


def test_malformed_log_lines_give_a_clear_error(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    lines = ['{"type":"event","step":1.5,"kind":"k","message":"m"}',
             '{"type":"event","step":1,"kind":"k","message":"m","data":[1,2]}',
             '{"type":"event","step":1,"kind":"k","message":"m","layers":5}',
             '{"type":"meta","names":5}']
    for i, line in enumerate(lines):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=f"bad{i}.jsonl:1: malformed"):
            read_jsonl(bad)
        assert cli(["report", str(bad)]) == 2
        assert "malformed" in capsys.readouterr().err


def test_a_log_whose_losses_were_all_non_finite(tmp_path: Path) -> None:
    model = nn.Linear(3, 1)
    log = tmp_path / "nan.jsonl"
    guard = gg.Guard(model, clip=1.0, sinks=[str(log)], log_every=5)
    for _ in range(10):
        model.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        guard.observe_loss(torch.tensor(math.nan))
        guard.step()
    guard.close()
    run = read_jsonl(log)
    run.meta["time"] = 1e20  # a corrupt start time is left out, not a crash
    page = render_run_report(run)
    assert "Every one of the 10 losses given to the Guard was NaN or infinite" in page
    assert "call guard.observe_loss" not in page
