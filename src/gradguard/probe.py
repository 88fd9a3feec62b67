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

The verdict rule
----------------
Mean-field theory (Poole et al. 2016; Schoenholz et al. 2017) gives the squared gradient
norm a per-layer multiplier ``chi_1``: over ``l`` layers it changes by ``chi_1^l =
exp(-l / xi)``, with depth scale ``xi = -1 / ln chi_1``. Schoenholz et al. find random
networks trainable to a depth of about ``6 xi_c`` (the correlation depth scale, equal to
the gradient's ``xi`` in the ordered phase), i.e. while the squared signal changes by at
most ``e^6``. Applied to gradients: the gradient *norm* may change by at most ``e^3 = 20``
over the depth. The probe measures the accumulated gain directly, so the rule needs no
model of the architecture (and the panel below sits orders of magnitude from the
boundary on either side):

* ``exploding`` if the gradient norm at the output of some parametrised layer (where
  weight gradients form) exceeds ``tolerance`` (20) times the norm at the model output;
  ``vanishing`` if it falls below ``1/tolerance``. Inside a residual branch the gain is
  taken relative to the branch's last layer (the branch's own depth), the stream itself
  through the branch outputs. The forward RMS along the main path, relative to the first
  parametrised layer, is judged the same way ("both" when it agrees, "forward" alone
  when only it fails).
* Otherwise ``healthy``: the report says there is nothing to fix rather than invent a
  cause. Signals blocked by deliberately zero-initialised weights (Fixup, ReZero, a zero
  head) are "gated", not vanishing. A recurrent module whose gradient grows more than
  ``tolerance`` times from its last to its first time step is exploding "through time";
  fading memory through time is reported as a note only (gated RNNs forget at init).

Critical networks (He-initialised ReLU, orthogonal tanh) move by power laws, not
exponentials, and stay inside the band at moderate depth. Measured with width 64, batch
256 and torch's default init for the output layer (``tests/test_probe.py``):

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

The "layer where it starts" (``onset``) is the first layer, in the direction of
propagation (from the output for gradients), after which the accumulated gain stays more
than 2x away from 1 on the failing side.

References:
    Poole et al. 2016, "Exponential expressivity in deep neural networks through transient
    chaos". Schoenholz et al. 2017, "Deep information propagation". Saxe et al. 2014.
    He et al. 2015. Pennington, Schoenholz, Ganguli 2017, "Resurrecting the sigmoid".
    Hanin 2018, "Which neural net architectures give rise to exploding and vanishing
    gradients?". Pascanu, Mikolov, Bengio 2013, "On the difficulty of training recurrent
    neural networks". Jozefowicz et al. 2015.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.init import (
    RELU_FAMILY,
    InitReport,
    Rec,
    Residual,
    Tracer,
    _moments,
    _phi,
    _q_slope,
    _tensors,
    _unstable,
    as_batches,
    fan_in,
    init_model,
    isolated,
)
from gradguard.norms import tensor_norms

__all__ = ["Cause", "FixResult", "LayerStats", "ProbeReport", "cli_arguments", "cli_main",
           "probe"]

VERDICTS = ("healthy", "exploding", "vanishing")
_SMOOTH_SATURATING = {"tanh": 0.964, "hardtanh": 1.0}  # |y| beyond this: tanh'(z) < 0.07


# --------------------------------------------------------------------------------------
# Report types
# --------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    """Measurements for one module call (or functional activation), in execution order.

    ``spread`` (parametrised layers) is the fraction of the output's second moment that
    varies across the batch: near 0 the layer maps every input to the same vector (the
    ordered phase: forward correlations collapse, Schoenholz et al. 2017).

    Gains are ratios of norms: ``fwd_gain`` = RMS(out)/RMS(in) of this call,
    ``fwd_cum`` = RMS(out)/RMS(out of the first parametrised layer), ``bwd_gain`` =
    |grad wrt this call's input| / |grad wrt its output|, ``bwd_cum`` = |grad wrt its
    output| / |grad wrt the model output|. ``None`` where not measurable.
    """

    index: int
    name: str
    type: str
    kind: str
    act: str | None = None
    shape: tuple[int, ...] | None = None
    rms: float = float("nan")
    mean: float = float("nan")
    rms_in: float | None = None
    saturated: float | None = None
    dead: float | None = None
    spread: float | None = None
    fwd_gain: float | None = None
    fwd_cum: float | None = None
    bwd_gain: float | None = None
    bwd_cum: float | None = None
    weight_norm: float | None = None
    grad_norm: float | None = None
    weight_gain: float | None = None
    chi: float | None = None
    time_gain: float | None = None
    feed: str | None = None
    follow: str | None = None
    gated: bool = False
    residual_out: bool = False
    branch: str | None = None


@dataclass
class Cause:
    """A recognised reason for a verdict: a short code, a title and the measured detail."""

    code: str
    title: str
    detail: str


@dataclass
class FixResult:
    """What :meth:`ProbeReport.fix` did: the report before, the init applied, and after."""

    before: ProbeReport
    after: ProbeReport
    init: InitReport | None

    @property
    def improved(self) -> bool:
        """True if the model is healthy after the fix."""
        return self.after.verdict == "healthy"

    def __str__(self) -> str:
        if self.init is None:
            return f"nothing to fix: {self.before.verdict}"
        b, a = self.before, self.after
        return "\n".join([
            f"before: {b.headline()}",
            str(self.init),
            f"after:  {a.headline()}",
        ])


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
    _batches: list[tuple[tuple, dict]] = field(default_factory=list, repr=False)
    _options: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- text ----------------------------------------------------------------------------
    def headline(self) -> str:
        """One line: verdict, direction, gains, onset."""
        if self.verdict == "healthy":
            return (f"healthy: gradient gain {_fmt(self.backward_gain)}, forward gain "
                    f"{_fmt(self.forward_gain)} over {self.n_param_layers} parametrised layers "
                    f"(band x{self.tolerance:g}); not a gradient problem")
        rate = f", x{_fmt(self.rate)} per layer" if self.rate else ""
        return (f"{self.verdict.upper()} ({self.direction}): gradient gain "
                f"{_fmt(self.backward_gain)}, forward gain {_fmt(self.forward_gain)}{rate}; "
                f"starts at {self.onset}")

    @property
    def n_param_layers(self) -> int:
        return sum(1 for lay in self.layers if lay.kind == "param")

    def summary(self) -> str:
        """The verdict, causes and recommendation, as text."""
        lines = [self.headline()]
        for c in self.causes:
            lines.append(f"cause [{c.code}] {c.title}: {c.detail}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"recommendation: {self.recommendation}")
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
            rows.append(
                f"{lay.index:>3} {lay.name[-22:]:<22} {lay.type[:13]:<13} {_fmt(lay.rms):>8} "
                f"{_fmt(lay.mean):>8} {_pct(frac):>8} {_fmt(lay.fwd_cum):>8} "
                f"{_fmt(lay.bwd_gain):>8} {_fmt(lay.bwd_cum):>8} {_fmt(lay.weight_gain):>7} "
                f"{_fmt(lay.weight_norm):>8} {_fmt(lay.grad_norm):>8}{flag}")
        if max_rows is not None and len(rows) > max_rows > 2:
            k = max_rows // 2
            rows = [*rows[:k], f"    ... {len(rows) - 2 * k} rows ...", *rows[-k:]]
        return "\n".join([head, *rows])

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table(max_rows=60)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        return d

    # -- fix -----------------------------------------------------------------------------
    def fix(self, model: nn.Module, *, scheme: str | None = None, residual: Any = "plan",
            force: bool = False) -> FixResult:
        """Apply the recommendation to ``model`` (in place), probe again, report both.

        Args:
            model: the probed model (its parameters are re-initialised).
            scheme: override the planned :func:`gradguard.init_model` scheme.
            residual: override the planned residual scaling (``"plan"``: keep it).
            force: re-initialise even when the verdict is healthy.

        Returns:
            A :class:`FixResult` with the reports before and after and the
            :class:`gradguard.init.InitReport`.

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
        args, kwargs = self._batches[0]
        data: Any = dict(kwargs) if kwargs else (args[0] if len(args) == 1 else args)
        init = init_model(model, plan["scheme"], data=data, residual=plan["residual"],
                          seed=self._options.get("seed", 0))
        after = _probe(model, self._batches, **self._options)
        return FixResult(self, after, init)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e4:
        return f"{v:.3g}"
    return f"{v:.1e}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


