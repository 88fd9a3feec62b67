"""The benchmark report: ``gradguard bench`` results as one self-contained HTML page.

Input is the results dict that :func:`gradguard.bench.grid.run_grid` returns and
writes to ``results.json`` (``schema``, ``config``, ``tasks``, ``aggregates``, ``spike``,
``errors``, ``runs``), the output directory holding it, or a bench ``runs.jsonl`` (one
run per line, aggregated here with the benchmark's own :func:`~gradguard.bench.table.aggregate`).
Every field is optional: a section whose data is missing is left out or says so.

Per task the page shows its description and metric, the score against the learning
rate for every method (mean over seeds, min–max band, crosses where a seed diverged,
the trivial predictor as a dashed line), the summary table with the best value of each
column highlighted, and the score at each learning rate.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradguard._paths import output_file
from gradguard._version import __version__
from gradguard.report.figures import bench_figure, require_matplotlib, to_svg
from gradguard.report.html import as_float, esc, fmt_count, fmt_num, fmt_pct, page, table

__all__ = ["load_bench_results", "render_bench_report", "write_bench_report"]


# --------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------


def _is_run(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(k in obj for k in ("task", "method", "lr"))


def looks_like_bench_results(obj: Any) -> bool:
    """Whether ``obj`` (parsed JSON) is a benchmark results dict."""
    return isinstance(obj, Mapping) and (
        str(obj.get("schema", "")).startswith("gradguard.bench")
        or "aggregates" in obj
        or ("runs" in obj and isinstance(obj["runs"], list))
    )


def _results_from_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate bare runs (a ``runs.jsonl``) the way the benchmark does."""
    from gradguard.bench.grid import SCHEMA
    from gradguard.bench.table import aggregate, spike_summary
    from gradguard.bench.tasks import get_task

    good = [dict(r) for r in runs if "error" not in r]
    tasks_info: dict[str, dict[str, Any]] = {}
    for r in good:
        t = str(r["task"])
        if t in tasks_info:
            continue
        try:
            tasks_info[t] = get_task(t).describe()
        except Exception:  # an unknown or renamed task: report it without its settings
            tasks_info[t] = {"metric": "score", "higher_is_better": None}
    for r in good:  # strict-JSON runs hold None for NaN; aggregate() wants floats
        for key in ("score", "frac_clipped", "frac_skipped", "sec_per_step", "ctl_ms_per_step"):
            v = as_float(r.get(key))
            r[key] = v if math.isfinite(v) else (0.0 if key != "score" else math.nan)
        r["diverged"] = bool(r.get("diverged"))
    good = [r for r in good if math.isfinite(r["score"])]
    return {
        "schema": SCHEMA,
        "config": {
            "lrs": sorted({float(r["lr"]) for r in good}),
            "seeds": sorted({int(r.get("seed", 0)) for r in good}),
        },
        "tasks": tasks_info,
        "aggregates": aggregate(good, tasks_info) if good else [],
        "spike": spike_summary(good),
        "errors": [dict(r) for r in runs if "error" in r],
        "runs": good,
    }


