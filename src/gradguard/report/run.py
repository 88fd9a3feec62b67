"""The run report: a Guard's JSON Lines log as one self-contained HTML post-mortem.

The page holds, top to bottom: an optional diagnosis (lines given by the caller, e.g.
the probe's verdict), a summary of the run, the loss curve, the gradient-norm trace
(pre-clip min/mean/max band per log interval, the clip threshold, the post-clip mean,
an event lane and the clip rate), a per-layer heatmap of the gradient norm over steps,
the event table and the run's settings.

Example:
    >>> import gradguard as gg
    >>> from gradguard.report import write_run_report
    >>> guard = gg.Guard(model, clip=1.0, sinks=["run.jsonl"])   # doctest: +SKIP
    >>> ...                                                       # doctest: +SKIP
    >>> guard.close()                                             # doctest: +SKIP
    >>> write_run_report("run.jsonl", "run.html")                 # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradguard._paths import output_file
from gradguard._version import __version__
from gradguard.log.events import EVENT_SEVERITY, Event
from gradguard.log.readback import RunLog, read_jsonl
from gradguard.report.figures import (
    Layout,
    heatmap_figure,
    loss_figure,
    mpl_text,
    norm_figure,
    require_matplotlib,
    to_svg,
)
from gradguard.report.html import NA, as_float, esc, fmt_count, fmt_num, fmt_pct, page, table

__all__ = [
    "MAX_EVENT_ROWS",
    "MAX_POINTS",
    "load_run_log",
    "render_run_report",
    "summarize_run",
    "write_run_report",
]

#: Above this many log intervals, consecutive intervals are merged for the line plots.
MAX_POINTS = 2000
#: At most this many rows in the event table (errors are kept first).
MAX_EVENT_ROWS = 1000
#: Event kinds that mark a problem (the "first problem step"); ``high_clip_rate`` is a
#: tuning hint and the ``lr_*`` kinds are remedies doing their job. ``update_spike`` (an
#: Adam update jumping above its history) counts: it tends to come before a loss spike.
PROBLEM_KINDS = frozenset({"spike", "nonfinite", "skip", "rollback", "abort", "vanishing",
                           "update_spike"})
_SEV_RANK = {"error": 0, "warning": 1, "info": 2}


# --------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------


def load_run_log(log_or_path: Any) -> tuple[RunLog, str | None]:
    """The :class:`~gradguard.log.readback.RunLog` and its file name (``None`` for a RunLog).

    Raises:
        TypeError: if ``log_or_path`` is neither a path nor a RunLog.
        FileNotFoundError: if the path does not exist.
        ValueError: if the file is not a gradguard JSON Lines log.
    """
    if isinstance(log_or_path, RunLog):
        return log_or_path, None
    if not isinstance(log_or_path, (str, os.PathLike)):
        raise TypeError(
            "log_or_path must be a path to a Guard JSON Lines log or a RunLog from "
            f"gradguard.log.readback.read_jsonl, got {type(log_or_path).__name__} {log_or_path!r}"
        )
    path = Path(log_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"log_or_path: no such file: {str(path)!r}")
    hint = (
        " (a benchmark's results.json? use gradguard.report.write_bench_report, or the "
        "`gradguard report` command, which tells them apart)"
    )
    try:
        log = read_jsonl(path)
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(
            f"log_or_path {str(path)!r} is not a gradguard JSON Lines log: {e}{hint}"
        ) from e
    if not (log.meta or log.records or log.events):
        raise ValueError(
            f"log_or_path {str(path)!r} is not a gradguard JSON Lines log: it holds no "
            f"meta, record or event line{hint}"
        )
    return log, str(path)


def _i(x: Any) -> int:
    v = as_float(x)
    return int(v) if math.isfinite(v) else 0


def _normalise_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records with numeric fields as floats, step fields filled in, sorted by step."""
    out: list[dict[str, Any]] = []
    prev = 0
    for r in records:
        if not isinstance(r, Mapping):
            continue
        first, last = as_float(r.get("step_first")), as_float(r.get("step_last"))
        n = as_float(r.get("n_steps"))
        if not math.isfinite(last):
            last = first + (n - 1 if math.isfinite(n) else 0) if math.isfinite(first) else prev + 1
        if not math.isfinite(first):
            first = last - (n - 1) if math.isfinite(n) else last
        if not math.isfinite(n):
            n = last - first + 1
        prev = last
        d = dict(r)
        d["step_first"], d["step_last"], d["n_steps"] = first, last, max(n, 0.0)
        out.append(d)
    out.sort(key=lambda d: (d["step_last"], d["step_first"]))
    return out


