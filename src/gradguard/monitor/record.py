"""The interval record: what a flushed block of rows says, on the host.

A flush turns the rows since the previous one into an :class:`IntervalRows` (the columns
as host floats, the per-layer norms as a float64 tensor, and which steps were clipped,
skipped or non-finite), which the detectors (:mod:`gradguard.monitor.detectors`) and
:func:`build_record` share. The record keeps min/max/mean over every step of the interval,
so a spike between two log steps is never lost. An :class:`Interval` is what a flush
hands on: the record and the new events.

With an Adam-family optimizer watched (:meth:`~gradguard.monitor.Monitor.watch_optimizer`),
the interval also carries the optimizer signals of its last step
(:mod:`gradguard.monitor.optim_signals`) and the record gains :data:`OPTIM_RECORD_KEYS`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradguard.log.events import Event
from gradguard.monitor.optim_signals import SIGNALS

__all__ = ["FIELDS", "OPTIM_RECORD_KEYS", "RECORD_KEYS", "Interval", "IntervalRows",
           "build_record"]

#: The scalars of one step, in the order of the ``fields`` vector passed to
#: :meth:`~gradguard.monitor.Monitor.observe`. ``clipped``/``nonfinite``/``skipped`` are
#: 0.0/1.0; ``loss`` is NaN when unknown; ``threshold`` may be inf (no clipping).
FIELDS: tuple[str, ...] = (
    "pre_norm",
    "post_norm",
    "threshold",
    "coef",
    "clipped",
    "nonfinite",
    "skipped",
    "loss",
)

#: The keys of an interval record, in order. Norm statistics are over finite values;
#: a statistic with no finite value is NaN (a step: None). Per-layer lists are aligned
#: with ``meta["names"]``; per-layer statistics also leave out exact zeros (no gradient).
RECORD_KEYS: tuple[str, ...] = (
    "step_first",  # first and last step of the interval, and the number of steps
    "step_last",
    "n_steps",
    "pre_norm_min",
    "pre_norm_max",
    "pre_norm_mean",
    "pre_norm_last",  # the last finite pre-clip norm of the interval
    "pre_norm_max_step",  # the step of pre_norm_max
    "post_norm_mean",
    "post_norm_max",
    "threshold_last",  # the threshold of the interval's last step (inf: no clipping)
    "coef_min",
    "clipped",  # counts of steps
    "nonfinite",
    "skipped",
    "spikes",  # steps the spike detector flagged (events are per episode, this is exact)
    "clip_rate",  # clipped / finite steps (NaN when there are none)
    "loss_mean",  # over finite losses; NaN when unknown
    "loss_last",
    "loss_nonfinite",
    "layer_norm_mean",  # list, one per tensor
    "layer_norm_max",  # list, one per tensor
    "layer_nonfinite",  # list of counts of NaN/inf norms, one per tensor
    "top_layer",  # name of the tensor with the largest norm of the interval (or None)
    "top_layer_norm",
    "rank",
    "time",  # wall-clock time.time() of the flush
)

#: The keys a record gains, between ``top_layer_norm`` and ``rank``, when the monitor
#: watches an Adam-family optimizer: the signals of
#: :mod:`gradguard.monitor.optim_signals` at the interval's last step (all NaN/None when
#: that step was not sampled, e.g. an explicit flush of a partial interval). Statistics
#: over layers use finite values only.
OPTIM_RECORD_KEYS: tuple[str, ...] = (
    "optim_step",  # the step the signals were computed at (None: not sampled)
    "grad_v_rms_max",  # rms(g / (sqrt(v_hat) + eps)): max and median over layers
    "grad_v_rms_median",
    "grad_v_rms_top_layer",  # the layer of the max (or None)
    "update_ratio_max",  # ||update|| / ||weight|| of that step: max and median over layers
    "update_ratio_median",
    "update_ratio_top_layer",
    "layer_grad_v_rms",  # list, one per tensor (NaN: not watched, no gradient or state)
    "layer_update_ratio",  # list, one per tensor
)

_NF = len(FIELDS)


@dataclass
class Interval:
    """One flushed interval: its record (keys :data:`RECORD_KEYS`) and the events the
    detectors found in it, in step order (not those noted or emitted between flushes)."""

    record: dict[str, Any]
    events: list[Event]


class IntervalRows:
    """The rows of one flush on the host, with what every detector and the record need.

    Args:
        block: ``(n, len(FIELDS) + n_layers)`` float64 CPU values, one row per step.
        steps: the ``n`` step numbers.
        optim: ``(len(SIGNALS), n_layers)`` float64 optimizer signals of the last step
            (:data:`~gradguard.monitor.optim_signals.SIGNALS`), or ``None``.

    Attributes:
        steps: the step numbers.
        n: the number of steps.
        pre, post, threshold, coef, loss: those columns, as lists of floats.
        clipped, skipped: per step, as lists of bools.
        bad: per step: non-finite (flagged, or a NaN/inf norm on a step that was not
            skipped for another reason: the batches after a rollback have no norms).
        layers: the ``(n, n_layers)`` per-tensor norms.
        layer_finite: where they are finite.
        valid: finite and non-zero (a norm of exactly 0 means "no gradient this step").
        n_bad, n_good, n_clipped, n_skipped: counts of steps.
        clip_rate: clipped finite steps / finite steps (NaN when there are none).
        optim: the optimizer signals of the last step, or ``None``.
    """

    def __init__(self, block: Tensor, steps: list[int], optim: Tensor | None = None) -> None:
        n = block.shape[0]
        if optim is not None and optim.shape != (len(SIGNALS), block.shape[1] - _NF):
            raise ValueError(f"optim must have shape ({len(SIGNALS)}, "
                             f"{block.shape[1] - _NF}), got {tuple(optim.shape)}")
        self.optim = optim
        self.steps = steps
        self.n = n
        cols = [block[:, i].tolist() for i in range(_NF)]
        self.pre, self.post, self.threshold, self.coef, clip, nonf, skip, self.loss = cols
        self.layers = block[:, _NF:]
        self.layer_finite = torch.isfinite(self.layers)
        layer_nonfinite = (
            (~self.layer_finite).any(dim=1).tolist() if self.layers.shape[1] else [False] * n
        )
        self.clipped = [c > 0.5 for c in clip]
        self.skipped = [s > 0.5 for s in skip]
        self.bad = [
            nonf[i] > 0.5
            or (not self.skipped[i] and (not math.isfinite(self.pre[i]) or layer_nonfinite[i]))
            for i in range(n)
        ]
        self.valid = self.layer_finite & (self.layers > 0)
        self.n_bad = sum(self.bad)
        self.n_good = n - self.n_bad
        self.n_clipped = sum(self.clipped)
        self.n_skipped = sum(self.skipped)
        clipped_good = sum(1 for i in range(n) if self.clipped[i] and not self.bad[i])
        self.clip_rate = clipped_good / self.n_good if self.n_good else math.nan


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x)]


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else math.nan


def _pre_norm_stats(rows: IntervalRows) -> dict[str, Any]:
    fpre = [(p, s) for p, s in zip(rows.pre, rows.steps, strict=True) if math.isfinite(p)]
    if not fpre:
        return {"pre_norm_min": math.nan, "pre_norm_max": math.nan, "pre_norm_mean": math.nan,
                "pre_norm_last": math.nan, "pre_norm_max_step": None}
    imax = max(range(len(fpre)), key=lambda j: fpre[j][0])  # first max on ties
    return {
        "pre_norm_min": min(p for p, _ in fpre),
        "pre_norm_max": fpre[imax][0],
        "pre_norm_mean": math.fsum(p for p, _ in fpre) / len(fpre),
        "pre_norm_last": fpre[-1][0],
        "pre_norm_max_step": fpre[imax][1],
    }


def _layer_stats(rows: IntervalRows, names: list[str]) -> dict[str, Any]:
    lay, valid = rows.layers, rows.valid
    cnt = valid.sum(dim=0)
    zero = torch.zeros((), dtype=torch.float64)
    nan = torch.full((), math.nan, dtype=torch.float64)
    l_mean = torch.where(cnt > 0, torch.where(valid, lay, zero).sum(dim=0) / cnt.clamp(min=1), nan)
    l_max = torch.where(cnt > 0, torch.where(valid, lay, -math.inf).amax(dim=0), nan)
    top_layer: str | None = None
    top_norm = math.nan
    if lay.shape[1] and bool((cnt > 0).any()):
        k = int(torch.where(cnt > 0, l_max, -math.inf).argmax())
        top_layer, top_norm = names[k], float(l_max[k])
    return {
        "layer_norm_mean": l_mean.tolist(),
        "layer_norm_max": l_max.tolist(),
        "layer_nonfinite": (~rows.layer_finite).sum(dim=0).tolist(),
        "top_layer": top_layer,
        "top_layer_norm": top_norm,
    }


def _signal_stats(values: list[float], names: list[str]) -> tuple[float, float, str | None]:
    """Max, median and the argmax's name over the finite values (NaN, NaN, None: none)."""
    finite = [(v, k) for k, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, None
    top, k = max(finite, key=lambda vk: vk[0])  # first max on ties
    return top, statistics.median(v for v, _ in finite), names[k]


def _optim_stats(rows: IntervalRows, names: list[str]) -> dict[str, Any]:
    n_layers = len(names)
    if rows.optim is None:
        grad_v = update = [math.nan] * n_layers
    else:
        grad_v = rows.optim[SIGNALS.index("grad_v_rms")].tolist()
        update = rows.optim[SIGNALS.index("update_ratio")].tolist()
    gv_max, gv_med, gv_top = _signal_stats(grad_v, names)
    up_max, up_med, up_top = _signal_stats(update, names)
    return {
        "optim_step": None if rows.optim is None else rows.steps[-1],
        "grad_v_rms_max": gv_max, "grad_v_rms_median": gv_med, "grad_v_rms_top_layer": gv_top,
        "update_ratio_max": up_max, "update_ratio_median": up_med,
        "update_ratio_top_layer": up_top,
        "layer_grad_v_rms": grad_v, "layer_update_ratio": update,
    }


def build_record(
    rows: IntervalRows, names: list[str], *, spikes: int, rank: int, optim_keys: bool = False
) -> dict[str, Any]:
    """The interval record of ``rows`` (keys :data:`RECORD_KEYS`, in that order).

    Args:
        rows: the interval.
        names: one name per parameter tensor (for ``top_layer``).
        spikes: the steps the spike detector flagged in this interval.
        rank: the distributed rank, stamped on the record.
        optim_keys: add :data:`OPTIM_RECORD_KEYS` (before ``rank``), from ``rows.optim``.

    Returns:
        The record: plain Python values (floats, ints, lists, str or None).
    """
    fpost, fcoef, floss = _finite(rows.post), _finite(rows.coef), _finite(rows.loss)
    record: dict[str, Any] = {
        "step_first": rows.steps[0],
        "step_last": rows.steps[-1],
        "n_steps": rows.n,
        **_pre_norm_stats(rows),
        "post_norm_mean": _mean(fpost),
        "post_norm_max": max(fpost) if fpost else math.nan,
        "threshold_last": rows.threshold[-1],
        "coef_min": min(fcoef) if fcoef else math.nan,
        "clipped": rows.n_clipped,
        "nonfinite": rows.n_bad,
        "skipped": rows.n_skipped,
        "spikes": spikes,
        "clip_rate": rows.clip_rate,
        "loss_mean": _mean(floss),
        "loss_last": floss[-1] if floss else math.nan,
        # losses observed non-finite (the Guard records a NaN loss as inf: NaN in the
        # buffer means "no loss given")
        "loss_nonfinite": sum(1 for x in rows.loss if math.isinf(x)),
        **_layer_stats(rows, names),
        **(_optim_stats(rows, names) if optim_keys else {}),
        "rank": rank,
        "time": time.time(),
    }
    return record
