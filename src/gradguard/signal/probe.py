"""Probe before you train: will this model's gradients explode or vanish, where, why?

:func:`probe` runs one batch forward and one backward pass from a *random output
cotangent* (no labels needed; a zero-initialised output layer is handled by injecting the
cotangent at its input) and records, for every leaf module call (or every module of the
types you choose) and every functional activation:

* forward: RMS and mean of the output, saturated fraction (tanh, sigmoid, hardtanh),
  dead-unit fraction (ReLU family), local gain (RMS out / RMS in) and the gain
  accumulated from the first parametrised layer;
* backward: local gain ``|dL/d input| / |dL/d output|`` of the call alone, the gain
  accumulated from the output, weight and gradient norms, the weight gain
  ``sigma_w = sqrt(fan_in * mean(W^2))`` and the measured mean-field
  ``chi_1 = sigma_w^2 E[phi'(z)^2]`` of the activation feeding the layer.

The verdict rule (:mod:`gradguard.signal.verdict`) calls a model exploding or vanishing when
the accumulated gradient (or activation) gain leaves ``[1/tolerance, tolerance]``, 20 by
default; :mod:`gradguard.signal.diagnosis` names the causes and the recommendation, and
:meth:`ProbeReport.fix` applies it with :func:`gradguard.init_model` and probes again.

Critical networks (He-initialised ReLU, orthogonal tanh) move by power laws, not
exponentials, and stay inside the band at moderate depth. Measured with width 64, batch
256 and torch's default init for the output layer (``tests/test_signal_probe.py``):

=================================  =================================  ==========
model                              accumulated backward gain          per layer
=================================  =================================  ==========
ReLU, torch default init, 20       1.8e-8 (4e-8 between the first     0.41
                                   and the last hidden layer)
ReLU He, 20 / 50                   0.23 / 0.20 (default-init head)    ~1.00
ReLU He, 100                       0.032: vanishing (finite width:    0.96
                                   sum 1/width = 1.6, Hanin 2018)
ReLU 1.2 x He, 50                  1.6e3                              1.16
tanh gain 5/3, 100                 1.1e4 (Gaussian), 4.2e3 (orth.)    1.10
tanh orthogonal gain 1, 20 / 100   0.11 / 0.050 (chi_1 = 0.98)        power law
sigmoid default init, 20 / 30      9e-18 / 2.9e-26                    0.14
GELU He, 100                       1.5e-14                            0.71
residual MLP, He+He, 20 blocks     7.1e4                              1.70/block
=================================  =================================  ==========

References:
    Poole et al. 2016, "Exponential expressivity in deep neural networks through transient
    chaos". Schoenholz et al. 2017, "Deep information propagation". Saxe et al. 2014.
    He et al. 2015. Pennington, Schoenholz, Ganguli 2017, "Resurrecting the sigmoid".
    Hanin 2018, "Which neural net architectures give rise to exploding and vanishing
    gradients?".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.signal.diagnosis import Cause, diagnose, fmt_gain, fmt_percent
from gradguard.signal.initialize import InitReport, init_model
from gradguard.signal.inputs import Call, as_batches
from gradguard.signal.measure import LayerStats, measure
from gradguard.signal.verdict import DEFAULT_TOLERANCE, VERDICTS, judge

__all__ = ["VERDICTS", "Cause", "FixResult", "LayerStats", "ProbeReport", "probe", "run_probe"]


@dataclass
class FixResult:
    """What :meth:`ProbeReport.fix` did: the report before, the init applied, and after.

    Attributes:
        before: the report the fix started from.
        after: the probe of the re-initialised model (of the attempt, when it was undone).
        init: what :func:`gradguard.init_model` did (None: nothing to fix).
        changed: parameter tensors whose values the fix changed.
        restored: the fix did not make the model healthy, so its original weights were put
            back (a fix never leaves a model worse than it found it).
        reason: why the model could not be fixed (the module types no rule covers, or the
            verdict after the attempt); None when it was.
    """

    before: ProbeReport
    after: ProbeReport
    init: InitReport | None
    changed: int = 0
    restored: bool = False
    reason: str | None = None

    @property
    def improved(self) -> bool:
        """True if the model is healthy after the fix (and keeps the new weights)."""
        return self.after.verdict == "healthy" and not self.restored

    def __str__(self) -> str:
        if self.init is None:
            return f"nothing to fix: {self.before.verdict}"
        b, a = self.before, self.after
        lines = [f"before: {b.headline()}", str(self.init),
                 f"after:  {a.headline()} ({self.changed} parameter tensors changed)"]
        if self.reason:
            lines.append(f"NOT FIXED: {self.reason}")
        return "\n".join(lines)


@dataclass
class ProbeReport:
    """The result of :func:`probe`.

    Attributes:
        layers: one :class:`LayerStats` per recorded call, in execution order.
        verdict: ``"healthy"``, ``"exploding"`` or ``"vanishing"``.
        direction: ``"backward"`` (gradients), ``"forward"`` (activations), ``"both"``,
            ``"time"`` (a recurrent module, through time) or ``None`` when healthy.
        onset: name of the layer where the failure starts (see the module docstring).
        backward_gain: extreme accumulated gradient gain (max if exploding, min if
            vanishing, the one farthest from 1 if healthy).
        forward_gain: the same for the forward RMS, relative to the first layer.
        rate: per parametrised layer gain over the failing stretch (geometric mean).
        causes: recognised causes, most specific first (empty when healthy).
        recommendation: what to do, concretely.
        fix_plan: the :func:`gradguard.init_model` arguments :meth:`fix` will use.
        notes: other findings (not causes).
        tolerance: the factor used by the verdict rule.
        n_residual_branches: residual additions found in the forward pass.
        elapsed_s: wall time of the probe.
        batches: the ``(args, kwargs)`` batches probed (:meth:`fix` probes them again).
        options: the :func:`probe` options used (:meth:`fix` uses them again).
        unknown: ``"name (Type)"`` of every parametrised module no rule understands; their
            gains are measured like any other, but nothing explains them.
        confidence: ``"high"``; ``"medium"`` with unknown modules inside residual branches
            only (the verdict follows the stream); ``"low"`` with unknown modules on the
            judged path.
        along_stream: the verdict follows a residual stream (gains per residual branch).
    """

    layers: list[LayerStats]
    verdict: str
    direction: str | None
    onset: str | None
    backward_gain: float
    forward_gain: float
    rate: float | None
    causes: list[Cause]
    recommendation: str
    fix_plan: dict[str, Any]
    notes: list[str]
    tolerance: float
    n_residual_branches: int
    elapsed_s: float
    batches: list[tuple[tuple, dict]] = field(default_factory=list, repr=False,
                                              compare=False)
    options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    unknown: list[str] = field(default_factory=list)
    confidence: str = "high"
    along_stream: bool = False

    # -- text ----------------------------------------------------------------------------
    def headline(self) -> str:
        """One line: verdict, direction, gains, onset."""
        where = (f"along the residual stream ({self.n_residual_branches} branches)"
                 if self.along_stream else f"over {self.n_param_layers} parametrised layers")
        if self.verdict == "healthy":
            return (f"healthy: gradient gain {fmt_gain(self.backward_gain)}, forward gain "
                    f"{fmt_gain(self.forward_gain)} {where} (band x{self.tolerance:g}); not a "
                    "gradient problem")
        step = "residual step" if self.along_stream else "layer"
        rate = f", x{fmt_gain(self.rate)} per {step}" if self.rate else ""
        return (f"{self.verdict.upper()} ({self.direction}): gradient gain "
                f"{fmt_gain(self.backward_gain)}, forward gain "
                f"{fmt_gain(self.forward_gain)}{rate}; starts at {self.onset}")

    @property
    def n_param_layers(self) -> int:
        """How many parametrised layers were recorded."""
        return sum(1 for lay in self.layers if lay.kind == "param")

    def summary(self) -> str:
        """The verdict, causes and recommendation, as text."""
        lines = [self.headline()]
        for c in self.causes:
            lines.append(f"cause [{c.code}] {c.title}: {c.detail}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"recommendation: {self.recommendation}")
        if self.unknown:
            lines.append(f"confidence: {self.confidence} (modules no rule understands: "
                         f"{_group_types(self.unknown)})")
        lines.append(f"({len(self.layers)} records, {self.elapsed_s:.2f} s)")
        return "\n".join(lines)

    def table(self, max_rows: int | None = None) -> str:
        """The per-layer table (``max_rows``: keep the first and last rows)."""
        head = (f"{'#':>3} {'layer':<22} {'type':<13} {'rms':>8} {'mean':>8} {'sat/dead':>8} "
                f"{'fwd cum':>8} {'bwd gain':>8} {'bwd cum':>8} {'w gain':>7} {'|W|':>8} "
                f"{'|dW|':>8}")
        rows = []
        for lay in self.layers:
            frac = lay.saturated if lay.saturated is not None else lay.dead
            flag = " gated" if lay.gated else (" +res" if lay.residual_out else (
                " (branch)" if lay.branch == "internal" else ""))
            f = fmt_gain
            rows.append(
                f"{lay.index:>3} {lay.name[-22:]:<22} {lay.type[:13]:<13} {f(lay.rms):>8} "
                f"{f(lay.mean):>8} {fmt_percent(frac):>8} {f(lay.fwd_cum):>8} "
                f"{f(lay.bwd_gain):>8} {f(lay.bwd_cum):>8} {f(lay.weight_gain):>7} "
                f"{f(lay.weight_norm):>8} {f(lay.grad_norm):>8}{flag}")
        if max_rows is not None and len(rows) > max_rows > 2:
            k = max_rows // 2
            rows = [*rows[:k], f"    ... {len(rows) - 2 * k} rows ...", *rows[-k:]]
        return "\n".join([head, *rows])

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table(max_rows=60)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        return {k: v for k, v in asdict(self).items() if k not in ("batches", "options")}


    # -- fix -----------------------------------------------------------------------------
    def fix(self, model: nn.Module, *, scheme: str | None = None, residual: Any = "plan",
            force: bool = False) -> FixResult:
        """Apply the recommendation to ``model`` (in place), probe again, report both.

        Args:
            model: the probed model (its parameters are re-initialised).
            scheme: override the planned :func:`gradguard.init_model` scheme.
            residual: override the planned residual scaling (``"plan"``: keep it).
            force: re-initialise even when the verdict is healthy.

        The fix acts or says why not: when the re-initialised model is not healthy, its
        original weights are put back and :attr:`FixResult.reason` names what stands in the
        way (the module types no rule covers, or the verdict after the attempt).

        Returns:
            A :class:`FixResult` with the reports before and after, the
            :class:`gradguard.InitReport` and the number of parameter tensors changed.

        Example:
            >>> import torch, torch.nn as nn, gradguard as gg
            >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.ReLU())
            ...                       for _ in range(20)], nn.Linear(32, 1))
            >>> x = torch.randn(128, 32)
            >>> report = gg.probe(net, x)
            >>> report.verdict
            'vanishing'
            >>> report.fix(net).after.verdict
            'healthy'
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if self.verdict == "healthy" and not force:
            return FixResult(self, self, None)
        plan = dict(self.fix_plan)
        if scheme is not None:
            plan["scheme"] = scheme
        if residual != "plan":
            plan["residual"] = residual
        args, kwargs = self.batches[0]
        data: Any = Call(args, kwargs)
        originals = {id(p): (p, p.detach().clone()) for p in model.parameters()}
        init = init_model(model, plan["scheme"], data=data, residual=plan["residual"],
                          seed=self.options.get("seed", 0))
        changed = sum(1 for p, old in originals.values() if not torch.equal(p.detach(), old))
        after = run_probe(model, self.batches, **self.options)
        if after.verdict == "healthy":
            return FixResult(self, after, init, changed)
        with torch.no_grad():  # never leave the model worse than it was found
            for p, old in originals.values():
                p.copy_(old)
        return FixResult(self, after, init, changed, restored=True,
                         reason=_why_not_fixed(init, after, changed))


