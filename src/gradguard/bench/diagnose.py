"""Is a task's failure a gradient explosion? A verdict per task from the benchmark runs.

Clipping can only fix what gradients break. For every learning rate at which training
without protection fails (diverges, or ends no better than the best constant predictor),
two pieces of evidence decide:

* **norm growth**: the unprotected run's largest gradient norm against its norm at step 0
  (an explosion grows it by orders of magnitude, or makes it non-finite);
* **rescue**: whether any clipping method (torch's at any threshold, the Guard's
  policies, AGC, ...) brings the score back by more than the seed spread.

A failure that some method rescues is a gradient problem ("explosion"). A failure that
no method changes is not, whatever the norm did (a norm that grows only while a run falls
apart is a symptom): the verdict then says so, with the norm's growth, and, when it
recognises the model, what to try instead (a Post-LN Transformer trained without warm-up:
learning-rate warm-up, or Pre-LN).

References:
    Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture",
    arXiv:2002.04745 (Post-LN needs warm-up; Pre-LN does not). Liu et al. 2020,
    "Understanding the Difficulty of Training Transformers", arXiv:2004.08249.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["diagnose_task", "remedy_advice"]

# A score within this fraction of the way from the trivial predictor to the best score
# seen on the task counts as a failure.
_FAIL_FRACTION = 0.1


def remedy_advice(task: str) -> str:
    """What to try for a failure that is not a gradient problem, from the task's model."""
    from torch import nn

    from gradguard.bench.tasks import get_task

    try:
        model = get_task(task).build_model(0)
    except Exception:  # pragma: no cover - a task that cannot be built: no advice
        return ""
    post_ln = [m for m in model.modules()
               if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
               and not m.norm_first]
    if post_ln:
        return (f"the model has {len(post_ln)} Post-LN Transformer layers (norm_first=False) "
                "trained without warm-up: use a learning-rate warm-up, or Pre-LN "
                "(norm_first=True)")
    return "look at the learning rate and its warm-up, the data and the architecture"


def diagnose_task(
    task: str,
    runs: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any],
    *,
    growth: float = 10.0,
) -> dict[str, Any]:
    """The verdict for one task.

    Args:
        task: the task spec.
        runs: its benchmark runs (:func:`gradguard.bench.run.run_one` results), ``none`` among them.
        info: the task's ``describe()`` (``higher_is_better``, ``trivial_metric``).
        growth: a norm growing less than this over its step-0 value is called bounded.

    Returns:
        ``{"verdict": "explosion" | "not_explosion" | "healthy" | "unknown",
        "message": str, "failing_lrs": [...], "evidence": {lr: {...}}}``.
    """
    higher = bool(info.get("higher_is_better", True))
    trivial = float(info.get("trivial_metric", math.nan))
    sign = 1.0 if higher else -1.0
    by_lr: dict[float, dict[str, list[Mapping[str, Any]]]] = {}
    for r in runs:
        if r.get("task") == task and "error" not in r:
            by_lr.setdefault(float(r["lr"]), {}).setdefault(str(r["method"]), []).append(r)
    if not any("none" in m for m in by_lr.values()):
        return {"verdict": "unknown", "message": "no unprotected ('none') runs to judge",
                "failing_lrs": [], "evidence": {}}
    scores = [float(r["score"]) for m in by_lr.values() for rs in m.values() for r in rs]
    best = max(scores) if higher else min(scores)
    span = abs(best - trivial) if math.isfinite(trivial) else 0.0

    def mean_score(rs: Sequence[Mapping[str, Any]]) -> float:
        return statistics.mean(float(r["score"]) for r in rs)

    failing: list[float] = []
    evidence: dict[float, dict[str, Any]] = {}
    for lr in sorted(by_lr):
        none = by_lr[lr].get("none")
        if not none:
            continue
        s_none = mean_score(none)
        failed = any(r["diverged"] for r in none) or (
            span > 0 and sign * (s_none - trivial) <= _FAIL_FRACTION * span)
        if not failed:
            continue
        failing.append(lr)
        spread = statistics.pstdev([float(r["score"]) for r in none]) if len(none) > 1 else 0.0
        rescue = max(((sign * (mean_score(rs) - s_none), m) for m, rs in by_lr[lr].items()
                      if m != "none"), default=(0.0, None))  # (only "none" was run)
        ratios = []
        for r in none:
            ns = r.get("norm_stats") or {}
            step0, top = ns.get("step0"), ns.get("max")
            if ns.get("n_nonfinite") or step0 is None or top is None:
                ratios.append(math.inf)
            else:
                ratios.append(top / max(step0, 1e-30))
        evidence[lr] = {
            "none_score": s_none,
            "norm_growth": max(ratios),
            "best_method": rescue[1],
            "rescue": rescue[0],
            "rescued": rescue[0] > max(3 * spread, 0.05 * span),
        }
    if not failing:
        return {"verdict": "healthy", "message": "trains without protection at every "
                "learning rate of the grid", "failing_lrs": [], "evidence": {}}
    if not any(m != "none" for lr in failing for m in by_lr[lr]):
        return {"verdict": "unknown",
                "message": f"without protection training fails at lr {_lrs(failing)}; run "
                           "a clipping method too to tell whether it is a gradient explosion",
                "failing_lrs": failing, "evidence": evidence}
    rescued = [lr for lr in failing if evidence[lr]["rescued"]]
    if rescued:
        top = max(evidence[lr]["norm_growth"] for lr in failing)
        grows = ("becomes non-finite" if math.isinf(top)
                 else f"grows up to {top:.3g}x its step-0 value")
        return {"verdict": "explosion",
                "message": "gradient explosion: without protection training fails at lr "
                           f"{_lrs(failing)} (the gradient norm {grows}); clipping or "
                           f"skipping rescues lr {_lrs(rescued)}",
                "failing_lrs": failing, "evidence": evidence}
    bounded = [lr for lr in failing if evidence[lr]["norm_growth"] < growth]
    grown = [lr for lr in failing if lr not in bounded]
    parts = [f"not a gradient explosion: training fails at lr {_lrs(failing)} whatever the "
             "clipping (no method changes the outcome by more than the seed spread)"]
    if bounded:
        top = max(evidence[lr]["norm_growth"] for lr in bounded)
        parts.append(f"at lr {_lrs(bounded)} the gradient norm stays within {top:.2g}x of "
                     "its step-0 value")
    if grown:
        parts.append(f"at lr {_lrs(grown)} it grows only as the run falls apart")
    advice = remedy_advice(task)
    if advice:
        parts.append(advice)
    return {"verdict": "not_explosion", "message": "; ".join(parts),
            "failing_lrs": failing, "evidence": evidence}


def _lrs(lrs: Sequence[float]) -> str:
    return ", ".join(f"{lr:g}" for lr in lrs)