def load_bench_results(results_or_path: Any) -> dict[str, Any]:
    """The benchmark results dict from a dict, a ``results.json``, a bench output
    directory, or a bench ``runs.jsonl``.

    Raises:
        TypeError: if ``results_or_path`` is neither a dict nor a path.
        FileNotFoundError: if the path does not exist.
        ValueError: if the content is not benchmark results.
    """
    if isinstance(results_or_path, Mapping):
        if not looks_like_bench_results(results_or_path):
            raise ValueError(
                "results_or_path: a dict without 'aggregates' or 'runs' is not benchmark "
                f"results (keys: {sorted(map(str, results_or_path))[:12]})"
            )
        return dict(results_or_path)
    if not isinstance(results_or_path, (str, os.PathLike)):
        raise TypeError(
            "results_or_path must be the results dict of gradguard.bench or a path to its "
            f"results.json, got {type(results_or_path).__name__} {results_or_path!r}"
        )
    path = Path(results_or_path)
    if path.is_dir():
        for name in ("results.json", "runs.jsonl"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(
                f"results_or_path: directory {str(path)!r} holds no results.json or runs.jsonl"
            )
    if not path.is_file():
        raise FileNotFoundError(f"results_or_path: no such file: {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"results_or_path {str(path)!r} is not a text file: {e}") from e
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if obj is not None:
        if looks_like_bench_results(obj):
            return dict(obj)
        if _is_run(obj):
            return _results_from_runs([obj])
        raise ValueError(
            f"results_or_path {str(path)!r} is JSON but not gradguard benchmark results "
            "(no 'aggregates' or 'runs')"
        )
    runs = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(
                f"results_or_path {str(path)!r}:{i}: not benchmark results or runs ({e})"
            ) from e
        if not _is_run(r):
            raise ValueError(
                f"results_or_path {str(path)!r}:{i}: not a benchmark run (a Guard log? use "
                "gradguard.report.write_run_report)"
            )
        runs.append(r)
    if not runs:
        raise ValueError(f"results_or_path {str(path)!r} is empty")
    return _results_from_runs(runs)


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def _slug(s: str, used: set[str]) -> str:
    base = "task-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", s).strip("-").lower() or "x")
    slug, k = base, 2
    while slug in used:
        slug, k = f"{base}-{k}", k + 1
    used.add(slug)
    return slug


def _task_doc(spec: str) -> str:
    """The first paragraph of the task class's docstring, if the task is known here (the
    class is looked up, not built: building a task may load its data set)."""
    try:
        from gradguard.bench.tasks import TASKS

        cls = TASKS.get(str(spec).partition(":")[0])
    except Exception:
        return ""
    doc = (cls.__doc__ or "") if cls is not None else ""
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


def _direction(info: Mapping[str, Any]) -> bool | None:
    v = info.get("higher_is_better")
    return v if isinstance(v, bool) else None


def _lines_for_task(
    task: str, runs: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
    trivial: float,
) -> list[dict[str, Any]]:
    """Per method: lr, mean/min/max score over seeds, diverged seeds (from the runs; from
    the aggregate rows' ``per_lr`` when there are none)."""
    per: dict[str, dict[float, list[tuple[float, bool]]]] = {}
    for r in runs:
        if r.get("task") != task or "error" in r:
            continue
        lr = as_float(r.get("lr"))
        if not (math.isfinite(lr) and lr > 0):
            continue
        div = bool(r.get("diverged"))
        sc = as_float(r.get("score", r.get("metric")))
        if not math.isfinite(sc):
            sc = trivial if div else math.nan
        per.setdefault(str(r.get("method")), {}).setdefault(lr, []).append((sc, div))
    order = [str(r.get("method")) for r in rows]
    methods = [m for m in order if m in per] + sorted(m for m in per if m not in order)
    lines = []
    for m in methods:
        lrs = sorted(per[m])
        mean, lo, hi, nd, n = [], [], [], [], []
        for lr in lrs:
            vals = [v for v, _ in per[m][lr] if math.isfinite(v)]
            mean.append(sum(vals) / len(vals) if vals else math.nan)
            lo.append(min(vals) if vals else math.nan)
            hi.append(max(vals) if vals else math.nan)
            nd.append(sum(d for _, d in per[m][lr]))
            n.append(len(per[m][lr]))
        lines.append({"method": m, "lr": lrs, "mean": mean, "lo": lo, "hi": hi,
                      "n_div": nd, "n": n})
    if lines:
        return lines
    for row in rows:  # no runs: the aggregates' per-lr means, +- one standard deviation
        if "tuned_from" in row:
            continue
        cells = sorted((c for c in row.get("per_lr") or [] if isinstance(c, Mapping)),
                       key=lambda c: as_float(c.get("lr")))
        cells = [c for c in cells if as_float(c.get("lr")) > 0]
        if not cells:
            continue
        mean = [as_float(c.get("mean_score")) for c in cells]
        sd = [as_float(c.get("spread")) for c in cells]
        lines.append({
            "method": str(row.get("method")),
            "lr": [as_float(c.get("lr")) for c in cells],
            "mean": mean,
            "lo": [a - b if math.isfinite(b) else a for a, b in zip(mean, sd, strict=True)],
            "hi": [a + b if math.isfinite(b) else a for a, b in zip(mean, sd, strict=True)],
            "n_div": [as_float(c.get("n_diverged"))
                      if math.isfinite(as_float(c.get("n_diverged"))) else 0 for c in cells],
            "n": [as_float(c.get("n")) for c in cells],
        })
    return lines


