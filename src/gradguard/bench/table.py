"""The benchmark's runs aggregated: one row per (task, method), and the markdown table.

:func:`aggregate` turns runs (:func:`gradguard.bench.run.run_one` results) into one row per
(task, method), :func:`spike_summary` gives the accuracy lost to the spikes of
``spike-injection``, :func:`fault_summary` what the faults of ``gpt:corrupt`` cost,
:func:`markdown_table` renders ``table.md`` and
:func:`write_outputs` writes it with ``results.json``.

Definitions (per task and method, over the grid of learning rates x seeds; a run's
*diverged* and *score* are defined in :mod:`gradguard.bench.run`):

* **divergence rate**: diverged runs / runs, over the whole grid.
* **max stable lr**: the largest grid learning rate at which no seed diverged (``None``
  if there is none); ``stable_below`` says whether every smaller grid learning rate was
  stable too (``False`` flags a non-monotone, lucky stable point).
* **best metric**: the best, over learning rates, of the mean score over seeds at that
  learning rate; ``best_spread``: the standard deviation over seeds there.
* **mean metric**: the mean score over the whole grid; ``mean_spread``: the standard
  deviation over seeds of each seed's mean over learning rates (the spread to compare
  two methods' grid means against).
* **fraction clipped** / **skipped**: steps the method clipped / skipped, over the steps
  run, averaged over runs.
* **overhead**: CPU milliseconds per step spent in ``controller.step()`` (clipping plus
  ``optimizer.step()``), and the difference with ``none``'s on the same task.
* **tuned**: for each task, the ``clip:<t>`` row with the best mean metric, ties broken
  by lower divergence rate, then by smaller threshold.

``spike-injection`` runs additionally give, per method and variant, the accuracy lost to
the spikes, paired by seed against the same method's ``clean`` run, and against
``none``'s clean run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from gradguard.bench.methods import get_method, method_label
from gradguard.bench.run import median
from gradguard.bench.tasks import SpikeInjection

__all__ = ["aggregate", "fault_summary", "jsonable", "markdown_table", "spike_summary",
           "write_outputs"]


def _better(higher: bool) -> Callable[[float, float], bool]:
    return (lambda a, b: a > b) if higher else (lambda a, b: a < b)


def _std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) >= 2 else 0.0


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _stability(lrs: list[float], per_lr: dict[float, list[dict[str, Any]]]
               ) -> tuple[float | None, bool | None]:
    """``(max_stable_lr, stable_below)`` (see the module docstring)."""
    stable = {lr: not any(r["diverged"] for r in per_lr[lr]) for lr in lrs}
    stable_lrs = [lr for lr in lrs if stable[lr]]
    max_stable = max(stable_lrs) if stable_lrs else None
    stable_below = (
        all(stable[lr] for lr in lrs if lr <= max_stable) if max_stable is not None else None
    )
    return max_stable, stable_below


def _row(task: str, method: str, rs: list[dict[str, Any]], higher: bool) -> dict[str, Any]:
    """The aggregate row of one (task, method) from its runs (``ctl_overhead_ms`` unset)."""
    better = _better(higher)
    lrs = sorted({float(r["lr"]) for r in rs})
    seeds = sorted({int(r["seed"]) for r in rs})
    per_lr: dict[float, list[dict[str, Any]]] = {lr: [] for lr in lrs}
    for r in rs:
        per_lr[float(r["lr"])].append(r)
    max_stable, stable_below = _stability(lrs, per_lr)
    lr_rows = []
    best = best_lr = best_spread = None
    for lr in lrs:
        scores = [float(r["score"]) for r in per_lr[lr]]
        mean = sum(scores) / len(scores)
        lr_rows.append({
            "lr": lr, "mean_score": mean, "spread": _std(scores),
            "n_diverged": sum(bool(r["diverged"]) for r in per_lr[lr]), "n": len(scores),
        })
        if best is None or better(mean, best):
            best, best_lr, best_spread = mean, lr, _std(scores)
    seed_means = []
    for s in seeds:
        sc = [float(r["score"]) for r in rs if int(r["seed"]) == s]
        seed_means.append(sum(sc) / len(sc))
    n_div = sum(bool(r["diverged"]) for r in rs)
    norms = [r["norm_stats"] for r in rs if r.get("norm_stats")]
    return {
        "task": task,
        "method": method,
        "n_runs": len(rs),
        "n_diverged": n_div,
        "divergence_rate": n_div / len(rs),
        "max_stable_lr": max_stable,
        "stable_below": stable_below,
        "lrs": lrs,
        "per_lr": lr_rows,
        "best_metric": best,
        "best_lr": best_lr,
        "best_spread": best_spread,
        "mean_metric": sum(float(r["score"]) for r in rs) / len(rs),
        "mean_spread": _std(seed_means),
        "frac_clipped": _mean(float(r["frac_clipped"]) for r in rs),
        "frac_skipped": _mean(float(r["frac_skipped"]) for r in rs),
        "sec_per_step": _mean(float(r["sec_per_step"]) for r in rs),
        "ctl_ms_per_step": _mean(float(r["ctl_ms_per_step"]) for r in rs),
        "ctl_overhead_ms": None,
        "norm": {
            "step0_median": median([n["step0"] for n in norms if n["step0"] is not None]),
            "median_median": median([n["median"] for n in norms if n["median"] is not None]),
            "max": max((n["max"] for n in norms if n["max"] is not None), default=None),
        },
    }


def _meta_rows(rows: list[dict[str, Any]], tasks_info: dict[str, dict[str, Any]],
               metas: dict[str, tuple[str, ...]]) -> list[dict[str, Any]]:
    """The rows of the meta-methods (``tuned``): per task, a copy of the best member's."""
    by_key = {(r["task"], r["method"]): r for r in rows}
    out = []
    for meta, members in metas.items():
        for task in sorted({r["task"] for r in rows}):
            cands = [by_key[(task, m)] for m in members if (task, m) in by_key]
            if not cands:
                continue
            better = _better(bool(tasks_info[task]["higher_is_better"]))
            # Candidates come in increasing threshold order: on a tie the smaller wins.
            chosen = cands[0]
            for c in cands[1:]:
                if better(c["mean_metric"], chosen["mean_metric"]) or (
                    c["mean_metric"] == chosen["mean_metric"]
                    and c["divergence_rate"] < chosen["divergence_rate"]
                ):
                    chosen = c
            row = dict(chosen)
            row["method"] = meta
            row["tuned_threshold"] = get_method(chosen["method"]).arg
            row["tuned_from"] = chosen["method"]
            row["tuned_candidates"] = [c["method"] for c in cands]
            out.append(row)
    return out