def _why_not_fixed(init: InitReport, after: ProbeReport, changed: int) -> str:
    """Why a fix did not make the model healthy, naming what init_model could not handle."""
    parts = []
    if init.unhandled:
        types = sorted({why.split(" holds")[0] for _, why in init.unhandled})
        parts.append(f"init_model has no rule for {', '.join(types)} "
                     f"({', '.join(n for n, _ in init.unhandled[:4])}"
                     f"{', ...' if len(init.unhandled) > 4 else ''})")
    if changed == 0:
        parts.append("the initialisation changed no parameter")
    parts.append(f"re-initialised, the model is {after.headline()}; the original weights "
                 "were restored")
    return "; ".join(parts)


def _group_types(names: list[str]) -> str:
    """``"Gate x4 (blocks.0.gate, ...)"`` for ``"name (Type)"`` entries."""
    groups: dict[str, list[str]] = {}
    for entry in names:
        name, _, typ = entry.rpartition(" (")
        groups.setdefault(typ.rstrip(")"), []).append(name)
    return "; ".join(f"{t} x{len(ns)} ({', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''})"
                     for t, ns in groups.items())


def probe(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: Callable[[Any], Tensor] | None = None,
    n_batches: int = 1,
    modules: type | tuple[type, ...] | None = None,
    train: bool = True,
    tolerance: float = 20.0,
    seed: int = 0,
) -> ProbeReport:
    """Diagnose exploding or vanishing gradients before training.

    Runs ``model`` on the batch with forward hooks on every leaf module (atomic modules
    such as ``nn.MultiheadAttention`` and RNNs as one unit) and on functional activations,
    then one backward pass from a random output cotangent drawn from a private generator
    (or from ``loss_fn``), with ``torch.autograd.grad``. Parameters, their ``.grad``,
    buffers (BatchNorm running statistics), train/eval modes and the global RNG are left
    exactly as they were.

    The verdict rule and the measured gains of reference models are in the module
    docstring: exploding/vanishing when the accumulated gradient (or activation) gain
    leaves ``[1/tolerance, tolerance]``, 20 by default (``e^3``: six mean-field depth
    scales of the squared signal, Schoenholz et al. 2017).

    Args:
        model: any ``nn.Module``: MLPs, CNNs, RNN/LSTM/GRU, residual networks written as
            custom modules, ``nn.TransformerEncoder``.
        example_inputs: a Tensor (one positional argument), a tuple of positional
            arguments, a dict of keyword arguments, or a list/iterable of such batches.
        loss_fn: optional ``loss_fn(output) -> scalar`` (close over the targets); the
            backward pass then starts from the real loss gradient.
        n_batches: batches to average (a single batch is reused with fresh cotangents and
            dropout masks).
        modules: record instances of these module types instead of leaf modules (e.g. your
            residual block class, to see the residual stream block by block).
        train: probe in training mode (dropout on, BatchNorm on batch statistics; running
            statistics are restored afterwards). ``False`` probes in eval mode.
        tolerance: the band factor of the verdict rule (> 1).
        seed: seed for the cotangent and, inside a forked RNG, for dropout.

    Returns:
        A :class:`ProbeReport`; ``print(report)`` shows the verdict, causes,
        recommendation and the per-layer table, ``report.fix(model)`` applies the fix.

    Raises:
        TypeError: ``model`` is not a module, ``loss_fn`` not callable, ``modules`` not
            types, ``example_inputs`` of an unsupported type.
        ValueError: ``tolerance <= 1``, ``n_batches < 1``, nothing requires grad, or the
            loss is not a scalar.

    References:
        Poole et al. 2016; Schoenholz et al. 2017; Pennington et al. 2017; Hanin 2018.

    Example:
        >>> import torch, torch.nn as nn, gradguard as gg
        >>> layers = [m for _ in range(20) for m in (nn.Linear(64, 64), nn.ReLU())]
        >>> report = gg.probe(nn.Sequential(*layers, nn.Linear(64, 10)), torch.randn(256, 64))
        >>> report.verdict, report.direction
        ('vanishing', 'backward')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    if isinstance(modules, type):
        modules = (modules,)
    if modules is not None and (
        not isinstance(modules, tuple) or not modules
        or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in modules)
    ):
        raise TypeError(
            f"modules must be an nn.Module subclass or a tuple of them, got {modules!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
        tolerance > 1 and math.isfinite(tolerance)
    ):
        raise ValueError(f"tolerance must be a finite number > 1, got {tolerance!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    batches = as_batches(example_inputs, n_batches)
    return run_probe(model, batches, loss_fn=loss_fn, modules=modules, train=bool(train),
                     tolerance=float(tolerance), seed=seed)


def run_probe(model: nn.Module, batches: list[tuple[tuple, dict]], *,
              loss_fn: Callable[[Any], Tensor] | None = None,
              modules: tuple[type, ...] | None = None, train: bool = True,
              tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> ProbeReport:
    """:func:`probe` on batches already in ``(args, kwargs)`` form, arguments already checked:
    measure, judge, diagnose."""
    t0 = time.perf_counter()
    m = measure(model, batches, loss_fn=loss_fn, modules=modules, train=train, seed=seed)
    j = judge(m, model, tolerance, all_records=modules is not None)
    d = diagnose(j, m.layers, model, m.tracer.recs, m.tracer.residuals)
    unknown = [lay for lay in m.layers if not lay.known]
    confidence = "high"
    if unknown:
        judged_inside = all(lay.branch is not None for lay in unknown) and j.along_stream
        confidence = "medium" if judged_inside else "low"
        names = _group_types([f"{lay.name} ({lay.type})" for lay in unknown])
        d.notes.append(
            f"{len(unknown)} module(s) of a type no rule understands ({names}): their gains "
            "are measured like any other, but the diagnosis cannot explain them and "
            f"init_model leaves them as they are; confidence {confidence}")
    return ProbeReport(
        layers=m.layers, verdict=j.verdict, direction=j.direction, onset=j.onset,
        backward_gain=j.backward_gain, forward_gain=j.forward_gain, rate=j.rate,
        causes=d.causes, recommendation=d.recommendation, fix_plan=d.fix_plan,
        notes=j.notes + d.notes, tolerance=tolerance,
        n_residual_branches=len(m.tracer.residuals), elapsed_s=time.perf_counter() - t0,
        batches=batches,
        options={"loss_fn": loss_fn, "modules": modules, "train": train,
                 "tolerance": tolerance, "seed": seed},
        unknown=[f"{lay.name} ({lay.type})" for lay in unknown], confidence=confidence,
        along_stream=j.along_stream)