def _best_mask(values: Sequence[float], higher: bool, skip: Sequence[bool] = ()) -> list[bool]:
    ok = [
        math.isfinite(v) and not (i < len(skip) and skip[i]) for i, v in enumerate(values)
    ]
    cands = [v for v, good in zip(values, ok, strict=True) if good]
    if len(cands) < 2:
        return [False] * len(values)
    best = max(cands) if higher else min(cands)
    tol = 1e-9 * max(1.0, abs(best))
    if all(abs(v - best) <= tol for v in cands):  # every row equal: nothing stands out
        return [False] * len(values)
    return [good and abs(v - best) <= tol for v, good in zip(values, ok, strict=True)]


def _summary_table(rows: Sequence[Mapping[str, Any]], higher: bool | None) -> str:
    header = ["method", "divergence rate", "max stable lr", "best score ± sd (at lr)",
              "mean over grid ± sd", "clipped", "skipped", "ms / step", "ctl overhead ms"]
    div = [as_float(r.get("divergence_rate")) for r in rows]
    msl = [as_float(r.get("max_stable_lr")) if r.get("max_stable_lr") is not None else -math.inf
           for r in rows]
    best = [as_float(r.get("best_metric")) for r in rows]
    mean = [as_float(r.get("mean_metric")) for r in rows]
    ovh = [as_float(r.get("ctl_overhead_ms")) for r in rows]
    is_none = [r.get("method") == "none" for r in rows]
    marks = {
        1: _best_mask(div, higher=False),
        2: _best_mask([v if v > -math.inf else math.nan for v in msl], higher=True),
        7: [False] * len(rows),
        8: _best_mask(ovh, higher=False, skip=is_none),
    }
    if higher is not None:
        marks[3] = _best_mask(best, higher)
        marks[4] = _best_mask(mean, higher)
    out_rows = []
    for r in rows:
        name = esc(r.get("method", "?"))
        if r.get("tuned_from"):
            name += f' <span class="note">(= {esc(r["tuned_from"])})</span>'
        m = "none" if r.get("max_stable_lr") is None else fmt_num(r.get("max_stable_lr"))
        if r.get("stable_below") is False:
            m += "*"
        sec = as_float(r.get("sec_per_step"))
        cells = [
            name,
            fmt_pct(r.get("divergence_rate"), 0)
            + (f" ({fmt_count(r.get('n_diverged'))}/{fmt_count(r.get('n_runs'))})"
               if r.get("n_runs") is not None else ""),
            m,
            f"{fmt_num(r.get('best_metric'))} ± {fmt_num(r.get('best_spread'), 2)} "
            f"({fmt_num(r.get('best_lr'))})",
            f"{fmt_num(r.get('mean_metric'))} ± {fmt_num(r.get('mean_spread'), 2)}",
            fmt_pct(r.get("frac_clipped"), 0),
            fmt_pct(r.get("frac_skipped"), 0),
            fmt_num(1e3 * sec if math.isfinite(sec) else None, 3),
            fmt_num(r.get("ctl_overhead_ms"), 2),
        ]
        out_rows.append(cells)
    # the "best" class is added per cell: build the table by hand around table()'s rows
    html_rows = []
    for i, cells in enumerate(out_rows):
        tds = []
        for j, c in enumerate(cells):
            cls = ["num"] if j else []
            if j in marks and marks[j][i]:
                cls.append("best")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            tds.append(f"<td{attr}>{c}</td>")
        html_rows.append("<tr>" + "".join(tds) + "</tr>")
    ths = "".join(f'<th{" class=num" if j else ""}>{esc(h)}</th>' for j, h in enumerate(header))
    return (f'<table class="summary"><thead><tr>{ths}</tr></thead><tbody>'
            + "".join(html_rows) + "</tbody></table>")