# --------------------------------------------------------------------------------------
# The measuring tracer
# --------------------------------------------------------------------------------------


class _ProbeTracer(Tracer):
    """Adds forward statistics and gradient taps to :class:`gradguard.init.Tracer`."""

    def __init__(self, model: nn.Module, modules: tuple[type, ...] | None) -> None:
        super().__init__(model, modules)
        self.fwd: dict[int, dict[str, Any]] = {}
        self.out_grads: dict[int, list[Tensor]] = {}
        self.in_grads: dict[int, list[Tensor | None]] = {}
        self.in_clones: dict[int, list[Tensor]] = {}
        self.time_dim: dict[int, int] = {}

    def tap_inputs(self, rec: Rec, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        memo: dict[int, Tensor] = {}
        grads = self.in_grads.setdefault(rec.index, [])
        clones = self.in_clones.setdefault(rec.index, [])

        def sub(t: Any) -> Any:
            if isinstance(t, tuple) and hasattr(t, "_fields"):  # a namedtuple: PackedSequence
                return type(t)(*(sub(u) for u in t))
            if isinstance(t, (tuple, list)):
                return type(t)(sub(u) for u in t)
            if not (isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()):
                return t
            if id(t) not in memo:
                c = t.clone()
                # in argument order, not in the order backward reaches them (an RNN's h0
                # may get its gradient before the input sequence does)
                slot = len(grads)
                grads.append(None)
                c.register_hook(lambda g, slot=slot: grads.__setitem__(slot, g))
                memo[id(t)] = c
                clones.append(c)
            return memo[id(t)]

        if isinstance(rec.module, nn.RNNBase):
            self.time_dim[rec.index] = 1 if rec.module.batch_first else 0
        return tuple(sub(a) for a in args), {k: sub(v) for k, v in kwargs.items()}

    def on_output(self, rec: Rec, outs: list[Tensor]) -> None:
        grads = self.out_grads.setdefault(rec.index, [])
        for t in outs:
            if t.requires_grad:
                t.register_hook(grads.append)
        y = next((t for t in outs if t.is_floating_point()), None)
        stats: dict[str, Any] = {"shape": None, "ms": math.nan, "mean": math.nan}
        if y is not None:
            with torch.no_grad():
                yf = y.detach().float()
                stats["shape"] = tuple(yf.shape)
                if yf.numel():
                    stats["ms"] = float(yf.pow(2).mean())
                    stats["mean"] = float(yf.mean())
                    stats.update(self._fractions(rec, yf))
                    if rec.kind == "param" and yf.ndim >= 2 and yf.shape[0] > 1:
                        flat = yf.reshape(yf.shape[0], -1)
                        var = float(flat.var(dim=0, unbiased=False).mean())
                        stats["spread"] = var / stats["ms"] if stats["ms"] > 0 else None
        stats["ms_in"] = rec.q_in
        self.fwd[rec.index] = stats

    def _fractions(self, rec: Rec, y: Tensor) -> dict[str, float]:
        act = rec.act
        if act in _SMOOTH_SATURATING:
            return {"sat": float((y.abs() >= _SMOOTH_SATURATING[act]).float().mean())}
        if act in ("sigmoid", "hardsigmoid"):
            return {"sat": float(((y < 0.018) | (y > 0.982)).float().mean())}
        if act in RELU_FAMILY:
            src = self.recs[rec.src].module if rec.src is not None else None
            unit = 1 if (isinstance(src, nn.modules.conv._ConvNd) and y.ndim >= 3) else -1
            inactive = (y <= 0).movedim(unit, -1).reshape(-1, y.shape[unit])
            return {"dead": float(inactive.all(dim=0).float().mean())}
        return {}


# --------------------------------------------------------------------------------------
# probe()
# --------------------------------------------------------------------------------------


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
    return _probe(model, batches, loss_fn=loss_fn, modules=modules, train=bool(train),
                  tolerance=float(tolerance), seed=seed)


def _probe(model: nn.Module, batches: list[tuple[tuple, dict]], *, loss_fn: Any,
           modules: tuple[type, ...] | None, train: bool, tolerance: float,
           seed: int) -> ProbeReport:
    t0 = time.perf_counter()
    raws = []
    tracer: _ProbeTracer | None = None
    with isolated(model, train=train, seed=seed):
        for b, batch in enumerate(batches):
            tracer = _ProbeTracer(model, modules)
            raws.append(_run_batch(model, tracer, batch, loss_fn, seed + b))
    assert tracer is not None
    names = [r.name for r in tracer.recs]
    for raw in raws:
        if raw["names"] != names:
            raise ValueError("the model took different paths on different batches; probe "
                             "them separately (n_batches=1)")
    layers = _assemble(tracer.recs, raws)
    options = {"loss_fn": loss_fn, "modules": modules, "train": train,
               "tolerance": tolerance, "seed": seed}
    report = _judge(model, tracer, layers, tolerance, head_zero=raws[0]["head_zero"],
                    all_records=modules is not None)
    report.elapsed_s = time.perf_counter() - t0
    report._batches = batches
    report._options = options
    return report


def _run_batch(model: nn.Module, tracer: _ProbeTracer, batch: tuple[tuple, dict],
               loss_fn: Any, seed: int) -> dict[str, Any]:
    args, kwargs = batch

    def prep(v: Any) -> Any:
        if isinstance(v, Tensor):
            c = v.detach().clone()
            if c.is_floating_point():
                c.requires_grad_(True)
                c = c.clone()  # a non-leaf: in-place ops inside the model stay legal
            return c
        return v

    args = tuple(prep(a) for a in args)
    kwargs = {k: prep(v) for k, v in kwargs.items()}
    inputs = [t for t in _tensors(args) + _tensors(kwargs)]
    with torch.enable_grad(), tracer:
        for t in inputs:
            tracer.add_input(t)
        output = model(*args, **kwargs)
    outs = [t for t in _tensors(output) if t.is_floating_point() and t.requires_grad]
    if not outs:
        raise ValueError("nothing in the model's output requires grad: make sure some "
                         "parameters have requires_grad=True or the input is floating point")
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    leaves = params + [t for t in inputs if t.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    model_grads: list[Tensor] = []
    head_zero = None
    if loss_fn is None:
        cots = [torch.randn(tuple(t.shape), generator=gen).to(t) for t in outs]
        total = math.sqrt(sum(float(c.float().pow(2).sum()) for c in cots)) or 1.0
        cots = [c / total for c in cots]
        roots, grads_out = list(outs), list(cots)
        model_grads = cots
        head_zero = _zero_head(tracer, outs)
        if head_zero is not None:
            for c in tracer.in_clones.get(head_zero, []):
                u = torch.randn(tuple(c.shape), generator=gen).to(c)
                roots.append(c)
                grads_out.append(u / float(u.float().norm()))
    else:
        loss = loss_fn(output)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r:.80}")
        for t in outs:
            t.register_hook(model_grads.append)
        roots, grads_out = [loss.reshape(())], [torch.ones((), dtype=loss.dtype,
                                                          device=loss.device)]
    grads = torch.autograd.grad(roots, leaves, grads_out, allow_unused=True)
    pgrads = dict(zip(params, grads[: len(params)], strict=True))
    return _raw(tracer, pgrads, model_grads, head_zero)


def _zero_head(tracer: _ProbeTracer, outs: list[Tensor]) -> int | None:
    """The last parametrised record if its weights are all zero and it makes the output."""
    params = [r for r in tracer.recs if r.kind == "param"]
    if not params:
        return None
    head = params[-1]
    prov = tracer._get(outs[0])
    if prov is None or prov.src != head.index or head.module is None:
        return None
    ws = [p for n, p in head.module.named_parameters() if not n.endswith("bias")]
    if ws and all(not bool(p.detach().any()) for p in ws) and tracer.in_clones.get(head.index):
        return head.index
    return None


def _safe_norms(ts: list[Tensor]) -> Tensor:
    """Norms from the norm engine, redone in fp64 where fp32 squares under/overflow
    (a gradient of 1e-30 per element has a zero fp32 norm; the gains need its value)."""
    norms = tensor_norms(ts).double()
    bad = ((norms == 0) | ~torch.isfinite(norms)).nonzero().flatten().tolist()
    for i in bad:
        t = ts[i]
        if bool(torch.isfinite(t).all()) and bool(t.any()):
            norms[i] = tensor_norms([t.double()])[0].to(norms)
    return norms


def _raw(tracer: _ProbeTracer, pgrads: dict[Tensor, Tensor | None],
         model_grads: list[Tensor], head_zero: int | None) -> dict[str, Any]:
    """Per-record sums of squares for one batch (norms from the norm engine)."""
    recs = tracer.recs
    flat: list[Tensor] = []
    spans: dict[tuple[str, int], tuple[int, int]] = {}

    def put(key: tuple[str, int], ts: list[Tensor]) -> None:
        ts = [t for t in ts if t is not None and t.is_floating_point()]
        spans[key] = (len(flat), len(flat) + len(ts))
        flat.extend(t.detach() for t in ts)

    for r in recs:
        put(("out", r.index), tracer.out_grads.get(r.index, []))
        put(("in", r.index), tracer.in_grads.get(r.index, []))
        mod_params = list(r.module.parameters()) if (r.module is not None and r.kind in (
            "param", "norm")) else []
        put(("w", r.index), mod_params)
        put(("g", r.index), [pgrads.get(p) for p in mod_params])  # type: ignore[misc]
        if r.index in tracer.time_dim and tracer.in_grads.get(r.index):
            g = tracer.in_grads[r.index][0]  # the input sequence's gradient
            d = tracer.time_dim[r.index]
            if g is not None and g.ndim == 3 and g.shape[d] > 1:
                put(("t0", r.index), [g.select(d, 0)])
                put(("t1", r.index), [g.select(d, g.shape[d] - 1)])
    put(("model", -1), model_grads)
    norms = _safe_norms(flat).pow(2).tolist() if flat else []

    def sq(key: tuple[str, int]) -> float | None:
        if key not in spans:
            return None
        a, b = spans[key]
        return sum(norms[a:b]) if b > a else None

    per = []
    for r in recs:
        f = tracer.fwd.get(r.index, {})
        per.append({
            "ms": f.get("ms", math.nan), "mean": f.get("mean", math.nan),
            "ms_in": f.get("ms_in"), "shape": f.get("shape"), "sat": f.get("sat"),
            "spread": f.get("spread"),
            "dead": f.get("dead"), "out2": sq(("out", r.index)), "in2": sq(("in", r.index)),
            "w2": sq(("w", r.index)), "g2": sq(("g", r.index)),
            "t0": sq(("t0", r.index)), "t1": sq(("t1", r.index)),
        })
    return {"names": [r.name for r in recs], "per": per, "model2": sq(("model", -1)),
            "head_zero": head_zero}


def _mean(vals: list[float | None]) -> float | None:
    vs = [v for v in vals if v is not None]
    return sum(vs) / len(vs) if vs else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0 or not math.isfinite(den):
        return None
    return math.sqrt(num / den) if math.isfinite(num) else math.inf


def _assemble(recs: list[Rec], raws: list[dict[str, Any]]) -> list[LayerStats]:
    n = len(raws)
    model2 = _mean([r["model2"] for r in raws])
    layers: list[LayerStats] = []
    for r in recs:
        ps = [raw["per"][r.index] for raw in raws]
        ms = _mean([p["ms"] for p in ps])
        ms_in = _mean([p["ms_in"] for p in ps])
        out2 = _mean([p["out2"] for p in ps]) if all(p["out2"] is not None for p in ps) else None
        in2 = _mean([p["in2"] for p in ps]) if all(p["in2"] is not None for p in ps) else None
        w2 = ps[0]["w2"]
        g2 = _mean([p["g2"] for p in ps])
        lay = LayerStats(
            index=r.index, name=r.name, type=r.type, kind=r.kind, act=r.act,
            shape=ps[0]["shape"],
            rms=math.sqrt(ms) if ms is not None and ms >= 0 else math.nan,
            mean=sum(p["mean"] for p in ps) / n,
            rms_in=math.sqrt(ms_in) if ms_in is not None else None,
            saturated=_mean([p["sat"] for p in ps]), dead=_mean([p["dead"] for p in ps]),
            spread=_mean([p["spread"] for p in ps]),
            bwd_cum=_ratio(out2, model2), bwd_gain=_ratio(in2, out2),
            weight_norm=math.sqrt(w2) if w2 is not None else None,
            grad_norm=math.sqrt(g2) if g2 is not None else None,
            residual_out=r.residual_out,
        )
        if lay.rms_in:
            lay.fwd_gain = lay.rms / lay.rms_in
        t0, t1 = _mean([p["t0"] for p in ps]), _mean([p["t1"] for p in ps])
        lay.time_gain = _ratio(t0, t1)
        mod = r.module
        w = getattr(mod, "weight", None) if mod is not None else None
        if r.kind == "param" and isinstance(w, Tensor) and w.ndim >= 2 and isinstance(
            mod, (nn.Linear, nn.modules.conv._ConvNd)
        ):
            wf = w.detach().float()
            lay.weight_gain = math.sqrt(fan_in(w, mod) * float(wf.pow(2).mean()))
        if r.feed is not None:
            feed = recs[r.feed]
            lay.feed = feed.act
            if lay.weight_gain is not None and feed.dphi2 is not None:
                lay.chi = lay.weight_gain ** 2 * feed.dphi2
        if r.follow is not None:
            lay.follow = recs[r.follow].act
        layers.append(lay)
    return layers


# --------------------------------------------------------------------------------------
# Verdict and diagnosis
# --------------------------------------------------------------------------------------


def _zero_params(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters()
            if not n.endswith("bias") and p.numel() and not bool(p.detach().any())]


def _series_verdict(series: list[tuple[int, float]], lt: float) -> tuple[str, int | None]:
    """``(verdict, position of the extreme)`` for gains in propagation order."""
    if not series:
        return "healthy", None
    logs = [(math.log(g) if g > 0 else -math.inf) if math.isfinite(g) else math.inf
            for _, g in series]
    hi = max(range(len(logs)), key=lambda i: logs[i])
    lo = min(range(len(logs)), key=lambda i: logs[i])
    if logs[hi] > lt and logs[hi] >= -logs[lo]:
        return "exploding", hi
    if logs[lo] < -lt:
        return "vanishing", lo
    return "healthy", hi if abs(logs[hi]) >= abs(logs[lo]) else lo


def _onset(series: list[tuple[int, float]], pos: int, verdict: str) -> int:
    """First position (propagation order) after which the gain stays > 2x on the bad side."""
    def bad(g: float) -> bool:
        return g > 2.0 if verdict == "exploding" else g < 0.5

    i = pos
    while i > 0 and bad(series[i - 1][1]):
        i -= 1
    return i


def _judge(model: nn.Module, tracer: _ProbeTracer, layers: list[LayerStats], tol: float,
           head_zero: int | None, all_records: bool) -> ProbeReport:
    """Apply the verdict rule (module docstring) to the measured layers."""
    lt = math.log(tol)
    notes: list[str] = []
    residuals = tracer.residuals
    zero = _zero_params(model)
    branch, internal = tracer.branch_records()
    for lay in layers:
        if zero and (lay.rms == 0 or lay.bwd_cum == 0):
            lay.gated = True
        if lay.index in internal:
            lay.branch = "internal"
        elif lay.index in branch:
            lay.branch = "branch"
    if head_zero is not None:
        layers[head_zero].bwd_gain = 0.0
        notes.append(f"{layers[head_zero].name} is zero-initialised: the cotangent is "
                     "injected at its input, so gains upstream are measured as if it passed "
                     "gradients through")
    if zero:
        notes.append(f"zero-initialised weights ({', '.join(zero[:4])}"
                     f"{', ...' if len(zero) > 4 else ''}): signals they block are 'gated', "
                     "not vanishing")

    def counted(lay: LayerStats) -> bool:
        return (all_records or lay.kind == "param") and not lay.gated

    # gradients: where weight gradients form (parametrised outputs), from the output back;
    # inside residual branches, relative to the branch's last layer
    bwd = [(lay.index, lay.bwd_cum) for lay in reversed(layers)
           if counted(lay) and lay.bwd_cum is not None and lay.index not in internal]
    inner: list[tuple[int, float]] = []
    for lay in reversed(layers):
        if lay.index in internal and counted(lay) and lay.bwd_cum is not None:
            out = residuals[branch[lay.index]].out_layer
            ref_g = layers[out].bwd_cum if out is not None else None
            if ref_g:
                inner.append((lay.index, lay.bwd_cum / ref_g))
    # activations: along the main path (outputs of branches are not the stream)
    main = [lay for lay in layers if (all_records or lay.kind in ("param", "norm"))
            and not lay.gated and lay.index not in branch and math.isfinite(lay.rms)]
    ref = next((lay for lay in main if lay.rms > 0), None)
    fwd: list[tuple[int, float]] = []
    for lay in layers:
        if ref is not None and lay.index >= ref.index and lay.rms_in:
            lay.fwd_cum = lay.rms / ref.rms
    for lay in main:
        if ref is not None and lay.index >= ref.index:
            fwd.append((lay.index, lay.rms / ref.rms))
    bv, bpos = _series_verdict(bwd, lt)  # type: ignore[arg-type]
    iv, ipos = _series_verdict(inner, lt)
    fv, fpos = _series_verdict(fwd, lt)
    nonfinite = [lay for lay in layers if not math.isfinite(lay.rms) or (
        lay.grad_norm is not None and not math.isfinite(lay.grad_norm))]
    time_bad = [lay for lay in layers if lay.time_gain is not None and lay.time_gain > tol]

    verdict, direction, series, pos = "healthy", None, bwd, bpos
    if bv != "healthy":
        verdict, direction = bv, ("both" if fv == bv else "backward")
    elif iv != "healthy":
        verdict, direction, series, pos = iv, "backward", inner, ipos
        notes.append("the failure is inside residual branches (gains relative to each "
                     "branch's last layer)")
    elif fv != "healthy":
        verdict, direction, series, pos = fv, "forward", fwd, fpos
    elif time_bad:
        verdict, direction = "exploding", "time"
    if nonfinite and verdict == "healthy":
        verdict, direction = "exploding", "forward"
    g_b = bwd[bpos][1] if bpos is not None else 1.0
    if series is inner and ipos is not None:
        g_b = inner[ipos][1]
    g_f = fwd[fpos][1] if fpos is not None else 1.0
    onset = rate = None
    if verdict != "healthy" and direction != "time" and pos is not None and series:
        o = _onset(series, pos, verdict)
        first = layers[series[o][0]]
        onset = f"{first.name} ({first.type})"
        positive = [k for k in range(pos + 1) if series[k][1] > 0]
        pos_r = positive[-1] if positive else pos  # underflowed gains: rate up to the last
        g_ext = series[pos_r][1]
        # steps from the start of the series (the output itself when it has gain 1)
        n_steps = pos_r + (0 if abs(series[0][1] - 1.0) < 1e-6 else 1)
        if n_steps > 0 and g_ext > 0 and math.isfinite(g_ext):
            rate = g_ext ** (1.0 / n_steps)
    elif direction == "time":
        onset = f"{time_bad[0].name} ({time_bad[0].type})"
    report = ProbeReport(
        layers=layers, verdict=verdict, direction=direction, onset=onset,
        backward_gain=g_b, forward_gain=g_f, rate=rate, causes=[], recommendation="",
        fix_plan={"scheme": "auto", "residual": "auto"}, notes=notes, tolerance=tol,
        n_residual_branches=len(residuals), elapsed_s=0.0,
    )
    _diagnose(report, model, tracer.recs, residuals, nonfinite)
    return report


def _median(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _spread_text(params: list[LayerStats]) -> str:
    last = [lay.spread for lay in params[:-1] if lay.spread is not None]
    if last and last[-1] < 1e-3:
        return (f"; but only {_fmt(last[-1])} of the last hidden layer's second moment varies "
                "across the batch: every input is mapped to the same vector")
    return ""


def _fragile(rep: ProbeReport) -> None:
    """Note activations whose variance map is unstable when the depth amplifies drift."""
    for act in sorted({lay.act for lay in rep.layers if lay.kind == "act" and lay.act}):
        if act in RELU_FAMILY or not _unstable(act, None):
            continue
        n = sum(1 for lay in rep.layers if lay.act == act)
        slope = _q_slope(act, None)
        if slope ** n > rep.tolerance:
            rep.notes.append(
                f"{n} {act} layers: the variance map's fixed point is unstable (slope "
                f"{slope:.3g} per layer at q=1, {slope:.3g}^{n} = {_fmt(slope ** n)}), so even "
                "a balanced initialisation is an unstable equilibrium that training leaves "
                "within a few steps; at this depth prefer normalisation (LayerNorm) or "
                "residual connections")


def _dphi0(act: str, param: Any) -> float:
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        (d,) = torch.autograd.grad(_phi(act, param)(x).sum(), x)
    return float(d)


_RNN_TYPES = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")


def _rnn_weight_gains(m: nn.Module) -> str:
    parts = []
    for pn, p in m.named_parameters(recurse=False):
        if pn.startswith(("weight_ih", "weight_hh")) and p.ndim == 2:
            ms = float(p.detach().float().pow(2).mean())
            parts.append(f"{pn} gain {math.sqrt(p.shape[1] * ms):.2f}")
    return ", ".join(parts[:4])


def _rnn_findings(model: nn.Module) -> list[Cause]:
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.LSTM, nn.GRU)):
            continue
        g = 4 if isinstance(m, nn.LSTM) else 3
        h = m.hidden_size
        for pn, p in m.named_parameters(recurse=False):
            if pn.startswith("weight_hh"):
                w = p.detach().float()
                gram = w.T @ w
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                if float((gram - eye).norm()) < 0.05 * math.sqrt(
                    gram.shape[0]
                ):
                    gains = [float(b.norm() / math.sqrt(b.shape[1])) for b in w.split(h)]
                    out.append(Cause(
                        "fused_gates", "recurrent gates initialised as one fused matrix",
                        f"{name}.{pn} ({g * h}x{w.shape[1]}) is orthogonal as a whole, so "
                        f"each gate's recurrent block has gain ~{statistics.mean(gains):.2f} "
                        f"(1/sqrt({g})) instead of 1: initialise each gate block separately"))
            if isinstance(m, nn.LSTM) and pn.startswith("bias_ih"):
                bhh = getattr(m, "bias_hh" + pn[len("bias_ih"):], None)
                f = p.detach().float()[h:2 * h]
                if bhh is not None:
                    f = f + bhh.detach().float()[h:2 * h]
                if float(f.mean()) < 0.5:
                    out.append(Cause(
                        "forget_bias", "LSTM forget-gate bias near 0",
                        f"{name}.{pn}: forget-gate bias {float(f.mean()):.2f}; the cell keeps "
                        f"~{1 / (1 + math.exp(-float(f.mean()))):.2f} of its memory per step. "
                        "Jozefowicz et al. 2015 recommend 1"))
    return out