def _as_lines(diagnosis: Any) -> list[str]:
    if diagnosis is None:
        return []
    if isinstance(diagnosis, str):
        return [ln for ln in diagnosis.splitlines() if ln.strip()]
    summary = getattr(diagnosis, "summary", None)
    if callable(summary) and hasattr(diagnosis, "verdict"):  # a gradguard ProbeReport
        return _as_lines(summary())
    if isinstance(diagnosis, Iterable):
        lines = []
        for i, item in enumerate(diagnosis):
            if not isinstance(item, str):
                raise TypeError(
                    f"diagnosis[{i}] must be a str, got {type(item).__name__} {item!r}"
                )
            lines.append(item)
        return lines
    raise TypeError(
        "diagnosis must be a str, a list of str or a ProbeReport, got "
        f"{type(diagnosis).__name__} {diagnosis!r}"
    )


def _check_title(title: Any) -> str | None:
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None, got {type(title).__name__} {title!r}")
    return title


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def summarize_run(log_or_path: Any) -> dict[str, Any]:
    """The numbers of the report's summary header, as a dict.

    Keys: ``steps`` (observed steps), ``step_first``, ``step_last``, ``intervals``,
    ``finite_steps``, ``clipped``, ``clip_frac``, ``nonfinite``, ``skipped``,
    ``spike_steps``, ``events_by_kind``, ``events_by_severity``, ``first_problem``
    (``{"step", "kind", "message"}`` or None), ``top_layer`` (``{"name", "norm",
    "step_first", "step_last", "most_often", "share"}`` or None), ``loss_first``,
    ``loss_last``, ``loss_min``, ``loss_observed``, ``norm_median``, ``norm_max``,
    ``norm_max_step``, ``policy``, ``nonfinite_policy``, ``norm_type``, ``log_every``,
    ``n_tensors``.
    """
    log, _ = load_run_log(log_or_path)
    return _summary(log, _normalise_records(log.records))