def _lr_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lrs = sorted({as_float(c.get("lr")) for r in rows for c in (r.get("per_lr") or [])
                  if isinstance(c, Mapping) and math.isfinite(as_float(c.get("lr")))})
    if not lrs:
        return ""
    body = []
    for r in rows:
        cells = {as_float(c.get("lr")): c
                 for c in (r.get("per_lr") or []) if isinstance(c, Mapping)}
        out = [esc(r.get("method", "?"))]
        for lr in lrs:
            c = cells.get(lr)
            if c is None:
                out.append("")
                continue
            s = fmt_num(c.get("mean_score"))
            nd = as_float(c.get("n_diverged"))
            if math.isfinite(nd) and nd > 0:
                s += f' <span class="sev error">✗{int(nd)}</span>'
            out.append(s)
        body.append(out)
    return (
        "<details><summary>score at each learning rate (mean over seeds; ✗k: k seeds "
        "diverged)</summary>"
        + table(["method"] + [f"lr {fmt_num(lr)}" for lr in lrs], body, cls="perlr",
                numeric=range(1, len(lrs) + 1))
        + "</details>"
    )


def _task_header(task: str, info: Mapping[str, Any]) -> str:
    parts = []
    doc = _task_doc(task)
    if doc:  # reST ``literals`` become <code> (after escaping: no markup gets through)
        parts.append("<p>" + re.sub(r"``(.+?)``", r"<code>\1</code>", esc(doc)) + "</p>")
    hib = _direction(info)
    arrow = {True: "higher is better ↑", False: "lower is better ↓"}.get(hib, "direction unknown")
    facts = [f"metric <code>{esc(info.get('metric', 'score'))}</code> ({esc(arrow)})"]
    if info.get("trivial_metric") is not None:
        facts.append(f"trivial predictor {esc(fmt_num(info.get('trivial_metric')))}")
    if info.get("loss_cap") is not None:
        facts.append(f"divergence cap on the final loss {esc(fmt_num(info.get('loss_cap')))}")
    if info.get("steps") is not None:
        facts.append(f"{esc(fmt_count(info.get('steps')))} steps")
    if info.get("variant") is not None:
        facts.append(f"variant <code>{esc(info.get('variant'))}</code>")
    parts.append(f"<p>{' · '.join(facts)}</p>")
    refs = info.get("references") or []
    if isinstance(refs, (list, tuple)) and refs:
        parts.append('<p class="note">References: ' + "; ".join(esc(r) for r in refs) + "</p>")
    return f'<div class="taskdesc">{"".join(parts)}</div>'