def _diagnose(rep: ProbeReport, model: nn.Module, recs: list[Rec],
              residuals: list[Residual], nonfinite: list[LayerStats]) -> None:
    layers = rep.layers
    params = [lay for lay in layers if lay.kind == "param"]
    acts = [lay for lay in layers if lay.kind == "act"]
    act_names = {lay.act for lay in acts}
    rnn = _rnn_findings(model)
    _fragile(rep)
    for lay in layers:
        if lay.time_gain is not None and 0 < lay.time_gain < 1 / rep.tolerance and lay.shape:
            rep.notes.append(
                f"{lay.name}: the gradient reaching its first time step is x"
                f"{_fmt(lay.time_gain)} of that at its last (memory fades over the sequence; "
                "expected at init for gated RNNs, not counted in the verdict)")
    if rep.verdict == "healthy":
        rep.notes += [f"{c.title}: {c.detail}" for c in rnn]
        rep.recommendation = (
            f"nothing to fix: gradients and activations stay within x{rep.tolerance:g} over "
            "the depth (not a gradient problem)")
        return
    causes: list[Cause] = []
    g, rate = rep.backward_gain, rep.rate
    rate_s = f"{rate:.3g}" if rate else "?"
    if nonfinite:
        causes.append(Cause("nonfinite", "non-finite values",
                            f"first at {nonfinite[0].name} (overflow of an exploding signal)"))
    n_res = len([r for r in residuals if r.out_layer is not None])
    if n_res >= 2 and rep.verdict == "exploding":
        per = (max(rep.backward_gain, rep.forward_gain)) ** (1 / n_res)
        causes.append(Cause(
            "residual_growth", "residual growth with depth",
            f"{n_res} residual branches each add their variance to the stream, unscaled: the "
            f"signal grows x{per:.3g} per branch (gradient gain {_fmt(rep.backward_gain)}, "
            f"forward {_fmt(rep.forward_gain)}). Scale the last layer of each branch by "
            f"1/sqrt({n_res}) (GPT-2) or zero it (Fixup)"))
    relu_layers = [lay for lay in params if lay.follow in RELU_FAMILY and lay.weight_gain]
    if relu_layers and len(relu_layers) * 2 >= len(params) and not causes:
        gains = [lay.weight_gain for lay in relu_layers if lay.weight_gain]
        var = statistics.median(x * x for x in gains)
        he = math.sqrt(2.0)
        ratio = math.sqrt(var) / he
        n = len(relu_layers)
        types = sorted({lay.type for lay in relu_layers})
        biased = [lay for lay in relu_layers if lay.follow in RELU_FAMILY]
        if rep.verdict == "vanishing" and 0.25 <= var <= 0.42:
            fwd_rms = statistics.median(lay.rms for lay in biased[-3:])
            causes.append(Cause(
                "default_init_relu", "default-init ReLU vanishing",
                f"{n} {'/'.join(types)} layers followed by ReLU have weight variance "
                f"{var:.3g}/fan_in: torch's default (kaiming_uniform_ with a=sqrt(5), "
                f"1/(3 fan_in)), i.e. He/6. Each layer multiplies the gradient by sqrt(1/6) "
                f"= 0.41 (measured x{rate_s} per layer, x{_fmt(g)} in total). The default "
                f"biases keep the forward RMS at {fwd_rms:.2g}, so a forward-only check "
                "sees nothing" + _spread_text(params)))
        elif abs(math.log(ratio)) > math.log(1.1):
            causes.append(Cause(
                "relu_gain", "ReLU weights off the He gain",
                f"{n} {'/'.join(types)} layers followed by ReLU have weight gain "
                f"{math.sqrt(var):.3g} = {ratio:.3g} x He (sqrt 2): each multiplies the "
                f"signal by ~{ratio:.3g} in both directions (measured x{rate_s} per layer)"))
        else:
            beta = sum(1.0 / lay.shape[-1] for lay in relu_layers if lay.shape)
            causes.append(Cause(
                "depth_over_width", "finite width at He init",
                f"the weights are at the He gain but sum(1/width) = {beta:.2g}: at finite "
                "width the log-gain fluctuates with variance ~5 sum(1/width) (Hanin 2018); "
                "widen the layers or use residual connections"))
        dead = max((lay.dead or 0.0) for lay in acts) if acts else 0.0
        if dead > 0.5:
            causes.append(Cause("dead_relu", "dead ReLU units",
                                f"up to {100 * dead:.0f}% of the units never activate"))
    for act in sorted(a for a in act_names if a is not None):
        fed = [lay for lay in params if lay.feed == act and lay.chi is not None]
        chi = _median([lay.chi for lay in fed])  # type: ignore[misc]
        sg = _median([lay.weight_gain for lay in fed])  # type: ignore[misc]
        sat = _median([lay.saturated for lay in acts if lay.act == act])  # type: ignore[misc]
        act_layers = [lay for lay in acts if lay.act == act]
        if act in RELU_FAMILY or not fed or (causes and causes[-1].code.startswith(act)):
            continue
        if act in ("tanh", "hardtanh") and rep.verdict == "exploding" and chi and chi > 1:
            causes.append(Cause(
                "chaotic_tanh", "chaotic tanh",
                f"{len(fed)} layers feed on tanh with weight gain {sg:.3g}: chi_1 = "
                f"sigma_w^2 E[tanh'(h)^2] = {chi:.3g} > 1, the chaotic phase (Poole et al. "
                f"2016): gradients grow x{rate_s} per layer, x{_fmt(g)} in total. The edge of "
                "chaos (chi_1 = 1) is reached with orthogonal weights and gain -> 1"))
        elif act in ("sigmoid", "hardsigmoid") and rep.verdict == "vanishing":
            mean = _median([lay.mean for lay in act_layers]) or 0.5
            causes.append(Cause(
                "sigmoid", "sigmoid saturation and mean shift",
                f"sigmoid'(x) <= 1/4 and its outputs have mean {mean:.2f}: with weight gain "
                f"{sg:.3g}, chi_1 = {chi:.3g} and gradients shrink x{rate_s} per layer "
                f"({100 * (sat or 0):.0f}% saturated). Sigmoid = 1/2 + tanh(x/2)/2: remove "
                "the mean with the next bias and use gain ~4 to get the critical tanh network"))
        elif act in ("tanh", "hardtanh") and rep.verdict == "vanishing":
            causes.append(Cause(
                "ordered_tanh", "tanh in the ordered phase",
                f"chi_1 = {chi:.3g} < 1 at weight gain {sg:.3g} ({100 * (sat or 0):.0f}% "
                "saturated): gradients shrink every layer"))
        elif _unstable(act, None):
            first = act_layers[0].rms_in or act_layers[0].rms
            last = act_layers[-1].rms_in or act_layers[-1].rms
            slope = _q_slope(act, None)
            d0 = _dphi0(act, None)
            where = "contracts to 0" if last < first else "runs away"
            causes.append(Cause(
                "no_stable_fixed_point", f"{act.upper()} without a stable fixed point",
                f"with zero bias the variance map q -> g^2 E[{act}(sqrt(q) z)^2] has no stable "
                f"fixed point (slope {slope:.3g} > 1 at its fixed point; ReLU's is neutral). "
                f"At weight gain {sg:.3g} the pre-activation RMS {where}: {_fmt(first)} -> "
                f"{_fmt(last)} over {len(act_layers)} layers"
                + (f"; near 0 {act} is linear with slope {d0:.2g}, so each layer multiplies "
                   f"gradients by {sg * d0:.3g}" if where == "contracts to 0" and sg else "")
                + f" (measured x{rate_s} per layer)"))
        elif chi is not None and chi > 1 and rep.verdict == "exploding":
            m2, _, d2 = _moments(act, None, 1.0)
            causes.append(Cause(
                f"chaotic_{act}", f"chaotic {act}",
                f"chi_1 = sigma_w^2 E[{act}'(h)^2] = {chi:.3g} > 1 at weight gain {sg:.3g}: "
                f"gradients grow x{rate_s} per layer (at the variance-preserving gain "
                f"{1 / math.sqrt(m2):.3g}, chi_1 = {d2 / m2:.3g})"))
        elif chi is not None and chi < 1 and rep.verdict == "vanishing":
            causes.append(Cause(
                f"ordered_{act}", f"{act} in the ordered phase",
                f"chi_1 = {chi:.3g} < 1 at weight gain {sg:.3g}: gradients shrink "
                f"x{rate_s} per layer"))
    recurrent = [lay for lay in params if lay.type in _RNN_TYPES and lay.bwd_gain is not None]
    for lay in recurrent:
        if rep.verdict != "healthy" and abs(math.log(max(lay.bwd_gain, 1e-300))) > 0.5 * math.log(
            rep.tolerance
        ):
            mod = next((r.module for r in recs if r.index == lay.index), None)
            gains = _rnn_weight_gains(mod) if mod is not None else ""
            causes.append(Cause(
                "recurrent_gain", f"{lay.type} attenuates the gradient to its input",
                f"{lay.name} alone multiplies the gradient by {_fmt(lay.bwd_gain)} from its "
                f"output to its input ({gains}; torch's default U(+-1/sqrt(H)) is gain 0.58 "
                "and the gates' derivatives are <= 1/4)"))
    if rep.verdict != "healthy":
        causes += [c for c in rnn if c.code == "fused_gates"]
        rep.notes += [f"{c.title}: {c.detail}" for c in rnn if c.code != "fused_gates"]
        locals_ = [(lay, math.log(lay.bwd_gain)) for lay in params
                   if lay.bwd_gain and lay.bwd_gain > 0 and math.isfinite(lay.bwd_gain)]
        if locals_ and not causes:
            med = statistics.median(v for _, v in locals_)
            worst, lv = max(locals_, key=lambda t: abs(t[1] - med))
            if abs(lv - med) > 0.5 * abs(math.log(max(g, 1e-300))):
                causes.append(Cause(
                    "outlier_layer", "one layer out of scale",
                    f"{worst.name} alone multiplies the gradient by {_fmt(worst.bwd_gain)} "
                    f"(weight norm {_fmt(worst.weight_norm)}; median layer "
                    f"{_fmt(math.exp(med))})"))
    if not causes:
        causes.append(Cause(
            "unrecognised", "no known pattern",
            f"the gradient gain reaches {_fmt(g)} ({rep.direction}), x{rate_s} per "
            "parametrised layer; see the table for where it changes"))
    rep.causes = causes
    if any(c.code == "residual_growth" for c in causes):
        rep.fix_plan = {"scheme": "auto", "residual": "gpt2"}
    rep.recommendation = _recommend(rep, recs, len(residuals))
    if {c.code for c in causes} <= {"depth_over_width", "dead_relu"}:
        rep.recommendation = (
            "the weights already have the He gain, so initialisation cannot do better: the "
            "loss comes from finite width at this depth. Widen the layers, add residual "
            "connections or normalisation (report.fix would only redraw He weights)")