def _summary(log: RunLog, recs: list[dict[str, Any]]) -> dict[str, Any]:
    meta = log.meta
    events = sorted(log.events, key=lambda e: e.step)
    n_steps = sum(r["n_steps"] for r in recs)
    nonfinite = sum(_i(r.get("nonfinite")) for r in recs)
    clipped = sum(_i(r.get("clipped")) for r in recs)
    finite_steps = n_steps - nonfinite
    by_kind = Counter(e.kind for e in events)
    by_sev = Counter(e.severity for e in events)
    if not recs:  # counts from events alone
        nonfinite = by_kind.get("nonfinite", 0)

    # first problem: the earliest problem event, or an interval with a non-finite step
    # or a spike when no event names it
    first: dict[str, Any] | None = None
    for e in events:
        if e.kind in PROBLEM_KINDS or (e.kind not in EVENT_SEVERITY and e.severity == "error"):
            first = {"step": e.step, "kind": e.kind, "message": e.message}
            break
    for r in recs:
        for key, kind in (("nonfinite", "nonfinite"), ("spikes", "spike")):
            if _i(r.get(key)) > 0 and (first is None or r["step_last"] < first["step"]):
                first = {
                    "step": int(r["step_first"]),
                    "kind": kind,
                    "message": f"{_i(r.get(key))} {kind} step(s) in steps "
                    f"{int(r['step_first'])}\u2013{int(r['step_last'])}",
                }
        if first is not None and r["step_first"] > first["step"]:
            break

    top: dict[str, Any] | None = None
    tops = [r for r in recs if isinstance(r.get("top_layer"), str)]
    if tops:
        best = max(
            tops,
            key=lambda r: as_float(r.get("top_layer_norm"))
            if math.isfinite(as_float(r.get("top_layer_norm"))) else -math.inf,
        )
        often = Counter(r["top_layer"] for r in tops).most_common(1)[0]
        top = {
            "name": best["top_layer"],
            "norm": as_float(best.get("top_layer_norm")),
            "step_first": int(best["step_first"]),
            "step_last": int(best["step_last"]),
            "most_often": often[0],
            "share": often[1] / len(tops),
        }

    losses = [(r, as_float(r.get("loss_mean"))) for r in recs]
    finite_losses = [v for _, v in losses if math.isfinite(v)]
    means = sorted(v for v in (as_float(r.get("pre_norm_mean")) for r in recs) if math.isfinite(v))
    maxes = [(r, as_float(r.get("pre_norm_max"))) for r in recs]
    maxes = [(r, v) for r, v in maxes if math.isfinite(v)]
    norm_max = norm_max_step = None
    if maxes:
        r_max, norm_max = max(maxes, key=lambda t: t[1])
        s = r_max.get("pre_norm_max_step")
        norm_max_step = _i(s) if s is not None else int(r_max["step_last"])
    return {
        "steps": int(n_steps),
        "step_first": int(recs[0]["step_first"]) if recs else None,
        "step_last": int(recs[-1]["step_last"]) if recs else None,
        "intervals": len(recs),
        "finite_steps": int(finite_steps),
        "clipped": clipped,
        "clip_frac": clipped / finite_steps if finite_steps > 0 else math.nan,
        "nonfinite": nonfinite,
        "skipped": sum(_i(r.get("skipped")) for r in recs) if recs else by_kind.get("skip", 0),
        "spike_steps": sum(_i(r.get("spikes")) for r in recs),
        "events_by_kind": dict(by_kind),
        "events_by_severity": dict(by_sev),
        "first_problem": first,
        "top_layer": top,
        "loss_observed": bool(finite_losses),
        "loss_nonfinite": sum(_i(r.get("loss_nonfinite")) for r in recs),
        "loss_first": finite_losses[0] if finite_losses else math.nan,
        "loss_last": finite_losses[-1] if finite_losses else math.nan,
        "loss_min": min(finite_losses) if finite_losses else math.nan,
        "norm_median": means[len(means) // 2] if means else math.nan,
        "norm_max": norm_max if norm_max is not None else math.nan,
        "norm_max_step": norm_max_step,
        "policy": meta.get("policy"),
        "nonfinite_policy": meta.get("nonfinite"),
        "norm_type": meta.get("norm_type"),
        "log_every": meta.get("log_every"),
        "n_tensors": len(meta.get("names") or []),
    }


# --------------------------------------------------------------------------------------
# Series for the figures (merged when there are many intervals)
# --------------------------------------------------------------------------------------


def _wmean(pairs: Iterable[tuple[float, float]]) -> float:
    num = den = 0.0
    for v, w in pairs:
        if math.isfinite(v) and w > 0:
            num += v * w
            den += w
    return num / den if den > 0 else math.nan


def _series(recs: Sequence[dict[str, Any]], max_points: int) -> dict[str, list[float]]:
    """Per interval, or per bucket of consecutive intervals when there are more than
    ``max_points``: min of minima, max of maxima, means weighted by steps."""
    k = max(1, math.ceil(len(recs) / max_points))
    keys = ("step", "step_first", "pre_min", "pre_mean", "pre_max", "post_mean",
            "threshold", "loss_mean", "loss_last", "clip_rate", "nonfinite")
    out: dict[str, list[float]] = {key: [] for key in keys}
    for s in range(0, len(recs), k):
        b = recs[s : s + k]
        fin = [max(r["n_steps"] - _i(r.get("nonfinite")), 0.0) for r in b]
        mins = [v for v in (as_float(r.get("pre_norm_min")) for r in b) if math.isfinite(v)]
        maxs = [v for v in (as_float(r.get("pre_norm_max")) for r in b) if math.isfinite(v)]
        lasts = [v for v in (as_float(r.get("loss_last")) for r in b) if math.isfinite(v)]
        n_fin = sum(fin)
        n_clip = sum(_i(r.get("clipped")) for r in b)
        if n_fin > 0 and any("clipped" in r for r in b):
            rate = n_clip / n_fin
        else:
            rate = _wmean((as_float(r.get("clip_rate")), 1.0) for r in b)
        out["step"].append(b[-1]["step_last"])
        out["step_first"].append(b[0]["step_first"])
        out["pre_min"].append(min(mins) if mins else math.nan)
        out["pre_max"].append(max(maxs) if maxs else math.nan)
        pairs = list(zip(b, fin, strict=True))
        out["pre_mean"].append(_wmean((as_float(r.get("pre_norm_mean")), w) for r, w in pairs))
        out["post_mean"].append(_wmean((as_float(r.get("post_norm_mean")), w) for r, w in pairs))
        out["threshold"].append(as_float(b[-1].get("threshold_last")))
        out["loss_mean"].append(_wmean((as_float(r.get("loss_mean")), r["n_steps"]) for r in b))
        out["loss_last"].append(lasts[-1] if lasts else math.nan)
        out["clip_rate"].append(rate)
        out["nonfinite"].append(float(sum(_i(r.get("nonfinite")) for r in b)))
    return out


def _thin(xs: Sequence[Any], cap: int) -> list[Any]:
    """At most ``cap`` items, evenly spaced (the first and last kept)."""
    if len(xs) <= cap:
        return list(xs)
    step = (len(xs) - 1) / (cap - 1)
    return [xs[round(i * step)] for i in range(cap)]


# --------------------------------------------------------------------------------------
# HTML sections
# --------------------------------------------------------------------------------------


def _card(key: str, value: str, detail: str = "", cls: str = "") -> str:
    """A summary card; ``value`` and ``detail`` are HTML (escape them first)."""
    return (
        f'<div class="card {cls}"><div class="k">{esc(key)}</div><div class="v">{value}</div>'
        f'<div class="d">{detail}</div></div>'
    )


def _cards(s: dict[str, Any]) -> str:
    cards = []
    if s["intervals"]:
        span = f"steps {fmt_count(s['step_first'])}\u2013{fmt_count(s['step_last'])}"
        le = f" · logged every {fmt_count(s['log_every'])}" if s["log_every"] else ""
        cards.append(_card("steps observed", fmt_count(s["steps"]),
                           f"{span} · {fmt_count(s['intervals'])} intervals{le}"))
    else:
        cards.append(_card("steps observed", "0", "no interval record in the log", "warn"))
    cf = s["clip_frac"]
    cards.append(_card(
        "clipped", fmt_pct(cf),
        f"{fmt_count(s['clipped'])} of {fmt_count(s['finite_steps'])} finite steps",
        "warn" if math.isfinite(cf) and cf > 0.5 else "",
    ))
    cards.append(_card(
        "non-finite steps", fmt_count(s["nonfinite"]),
        f"{fmt_count(s['skipped'])} skipped · policy {esc(s['nonfinite_policy'] or NA)}",
        "bad" if s["nonfinite"] else "good",
    ))
    n_sp_ev = s["events_by_kind"].get("spike", 0)
    cards.append(_card(
        "spikes", fmt_count(s["spike_steps"]),
        f"spike steps · {fmt_count(n_sp_ev)} episode(s)",
        "warn" if s["spike_steps"] or n_sp_ev else "good",
    ))
    fp = s["first_problem"]
    if fp is None:
        cards.append(_card("first problem", "none", "no spike, non-finite step or skip",
                           "good"))
    else:
        cards.append(_card("first problem", f"step {fmt_count(fp['step'])}",
                           esc(fp["kind"]), "bad"))
    sev = s["events_by_severity"]
    n_ev = sum(sev.values())
    cards.append(_card(
        "events", fmt_count(n_ev),
        " · ".join(f"{fmt_count(sev[k])} {k}" for k in ("error", "warning", "info") if k in sev)
        or "none",
        "bad" if sev.get("error") else ("warn" if sev.get("warning") else ""),
    ))
    top = s["top_layer"]
    if top is not None:
        d = f"norm {fmt_num(top['norm'])} in steps {fmt_count(top['step_first'])}\u2013" \
            f"{fmt_count(top['step_last'])}"
        if top["most_often"] != top["name"]:
            d += f"; most often largest: <code>{esc(top['most_often'])}</code> " \
                 f"({fmt_pct(top['share'], 0)} of intervals)"
        else:
            d += f"; the largest in {fmt_pct(top['share'], 0)} of intervals"
        cards.append(_card("top layer", f"<code>{esc(top['name'])}</code>", d, "wide"))
    cards.append(_card(
        "gradient norm", fmt_num(s["norm_median"]),
        f"median interval mean · max {fmt_num(s['norm_max'])}"
        + (f" at step {fmt_count(s['norm_max_step'])}" if s["norm_max_step"] is not None else ""),
    ))
    if s["loss_observed"]:
        cards.append(_card(
            "loss", f"{fmt_num(s['loss_first'])} → {fmt_num(s['loss_last'])}",
            f"first → last interval mean · min {fmt_num(s['loss_min'])}", "wide",
        ))
    elif s["loss_nonfinite"]:
        cards.append(_card("loss", "non-finite",
                           f"all {fmt_count(s['loss_nonfinite'])} observed losses"))
    else:
        cards.append(_card("loss", "\u2013", "not recorded (call guard.observe_loss(loss))"))
    pol = s["policy"]
    nt = s["norm_type"]
    cards.append(_card(
        "clip policy", f"<code>{esc(pol if pol is not None else NA)}</code>",
        f"norm order {esc(fmt_num(nt))}" if nt is not None else "",
    ))
    return f'<div class="cards">{"".join(cards)}</div>'


def _diagnosis_html(lines: Sequence[str]) -> str:
    if not lines:
        return ""
    items = "".join(f"<li>{esc(ln)}</li>" for ln in lines)
    return f'<section class="diagnosis"><h2>Diagnosis</h2><ul>{items}</ul></section>'


def _event_table(events: Sequence[Event]) -> str:
    if not events:
        return '<div class="empty">No events: nothing was flagged in this run.</div>'
    by_kind = Counter(e.kind for e in events)
    chips = "".join(
        f'<span class="chip {esc(EVENT_SEVERITY.get(k, "warning"))}">{esc(k)}: '
        f"{fmt_count(n)}</span>"
        for k, n in sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    shown = list(events)
    note = ""
    if len(shown) > MAX_EVENT_ROWS:
        ranked = sorted(range(len(shown)),
                        key=lambda i: (_SEV_RANK.get(shown[i].severity, 1), i))
        keep = sorted(ranked[:MAX_EVENT_ROWS])
        shown = [events[i] for i in keep]
        note = (f'<p class="note">Showing {fmt_count(len(shown))} of {fmt_count(len(events))} '
                "events (errors first, then warnings, then info; in step order). The full "
                "list is in the log.</p>")
    rows, classes = [], []
    for e in shown:
        sev = e.severity
        layers = " ".join(f"<code>{esc(n)}</code>" for n in e.layers[:8])
        if len(e.layers) > 8:
            layers += f" (+{len(e.layers) - 8})"
        rows.append([
            fmt_count(e.step),
            esc(e.kind),
            f'<span class="sev {esc(sev)}">{esc(sev)}</span>',
            fmt_count(e.rank),
            esc(e.message),
            layers,
        ])
        classes.append(sev)
    html_rows = table(["step", "kind", "severity", "rank", "message", "layers"], rows,
                      cls="events", row_classes=classes, numeric=(0, 3),
                      col_classes={4: "msg", 5: "layers"})
    return f'<div class="chips">{chips}</div>{note}<div class="tablewrap">{html_rows}</div>'


def _settings(meta: Mapping[str, Any], source: str | None) -> str:
    rows = []
    if source:
        rows.append(["log file", f"<code>{esc(source)}</code>"])
    for key in ("gradguard_version", "policy", "nonfinite", "norm_type", "log_every", "rank"):
        if key in meta:
            rows.append([esc(key), f"<code>{esc(meta[key])}</code>"])
    t = as_float(meta.get("time"))
    if math.isfinite(t):
        try:
            when = _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC")
        except (OverflowError, OSError, ValueError):  # a corrupt time: leave it out
            when = None
        if when is not None:
            rows.append(["started", esc(when)])
    names = [str(n) for n in (meta.get("names") or [])]
    rows.append(["parameter tensors", fmt_count(len(names))])
    skip = {"gradguard_version", "policy", "nonfinite", "norm_type", "log_every", "rank",
            "time", "names", "fields"}
    for key, value in meta.items():
        if key in skip:
            continue
        try:
            text = json.dumps(value, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
        rows.append([esc(key), f"<code>{esc(text)}</code>"])
    out = table(["setting", "value"], rows, cls="settings")
    if names:
        shown = names[:5000]
        lis = "".join(f"<li><code>{esc(n)}</code></li>" for n in shown)
        more = (f"<p class=note>… and {len(names) - len(shown)} more</p>"
                if len(names) > len(shown) else "")
        out += (f"<details><summary>parameter names ({fmt_count(len(names))}, model order: the "
                f"rows of the heatmap)</summary><ol start=0>{lis}</ol>{more}</details>")
    return out


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------


def _xlim(recs: Sequence[dict[str, Any]], events: Sequence[Event]) -> tuple[float, float]:
    """The step range shared by the figures."""
    if recs:
        return (recs[0]["step_first"], recs[-1]["step_last"])
    if events:
        return (float(events[0].step), float(events[-1].step))
    return (0.0, 1.0)


def _loss_section(recs: Sequence[dict[str, Any]], ser: dict[str, list[float]] | None,
                  s: dict[str, Any], plot: dict[str, Any]) -> list[str]:
    """1. the loss curve (or why there is none)."""
    body = ["<h2>Loss</h2>"]
    if ser is not None and s["loss_observed"]:
        bad = [r["step_last"] for r in recs
               if not math.isfinite(as_float(r.get("loss_mean"))) and r["n_steps"] > 0]
        fig = loss_figure(ser["step"], ser["loss_mean"], ser["loss_last"], xlim=plot["xlim"],
                          layout=plot["layout"], bad_steps=_thin(bad, 2000))
        body.append(_figure(
            to_svg(fig, uid="gg-loss", label="training loss against step"),
            "Training loss per log interval: the mean of the interval's finite losses and "
            "the last one; red crosses on the top edge: intervals without a finite loss."
            + esc(plot["merged"]),
        ))
    elif s["loss_nonfinite"]:
        body.append(f'<div class="empty">Every one of the {fmt_count(s["loss_nonfinite"])} '
                    "losses given to the Guard was NaN or infinite.</div>")
    else:
        body.append('<div class="empty">No loss in this log: pass it to the Guard with '
                    "<code>guard.observe_loss(loss)</code> before each optimizer step.</div>")
    return body


def _norm_section(recs: Sequence[dict[str, Any]], ser: dict[str, list[float]] | None,
                  events: Sequence[Event], plot: dict[str, Any]) -> list[str]:
    """2. the gradient-norm trace with the events and the non-finite steps."""
    body = ["<h2>Gradient norm</h2>"]
    ev_marks = [(float(e.step), e.kind, as_float(e.data.get("norm"))) for e in events]
    by_kind: dict[str, list[tuple[float, str, float]]] = {}
    for m in ev_marks:
        by_kind.setdefault(m[1], []).append(m)
    ev_marks = [m for ms in by_kind.values() for m in _thin(ms, 3000)]
    nf_steps = [float(e.step) for e in events if e.kind == "nonfinite"]
    for r in recs:
        if _i(r.get("nonfinite")) > 0 and not any(
            r["step_first"] <= x <= r["step_last"] for x in nf_steps[-50:]
        ):
            nf_steps.append(r["step_first"])
    if ser is None:
        body.append('<div class="empty">No interval record in this log: the run stopped '
                    "before the first flush (records are written every <code>log_every</code> "
                    "steps and at <code>guard.close()</code>).</div>")
    if ser is not None or ev_marks:
        ser_fig = ser or {k: [] for k in ("step", "pre_min", "pre_mean", "pre_max",
                                          "post_mean", "threshold", "clip_rate")}
        fig = norm_figure(ser_fig, ev_marks, xlim=plot["xlim"], layout=plot["layout"],
                          nonfinite_steps=_thin(sorted(set(nf_steps)), 5000))
        body.append(_figure(
            to_svg(fig, uid="gg-norm", label="gradient norm against step, with events"),
            "Pre-clip global gradient norm per log interval: the band spans the "
            "interval's smallest to largest step (so a spike between two log steps is never "
            "lost), the line is its mean; the clip threshold is the one in force at the "
            "interval's end; post-clip mean: after clipping. Top lane: events at their step "
            "(spikes are also marked at their norm); red lines: non-finite gradients. "
            "Bottom: share of finite steps that were clipped." + esc(plot["merged"]),
        ))
    return body


def _heatmap_section(recs: Sequence[dict[str, Any]], names: list[str],
                     plot: dict[str, Any]) -> list[str]:
    """3. the per-layer heatmap (or why there is none)."""
    body = ["<h2>Per-layer gradient norm</h2>"]
    layered = [r for r in recs if isinstance(r.get("layer_norm_mean"), list)]
    if names and layered:
        fig, note = heatmap_figure(
            names,
            [r["step_first"] for r in layered],
            [r["step_last"] for r in layered],
            [r["layer_norm_mean"] for r in layered],
            [r.get("layer_nonfinite") or [] for r in layered],
            layout=plot["layout"],
            xlim=plot["xlim"],
        )
        cap = ("Mean gradient norm of each parameter tensor over each log interval (log₁₀ "
               "colour scale, model order from top to bottom; grey: no gradient, red: a "
               "non-finite norm). Names are shortened in the middle when long; the full "
               "list is under Run settings.")
        if note:
            cap += " " + note[0].upper() + note[1:] + "."
        body.append(_figure(
            to_svg(fig, uid="gg-heat", label="per-layer gradient norm heatmap"), esc(cap)
        ))
    else:
        why = "no parameter names in the log's meta" if not names else "no interval record"
        body.append(f'<div class="empty">No per-layer data: {esc(why)}.</div>')
    return body


def render_run_report(
    log_or_path: Any,
    *,
    title: str | None = None,
    diagnosis: Any = None,
    max_points: int = MAX_POINTS,
) -> str:
    """The run report as an HTML string (see :func:`write_run_report`).

    Args:
        log_or_path: a path to a Guard JSON Lines log, or a RunLog.
        title: the page title (default: from the file name).
        diagnosis: lines shown prominently at the top: a str (one line per line), a list
            of str, or a :class:`gradguard.ProbeReport` (its summary).
        max_points: intervals above this are merged for the line plots.

    Raises:
        TypeError, ValueError, FileNotFoundError: for bad arguments (see
            :func:`load_run_log`).
        ImportError: if matplotlib is missing, with the command to install it.
    """
    log, source = load_run_log(log_or_path)
    title = _check_title(title)
    lines = _as_lines(diagnosis)
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an int >= 2, got {max_points!r}")
    require_matplotlib()
    meta = log.meta
    recs = _normalise_records(log.records)
    events = sorted(log.events, key=lambda e: e.step)
    s = _summary(log, recs)
    names = [str(n) for n in (meta.get("names") or [])]
    if title is None:
        title = "gradguard run report" + (f" — {Path(source).name}" if source else "")

    sub = []
    if source:
        sub.append(f"log <code>{esc(source)}</code>")
    if meta.get("policy") is not None:
        sub.append(f"policy <code>{esc(meta['policy'])}</code>")
    if meta.get("gradguard_version"):
        sub.append(f"gradguard {esc(meta['gradguard_version'])}")
    body = [_diagnosis_html(lines), _cards(s)]

    # shared x range and margins
    longest = max((len(mpl_text(n, 42)) for n in names), default=0)
    plot = {
        "xlim": _xlim(recs, events),
        "layout": Layout(left=min(max(0.35 + 0.064 * longest, 1.0), 3.2)),
        "merged": (f" Each point merges {math.ceil(len(recs) / max_points)} consecutive log "
                   "intervals (min of minima, max of maxima, means weighted by steps)."
                   if recs and len(recs) > max_points else ""),
    }
    ser = _series(recs, max_points) if recs else None
    body += _loss_section(recs, ser, s, plot)
    body += _norm_section(recs, ser, events, plot)
    body += _heatmap_section(recs, names, plot)

    # 4. events
    body.append(f"<h2>Events ({fmt_count(len(events))})</h2>")
    body.append(_event_table(events))

    # 5. settings
    body.append("<h2>Run settings</h2>")
    body.append(_settings(meta, source))

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = (f"Generated by gradguard {esc(__version__)} on {esc(now)}. Self-contained: no "
              "scripts, no network access; figures are inline SVG.")
    return page(title, " · ".join(sub), "\n".join(body), footer)


def write_run_report(
    log_or_path: Any,
    out_path: str | os.PathLike[str],
    *,
    title: str | None = None,
    diagnosis: Any = None,
) -> Path:
    """Write the run report of a Guard log as one self-contained HTML file.

    Args:
        log_or_path: a path to a Guard JSON Lines log (``Guard(sinks=["run.jsonl"])``)
            or the :class:`~gradguard.log.readback.RunLog` from
            :func:`gradguard.log.readback.read_jsonl`.
        out_path: the HTML file to write (parent directories are created).
        title: the page title (default: ``gradguard run report — <file name>``).
        diagnosis: lines shown prominently at the top (a str, a list of str, or a
            :class:`gradguard.ProbeReport`), e.g. ``"not a gradient explosion: the
            gradient norm stayed near 2 — use warm-up or Pre-LN"``.

    Returns:
        The path written.

    Raises:
        TypeError: for an argument of the wrong type, naming it.
        ValueError: if the file is not a Guard log.
        FileNotFoundError: if the log does not exist.
        ImportError: if matplotlib is missing (``pip install 'gradguard[bench]'``).
    """
    out = output_file(out_path, name="out_path")
    text = render_run_report(log_or_path, title=title, diagnosis=diagnosis)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