def _spike_table(spike: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for s in spike:
        if not isinstance(s, Mapping):
            continue
        rows.append([
            esc(s.get("method", "?")),
            esc(s.get("variant", "?")),
            f"{fmt_num(s.get('acc'))} ± {fmt_num(s.get('acc_spread'), 2)}",
            f"{fmt_count(s.get('n_diverged'))}/{fmt_count(s.get('n'))}",
            f"{fmt_num(s.get('delta_vs_clean'))} ± {fmt_num(s.get('delta_vs_clean_spread'), 2)}",
            fmt_num(s.get("delta_vs_none_clean")),
        ])
    if not rows:
        return ""
    return (
        "<h2>Spike injection: accuracy lost to corrupted batches</h2>"
        + table(["method", "variant", "accuracy ± sd", "diverged", "Δ vs same method clean",
                 "Δ vs none clean"], rows, numeric=(2, 3, 4, 5))
    )


_DEFINITIONS = (
    "<b>diverged</b>: the parameters became non-finite, or the final test loss is "
    "non-finite or above the task's cap. <b>score</b>: the final metric, with diverged runs "
    "(and runs worse than the trivial predictor) scored as the trivial predictor. "
    "<b>max stable lr</b>: the largest learning rate at which no seed diverged (* : a "
    "smaller one diverged). <b>best</b>: the best mean score over seeds at one learning "
    "rate; <b>mean over grid</b>: over all learning rates and seeds (± the spread over "
    "seeds). <b>ctl overhead</b>: CPU ms per step of clipping and the optimizer step, minus "
    "the unclipped baseline's. Highlighted: the best value of the column."
)


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------


def _subtitle(cfg: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> str:
    """The line under the title: seeds, learning rates, steps, versions, time, runs."""
    sub = []
    if cfg.get("seeds") is not None:
        sub.append(f"seeds {esc(', '.join(map(str, cfg['seeds'])))}")
    if cfg.get("lrs"):
        sub.append(f"learning rates {esc(', '.join(fmt_num(x) for x in cfg['lrs']))}")
    if cfg.get("steps") is not None:
        sub.append(f"{esc(fmt_count(cfg['steps']))} steps")
    for key in ("torch", "python"):
        if cfg.get(key):
            sub.append(f"{key} {esc(cfg[key])}")
    el = as_float(cfg.get("elapsed_sec"))
    if math.isfinite(el) and el > 0:
        sub.append(f"{esc(fmt_num(el / 60, 3))} min")
    sub.append(f"{fmt_count(len(runs))} runs")
    return " · ".join(sub)


def _task_section(k: int, task: str, slug: str, res: Mapping[str, Any],
                  methods: list[str]) -> list[str]:
    """One task's part of the page: header, diagnosis, figure, summary and lr tables."""
    tasks_info = res["tasks"]
    info = tasks_info.get(task) if isinstance(tasks_info.get(task), Mapping) else {}
    rows = [r for r in res["aggregates"] if str(r.get("task")) == task]
    runs = res["runs"]
    body = [f'<h2 id="{esc(slug)}">{esc(task)}</h2>', _task_header(task, info)]
    verdict = res["diagnosis"].get(task)
    if isinstance(verdict, Mapping) and verdict.get("message"):
        body.append('<section class="diagnosis"><h2>Diagnosis</h2><ul><li>'
                    f'{esc(verdict["message"])}</li></ul></section>')
    trivial = as_float(info.get("trivial_metric"))
    lines = _lines_for_task(task, runs, rows, trivial)
    if lines:
        fig = bench_figure(lines, metric=str(info.get("metric", "score")),
                           higher_is_better=_direction(info),
                           trivial=trivial if math.isfinite(trivial) else None,
                           method_order=methods)
        src = "runs" if any(r.get("task") == task for r in runs) else "aggregates"
        band = ("min\u2013max band over seeds" if src == "runs"
                else "band: ± one standard deviation over seeds")
        body.append(
            f"<figure>{to_svg(fig, uid=f'gg-bench-{k}', label=f'score vs lr: {task}')}"
            f"<figcaption>Score against learning rate, one line per method: mean over "
            f"seeds, {band}; a cross marks a learning rate where at least one seed "
            "diverged (scored as the trivial predictor, dashed).</figcaption></figure>"
        )
    else:
        body.append('<div class="empty">No per-learning-rate data for this task.</div>')
    if rows:
        body.append(_summary_table(rows, _direction(info)))
        body.append(_lr_table(rows))
    else:
        body.append('<div class="empty">No aggregate rows for this task.</div>')
    return body


def _sections(res: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of the results the page reads, each of the right type (others dropped)."""
    def rows(key: str) -> list[Mapping[str, Any]]:
        return [r for r in (res.get(key) or []) if isinstance(r, Mapping)]

    def mapping(key: str) -> Mapping[str, Any]:
        return res.get(key) if isinstance(res.get(key), Mapping) else {}

    return {"config": mapping("config"), "tasks": mapping("tasks"),
            "aggregates": rows("aggregates"), "runs": rows("runs"), "spike": rows("spike"),
            "errors": rows("errors"), "diagnosis": mapping("diagnosis")}


def render_bench_report(results_or_path: Any, *, title: str | None = None) -> str:
    """The benchmark report as an HTML string (see :func:`write_bench_report`)."""
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None, got {type(title).__name__} {title!r}")
    res = load_bench_results(results_or_path)
    require_matplotlib()
    parts = _sections(res)
    aggs, runs, errors = parts["aggregates"], parts["runs"], parts["errors"]

    order: list[str] = [str(t) for t in parts["tasks"]]
    for r in list(aggs) + list(runs):
        t = str(r.get("task"))
        if t not in order:
            order.append(t)
    title = title or "gradguard stability benchmark"
    methods: list[str] = []  # one colour per method across all figures
    for r in list(aggs) + list(runs):
        m = str(r.get("method"))
        if m not in methods and not r.get("tuned_from"):
            methods.append(m)

    body: list[str] = []
    notes = [str(m) for m in (parts["config"].get("skipped") or [])]
    if errors:
        notes.append(f"{len(errors)} run(s) failed with an error (listed at the end).")
    if notes:
        body.append('<section class="diagnosis"><h2>Notes</h2><ul>'
                    + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></section>")
    used: set[str] = set()
    slugs = {t: _slug(t, used) for t in order}
    if len(order) > 1:
        body.append('<p class="chips">' + "".join(
            f'<a class="chip" href="#{esc(slugs[t])}">{esc(t)}</a>' for t in order) + "</p>")
    if not order:
        body.append('<div class="empty">These results hold no task.</div>')
    body.append(f'<p class="note">{_DEFINITIONS}</p>')
    for k, task in enumerate(order):
        body += _task_section(k, task, slugs[task], parts, methods)

    body.append(_spike_table(parts["spike"]))
    if errors:
        erows = [[esc(e.get("task", "?")), esc(e.get("method", "?")), fmt_num(e.get("lr")),
                  esc(e.get("seed", "?")), f"<code>{esc(e.get('error', ''))}</code>"]
                 for e in errors[:500]]
        body.append("<h2>Failed runs</h2>"
                    + table(["task", "method", "lr", "seed", "error"], erows, numeric=(2, 3)))

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = (f"Generated by gradguard {esc(__version__)} on {esc(now)} from results schema "
              f"<code>{esc(res.get('schema', '?'))}</code>. Self-contained: no scripts, no "
              "network access; figures are inline SVG.")
    return page(title, _subtitle(parts["config"], runs), "\n".join(body), footer)


def write_bench_report(
    results_or_path: Any, out_path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Write the benchmark report as one self-contained HTML file.

    Args:
        results_or_path: the results dict of :func:`gradguard.bench.grid.run_grid`, or a
            path to its ``results.json``, to its output directory, or to its
            ``runs.jsonl``. Missing fields are tolerated.
        out_path: the HTML file to write (parent directories are created).
        title: the page title (default: ``gradguard stability benchmark``).

    Returns:
        The path written.

    Raises:
        TypeError: for an argument of the wrong type, naming it.
        ValueError: if the input is not benchmark results.
        FileNotFoundError: if the path does not exist.
        ImportError: if matplotlib is missing (``pip install 'gradguard[bench]'``).
    """
    out = output_file(out_path, name="out_path")
    text = render_bench_report(results_or_path, title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