def _recommend(rep: ProbeReport, recs: list[Rec], n_res: int) -> str:
    groups: dict[str, int] = {}
    for lay in rep.layers:
        if lay.kind != "param":
            continue
        if lay.type in ("Embedding", "EmbeddingBag"):
            continue
        if lay.type in _RNN_TYPES:
            key = f"{lay.type}: per-gate orthogonal recurrent blocks (gain 1)" + (
                ", forget-gate bias 1" if "LSTM" in lay.type else "")
        elif lay.type == "MultiheadAttention":
            key = "MultiheadAttention: Xavier per q/k/v block"
        elif lay.follow in RELU_FAMILY or (lay.follow is None and lay.feed in RELU_FAMILY):
            key = (f"{lay.type} next to {lay.follow or lay.feed}: He (kaiming_normal_, "
                   "fan_in, gain sqrt 2), zero bias")
        elif lay.feed is not None and _unstable(lay.feed, None):
            key = (f"{lay.type} after {lay.feed}: orthogonal, variance-preserving gain "
                   f"{1 / math.sqrt(_moments(lay.feed, None, 1.0)[0]):.4g}, pre-activation "
                   "second moment pinned to 1 on the batch")
        elif lay.feed in ("sigmoid", "hardsigmoid"):
            key = (f"{lay.type} after sigmoid: orthogonal, critical gain (~4) and a bias that "
                   "removes the mean 1/2")
        elif lay.feed is not None:
            key = (f"{lay.type} after {lay.feed}: orthogonal, critical gain (chi_1 = 1"
                   + (", -> 1 with depth" if lay.feed == "tanh" else "") + ")")
        else:
            key = (f"{lay.type} with no activation before it: LeCun (unit pre-activation "
                   "variance on data or a normalised input, gain 1 otherwise)")
        groups[key] = groups.get(key, 0) + 1
    parts = [f"{n} x {k}" for k, n in groups.items()]
    res = ""
    if rep.fix_plan.get("residual") == "gpt2" or (n_res and rep.fix_plan.get("residual") == "auto"):
        res = (f"; multiply the last layer of each of the {n_res} residual branches by "
               f"1/sqrt({n_res}) (GPT-2)")
    call = "gg.init_model(model, 'auto', data=batch" + (
        ", residual='gpt2')" if rep.fix_plan.get("residual") == "gpt2" else ")")
    return ("re-initialise " + "; ".join(parts) + res + f": `{call}`, or `report.fix(model)`, "
            "which applies it and probes again")


