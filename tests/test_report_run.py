"""The run report (:mod:`gradguard.report.run`): a Guard log as a self-contained HTML page."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

import gradguard as gg
from gradguard.log.events import Event
from gradguard.log.readback import RunLog, read_jsonl
from gradguard.report.run import render_run_report, summarize_run, write_run_report
from report_utils import HOSTILE, assert_safe, parse, record, write_log


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("hostile")
    names = [*HOSTILE, "fc.weight", "fc.bias"]
    log = write_log(d / "run.jsonl", names, 12, policy="Evil(<script>alert(3)</script>)")
    out = write_run_report(log, d / "run.html", title="<script>alert(4)</script> & title",
                           diagnosis=["not a gradient explosion: norm stayed near 2",
                                      "<img src=x onerror=alert(5)>"])
    return log, out.read_text(encoding="utf-8")


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
        {**record(1, 10, [math.nan, math.nan], pre=math.nan), "pre_norm_min": math.nan,
         "pre_norm_max": math.nan, "post_norm_mean": math.nan, "loss_mean": math.nan,
         "loss_last": math.nan, "nonfinite": 10, "clip_rate": math.nan,
         "threshold_last": math.inf, "pre_norm_max_step": None},
        {**record(11, 10, [math.nan, math.nan], pre=math.nan), "pre_norm_min": math.nan,
         "pre_norm_max": math.nan, "loss_mean": math.nan, "loss_last": math.nan},
    ]),
    "single_interval_one_layer": RunLog(meta=_meta(["only"]), records=[
        record(1, 7, [0.5], loss_mean=math.nan, loss_last=math.nan)]),
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
    recs = [record(10 * j + 1, 10, [0.01 * (1 + i) * (1 + j % 5) for i in range(40)],
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


def test_an_update_spike_is_the_first_problem_before_a_later_spike(tmp_path: Path) -> None:
    log = RunLog(meta=_meta(["w"]), records=[record(1, 10, [1.0]), record(11, 10, [1.0])],
                 events=[Event(7, "update_spike", "update of w jumped 9x", ["w"]),
                         Event(15, "spike", "gradient spike", ["w"])])
    s = summarize_run(log)
    assert s["first_problem"]["step"] == 7 and s["first_problem"]["kind"] == "update_spike"