def aggregate(
    runs: Sequence[dict[str, Any]],
    tasks_info: dict[str, dict[str, Any]],
    metas: dict[str, tuple[str, ...]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (task, method), as defined in the module docstring.

    Args:
        runs: results of :func:`gradguard.bench.run.run_one` (runs with an ``error`` are
            ignored).
        tasks_info: ``{task spec: {"higher_is_better": bool, ...}}`` (``Task.describe()``).
        metas: meta-methods to add rows for, ``{"tuned": ("clip:0.1", ...)}``.

    Returns:
        Rows with ``task, method, n_runs, n_diverged, divergence_rate, max_stable_lr,
        stable_below, lrs, per_lr, best_metric, best_lr, best_spread, mean_metric,
        mean_spread, frac_clipped, frac_skipped, sec_per_step, ctl_ms_per_step,
        ctl_overhead_ms, norm`` (and ``tuned_threshold`` on ``tuned`` rows).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if "error" not in r:
            groups[(r["task"], r["method"])].append(r)
    rows = [_row(task, method, rs, bool(tasks_info[task]["higher_is_better"]))
            for (task, method), rs in groups.items()]
    by_key = {(r["task"], r["method"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["task"], "none"))
        if ref is not None:
            r["ctl_overhead_ms"] = r["ctl_ms_per_step"] - ref["ctl_ms_per_step"]
    rows += _meta_rows(rows, tasks_info, metas or {})
    order = {t: i for i, t in enumerate(tasks_info)}
    rows.sort(key=lambda r: (order.get(r["task"], len(order)), r["method"] != "none"))
    return rows


def spike_summary(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy lost to spikes: per (method, variant), the mean over seeds of
    ``score(variant) - score(clean)`` paired by seed, for the same method's clean run and
    for ``none``'s clean run (the unprotected reference)."""
    prefix = SpikeInjection.name + ":"
    cell: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in runs:
        if "error" in r or not str(r["task"]).startswith(prefix):
            continue
        cell[(r["method"], r["task"][len(prefix):], int(r["seed"]))] = r
    out = []
    variants = [v for v in SpikeInjection.variants if v != "clean"]
    for m in sorted({m for m, _, _ in cell}):
        for v in variants:
            seeds = sorted(s for mm, vv, s in cell if mm == m and vv == v)
            if not seeds:
                continue
            acc = [float(cell[(m, v, s)]["score"]) for s in seeds]
            d_same = [float(cell[(m, v, s)]["score"]) - float(cell[(m, "clean", s)]["score"])
                      for s in seeds if (m, "clean", s) in cell]
            d_none = [float(cell[(m, v, s)]["score"]) - float(cell[("none", "clean", s)]["score"])
                      for s in seeds if ("none", "clean", s) in cell]
            out.append({
                "method": m, "variant": v, "n": len(seeds),
                "acc": sum(acc) / len(acc), "acc_spread": _std(acc),
                "n_diverged": sum(bool(cell[(m, v, s)]["diverged"]) for s in seeds),
                "delta_vs_clean": _mean(d_same), "delta_vs_clean_spread": _std(d_same),
                "delta_vs_none_clean": _mean(d_none),
            })
    return out


def fault_summary(runs: Sequence[dict[str, Any]], tasks_info: dict[str, dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """What faults cost: for every task whose info names a clean ``reference`` task
    (``gpt:corrupt`` -> ``gpt:preln``), per method, the score of each run minus that of
    the same method's reference run at the same learning rate and seed, averaged over the
    grid (``delta``; ``delta_spread``: the standard deviation over seeds of each seed's
    mean); ``n_diverged`` counts the faulty task's diverged runs."""
    cell = {(r["task"], r["method"], float(r["lr"]), int(r["seed"])): r
            for r in runs if "error" not in r}
    out = []
    for task, info in tasks_info.items():
        ref = info.get("reference")
        if not ref:
            continue
        for m in sorted({k[1] for k in cell if k[0] == task}):
            keys = sorted(k for k in cell if k[0] == task and k[1] == m)
            paired = [(k[3], float(cell[k]["score"]) - float(cell[(ref, m, k[2], k[3])]["score"]))
                      for k in keys if (ref, m, k[2], k[3]) in cell]
            if not paired:
                continue
            by_seed: dict[int, list[float]] = defaultdict(list)
            for seed, d in paired:
                by_seed[seed].append(d)
            out.append({
                "task": task, "reference": ref, "method": m, "n": len(paired),
                "n_diverged": sum(bool(cell[k]["diverged"]) for k in keys),
                "delta": sum(d for _, d in paired) / len(paired),
                "delta_spread": _std([sum(v) / len(v) for v in by_seed.values()]),
            })
    return out


def jsonable(x: Any) -> Any:
    """``x`` as strict JSON holds it: non-finite floats become ``None``, tuples lists,
    keys strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.2e}"


def _task_section(task: str, tinfo: dict[str, Any], rows: list[dict[str, Any]],
                  diagnosis: dict[str, Any] | None) -> list[str]:
    """One task's markdown: its header, the diagnosis, the summary and the learning-rate
    tables."""
    arrow = "↑" if tinfo["higher_is_better"] else "↓"
    lines = [
        f"## {task}",
        "",
        f"metric `{tinfo['metric']}` ({arrow}); trivial predictor "
        f"{_fmt(tinfo['trivial_metric'])}; divergence cap on final loss "
        f"{_fmt(tinfo['loss_cap'])}",
        "",
    ]
    if tinfo.get("grid_lrs"):
        lines += ["learning rates " + ", ".join(_fmt(x) for x in tinfo["grid_lrs"]), ""]
    if diagnosis:
        lines += [f"**Diagnosis:** {diagnosis['message']}.", ""]
    lines += [
        "| method | div. rate | max stable lr | best (lr) | mean over grid ± seeds "
        "| clipped | ms/step | ctl overhead ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = method_label(r["method"])
        if "tuned_threshold" in r:
            name += f" (= {r['tuned_from']})"
        msl = "none" if r["max_stable_lr"] is None else _fmt(r["max_stable_lr"])
        if r["stable_below"] is False:
            msl += "*"
        lines.append(
            f"| {name} | {r['divergence_rate']:.0%} | {msl} | "
            f"{_fmt(r['best_metric'])} ± {_fmt(r['best_spread'], 2)} ({_fmt(r['best_lr'])}) | "
            f"{_fmt(r['mean_metric'])} ± {_fmt(r['mean_spread'], 2)} | "
            f"{r['frac_clipped']:.0%} | {1e3 * r['sec_per_step']:.1f} | "
            f"{_fmt(r['ctl_overhead_ms'], 2)} |"
        )
    lrs = sorted({lr for r in rows for lr in r["lrs"]})
    if len(lrs) > 1:
        lines += ["", "score by learning rate (mean over seeds; ✗k: k seeds diverged)", "",
                  "| method | " + " | ".join(_fmt(lr) for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for r in rows:
            cells = {c["lr"]: c for c in r["per_lr"]}
            out = []
            for lr in lrs:
                c = cells.get(lr)
                if c is None:
                    out.append("")
                    continue
                s = _fmt(c["mean_score"])
                if c["n_diverged"]:
                    s += f" ✗{c['n_diverged']}"
                out.append(s)
            lines.append(f"| {r['method']} | " + " | ".join(out) + " |")
    lines.append("")
    return lines


def _spike_section(spike: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## spike-injection: accuracy lost to 1% corrupted batches",
        "",
        "| method | variant | acc ± seeds | diverged | Δ vs same method clean "
        "| Δ vs none clean |",
        "|---|---|---|---|---|---|",
    ]
    for s in spike:
        lines.append(
            f"| {s['method']} | {s['variant']} | {_fmt(s['acc'])} ± "
            f"{_fmt(s['acc_spread'], 2)} | {s['n_diverged']}/{s['n']} | "
            f"{_fmt(s['delta_vs_clean'])} ± {_fmt(s['delta_vs_clean_spread'], 2)} | "
            f"{_fmt(s['delta_vs_none_clean'])} |"
        )
    lines.append("")
    return lines


def _fault_section(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for task in dict.fromkeys(r["task"] for r in rows):
        ref = next(r["reference"] for r in rows if r["task"] == task)
        lines += [f"## {task}: cost of the faults (paired with {ref} by lr and seed)", "",
                  "| method | diverged | Δ score vs own clean run ± seeds |", "|---|---|---|"]
        for r in rows:
            if r["task"] == task:
                lines.append(f"| {method_label(r['method'])} | {r['n_diverged']}/{r['n']} | "
                             f"{r['delta']:+.3g} ± {_fmt(r['delta_spread'], 2)} |")
        lines.append("")
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    """The results as markdown: per task, a summary table and a learning-rate table."""
    lines: list[str] = ["# gradguard bench", ""]
    cfg = results["config"]
    lrs = cfg["lrs"] if cfg.get("lrs") is not None else "each task's own grid"
    lines.append(f"seeds {cfg['seeds']}, lrs {lrs}, torch {cfg['torch']}")
    for msg in cfg.get("skipped", []):
        lines.append(f"- {msg}")
    lines.append("")
    for task, tinfo in results["tasks"].items():
        rows = [r for r in results["aggregates"] if r["task"] == task]
        if rows:
            lines += _task_section(task, tinfo, rows, results.get("diagnosis", {}).get(task))
    if results.get("spike"):
        lines += _spike_section(results["spike"])
    if results.get("faults"):
        lines += _fault_section(results["faults"])
    lines.append("max stable lr*: a smaller grid learning rate diverged.")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> None:
    """Write ``results.json`` (strict JSON: non-finite numbers become null) and
    ``table.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1, allow_nan=False))
    (out / "table.md").write_text(markdown_table(results))