# --------------------------------------------------------------------------------------
# CLI: gradguard probe MODULE:FACTORY --input-shape ...
# --------------------------------------------------------------------------------------


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gradguard probe`` arguments to ``parser``."""
    from gradguard.cli import positive_int

    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="an importable module (or a .py path) and a zero-argument "
                             "callable returning an nn.Module, e.g. mypkg.models:build")
    parser.add_argument("--input-shape", type=positive_int, nargs="+", action="append",
                        required=True, metavar="N",
                        help="shape of one input batch, batch first, e.g. --input-shape 64 3 "
                             "32 32 (repeat the option for several inputs; required)")
    parser.add_argument("--input-dtype", choices=("float32", "float64", "long"),
                        default="float32",
                        help="inputs are N(0,1) floats or integer ids (default: %(default)s)")
    parser.add_argument("--vocab", type=positive_int, default=1000,
                        help="integer inputs are drawn from [0, vocab) (default: %(default)s)")
    parser.add_argument("--n-batches", type=positive_int, default=1,
                        help="batches to average (default: %(default)s)")
    parser.add_argument("--eval", action="store_true",
                        help="probe in eval mode (default: training mode)")
    parser.add_argument("--tolerance", type=_tolerance, default=20.0,
                        help="the verdict's band factor: a gain outside [1/T, T] is exploding "
                             "or vanishing (> 1; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the inputs and the backward cotangent "
                             "(default: %(default)s)")
    parser.add_argument("--max-rows", type=positive_int, default=60,
                        help="rows of the per-layer table, first and last "
                             "(default: %(default)s)")
    parser.add_argument("--fix", metavar="OUT.pt", default=None,
                        help="apply the recommended initialisation, probe again and save "
                             "the fixed state_dict to OUT.pt (default: no fix)")


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 1):
        raise argparse.ArgumentTypeError(f"expected a finite number > 1, got {text!r}")
    return value


def _load_factory(target: str) -> Callable[[], nn.Module]:
    """The zero-argument callable that ``MODULE:FACTORY`` names.

    Raises:
        ValueError: saying what is wrong with ``target`` and what to give instead: no
            ``:``, a module that is missing or fails to import, a name that is not a
            callable, or a callable that needs arguments.
    """
    import inspect

    if ":" not in target:
        raise ValueError(f"MODULE:FACTORY expected, e.g. mypkg.models:build or "
                         f"models.py:build, got {target!r}")
    mod_name, fn_name = target.rsplit(":", 1)
    path = Path(mod_name)
    spec = None
    if mod_name.endswith(".py") or path.exists():
        if not path.is_file():
            raise ValueError(f"no such file: {mod_name!r}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import {mod_name!r}")
    elif "" not in sys.path:
        sys.path.insert(0, "")
    try:
        if spec is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        hint = ""
        if e.name is not None and (mod_name + ".").startswith(e.name + "."):
            hint = " (give an importable module or the path of a .py file)"
        raise ValueError(f"cannot import {mod_name!r}: {e}{hint}") from None
    except Exception as e:  # the user's module failed while importing
        raise ValueError(f"importing {mod_name!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{fn_name!r} is not a callable in {mod_name!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: calling it will tell
        return fn
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise ValueError(
            f"{target} needs arguments ({', '.join(required)}); the probe calls FACTORY "
            f"with none: add a function such as 'def build(): return {fn_name}(...)' and "
            f"pass {mod_name}:build")
    return fn


def _cli_inputs(args: argparse.Namespace) -> Any:
    gen = torch.Generator().manual_seed(args.seed)
    inputs = []
    for shape in args.input_shape:
        if args.input_dtype == "long":
            inputs.append(torch.randint(0, args.vocab, tuple(shape), generator=gen))
        else:
            inputs.append(torch.randn(tuple(shape), generator=gen,
                                      dtype=getattr(torch, args.input_dtype)))
    return inputs[0] if len(inputs) == 1 else tuple(inputs)


def _check_forward(model: nn.Module, example: Any, args: argparse.Namespace) -> None:
    """One forward pass without gradients, in eval mode (no BatchNorm statistics change,
    every module's mode is restored), so that inputs the model does not accept are refused
    in one line before the probe.

    Raises:
        ValueError: naming the shapes and the model's complaint.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*example) if isinstance(example, tuple) else model(example)
    except Exception as e:  # whatever the user's forward raises on these inputs
        shapes = " ".join(f"--input-shape {' '.join(map(str, s))}" for s in args.input_shape)
        complaint = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"the model's forward fails on {args.input_dtype} inputs {shapes}: "
            f"{type(e).__name__}: {complaint} (give the shape of one batch, batch first, "
            "one --input-shape per forward argument, and the right --input-dtype)") from None
    finally:
        for m, training in modes:
            m.training = training


def cli_main(args: argparse.Namespace) -> int:
    """Run ``gradguard probe``: print the table and verdict; exit 0 iff (finally) healthy.

    Raises:
        gradguard.cli.CLIError: before probing, for a target that does not load, a factory
            that needs arguments or returns no module, inputs the model does not accept or
            a ``--fix`` path that cannot be written.
    """
    from gradguard._paths import output_file
    from gradguard.cli import CLIError

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    try:
        fix = None if args.fix is None else output_file(args.fix, name="--fix",
                                                        example="fixed.pt")
        factory = _load_factory(args.target)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    try:
        model = factory()
    except Exception as e:  # the user's factory failed: one line, not our traceback
        raise CLIError(f"{args.target}() raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"{args.target} returned {type(model).__name__}, not an nn.Module; "
                       "FACTORY must return the model")
    example = _cli_inputs(args)
    try:
        _check_forward(model, example, args)
        report = probe(model, example, n_batches=args.n_batches, train=not args.eval,
                       tolerance=args.tolerance, seed=args.seed)
    except ValueError as e:  # e.g. no parameter requires grad
        raise CLIError(str(e)) from None
    print(report.summary())
    print(report.table(max_rows=args.max_rows))
    final = report
    if fix is not None:
        result = report.fix(model, force=False)
        print()
        print(result.init if result.init is not None else "nothing to fix")
        print()
        print(result.after.summary())
        print(result.after.table(max_rows=args.max_rows))
        fix.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), fix)
        print(f"\nfixed state_dict written to {fix}")
        final = result.after
    return 0 if final.verdict == "healthy" else 1
