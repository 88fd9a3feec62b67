"""Model-level initialisation: gains chosen per layer from the signal around it.

``torch.nn.init`` initialises one tensor at a time and cannot see the activation that
follows a layer, the activation that feeds it, the residual stream it writes into, or the
gates fused into one recurrent matrix. :func:`init_model` traces the model (one forward
pass when ``data`` is given, module registration order otherwise) and initialises every
layer it understands; everything else is listed in the returned :class:`InitReport`, never
silently skipped.

The rule of ``scheme="auto"`` is mean-field criticality (Poole et al. 2016; Schoenholz et
al. 2017). For a layer ``z' = W phi(z)`` with weight variance ``g^2 / fan_in``:

* the second moment of the pre-activation maps as ``q' = g^2 E[phi(sqrt(q) u)^2]``;
* the squared gradient norm maps as ``chi_1 = g^2 E[phi'(sqrt(q) u)^2]`` (``u ~ N(0, 1)``).

Gradients neither explode nor vanish with depth iff ``chi_1 = 1``. Per activation family:

* ReLU family: ``chi_1 = g^2 (1 + a^2) / 2`` for every ``q``: He, ``g = sqrt(2 / (1 + a^2))``.
* Stable smooth activations (tanh, sigmoid, ELU, CELU, SELU, softplus, ...): the layer gets
  the *critical* gain ``g = 1 / sqrt(E[phi'(z)^2])`` at the variance ``q`` of the
  activation's input (orthogonal weights). For tanh the variance decays towards 0 and the
  gain tends to the orthogonal gain 1 of Saxe et al. (2014) and Pennington et al. (2017).
  Sigmoid is ``1/2 + tanh(x/2)/2``: its mean 1/2 is removed through the next layer's bias
  and the result is the critical tanh network in disguise (gain ~4).
* GELU, SiLU, Mish (and Hardswish): the variance map has *no stable fixed point* (its
  slope at the fixed point exceeds 1, see the table), so a fixed gain drifts to 0 (He) or
  runs away. These layers get the variance-preserving gain ``g = 1 / sqrt(E[phi(z)^2])``,
  and with ``data`` each layer's pre-activation second moment is pinned to 1 on the batch.

Gains are computed numerically by :func:`activation_gain` (Gauss–Legendre quadrature, no
random numbers); the table of gains per activation is in
:mod:`gradguard.signal.activations`, the rule of each layer type in
:mod:`gradguard.signal.planner`.


Residual networks: the stream's variance grows by ``1 + Var(branch)/Var(stream)`` per
branch. ``residual="gpt2"`` multiplies the last layer of each of the ``B`` branches by
``1/sqrt(B)`` (GPT-2's ``1/sqrt(2N)`` for ``N`` layers of two branches), ``"fixup"`` zeroes
it and scales the other branch layers by ``B^(-1/(2m-2))`` (Zhang et al. 2019), and
``"deepnorm"`` scales the branch layers (value and output projections, feed-forward) by
``beta = (8N)^(-1/4)`` with ``N = B/2`` (Wang et al. 2022). A Pre-LN branch (it normalises
its input; the stream does not) outputs at the scale its weights set, while the stream keeps
the embedding's scale (std 0.02 in GPT-2 and Llama): with ``data``, ``"gpt2"`` then scales
the branch's last layer so that its output RMS on the batch is the stream's RMS (at its
smallest token: a ViT's class token) over ``sqrt(B)``, the same rule at the stream's scale.

Layers are recognised by what they do (:mod:`gradguard.signal.modules`): ``transformers``'
``Conv1D`` is a linear layer with a transposed weight, a custom RMSNorm a normalisation.

References:
    Saxe, McClelland, Ganguli 2014, "Exact solutions to the nonlinear dynamics of learning
    in deep linear neural networks". He et al. 2015, "Delving deep into rectifiers".
    Poole et al. 2016, "Exponential expressivity in deep neural networks through transient
    chaos". Schoenholz et al. 2017, "Deep information propagation". Pennington, Schoenholz,
    Ganguli 2017, "Resurrecting the sigmoid in deep learning through dynamical isometry".
    Mishkin & Matas 2016, "All you need is a good init" (LSUV). Jozefowicz et al. 2015,
    "An empirical exploration of recurrent network architectures" (forget bias 1).
    Radford et al. 2019 (GPT-2). Zhang, Dauphin, Ma 2019, "Fixup initialization". Wang et al.
    2022, "DeepNet: scaling transformers to 1,000 layers".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.signal.inputs import as_batches, isolated, tensors_in
from gradguard.signal.measure import measure
from gradguard.signal.modules import ATOMIC, CONV, linear_layout
from gradguard.signal.planner import InitEntry, InitTracer, Planner, has_rule
from gradguard.signal.tracing import Rec, Residual, Tracer, static_records
from gradguard.signal.verdict import DEFAULT_TOLERANCE, judge

__all__ = ["RESIDUAL_SCALINGS", "SCHEMES", "InitEntry", "InitReport", "init_model"]

SCHEMES = ("auto", "he", "xavier", "orthogonal", "lsuv")
RESIDUAL_SCALINGS = ("gpt2", "fixup", "deepnorm")


@dataclass
class InitReport:
    """The result of :func:`init_model`.

    Attributes:
        scheme: the scheme used.
        residual: the residual scaling applied (``None`` if none).
        data_driven: whether a batch was traced (structure and statistics measured).
        entries: one :class:`InitEntry` per initialised module, in execution order.
        unhandled: ``(name, reason)`` for each module whose parameters were left as they
            were (unknown types, direct parameters of containers).
        notes: anything else worth knowing (skipped residual branches, DeepNorm's alpha).
        n_residual_branches: residual branches found by the trace.
        backward_check: for ``"lsuv"``, the probe's verdict and accumulated backward gain
            after initialisation.
    """

    scheme: str
    residual: str | None
    data_driven: bool
    entries: list[InitEntry] = field(default_factory=list)
    unhandled: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_residual_branches: int = 0
    backward_check: dict[str, Any] | None = None

    def __str__(self) -> str:
        head = (f"init_model: scheme={self.scheme!r}, residual={self.residual!r}, "
                f"{'data-driven' if self.data_driven else 'static (no data)'}, "
                f"{len(self.entries)} modules initialised")
        lines = [head]
        groups: dict[tuple[str, str], list[InitEntry]] = {}
        for e in self.entries:
            groups.setdefault((e.type, _strip_numbers(e.action)), []).append(e)
        for (typ, _), es in groups.items():
            gains = [e.gain for e in es if e.gain is not None]
            g = ""
            if gains:
                lo, hi = min(gains), max(gains)
                g = f" [gain {lo:.3g}]" if hi - lo < 1e-3 * max(1.0, hi) else (
                    f" [gain {lo:.3g}..{hi:.3g}]")
            lines.append(f"  {len(es):>3} x {typ:<18} {es[0].action}{g}")
        for name, why in self.unhandled:
            lines.append(f"  NOT INITIALISED {name}: {why}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.backward_check:
            lines.append(f"  backward check: {self.backward_check}")
        return "\n".join(lines)


def _strip_numbers(s: str) -> str:
    return "".join(c for c in s if not (c.isdigit() or c == "."))


def _check_choice(value: Any, name: str, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def init_model(
    model: nn.Module,
    scheme: str = "auto",
    data: Any = None,
    *,
    residual: str | None = "auto",
    seed: int = 0,
    strict: bool = False,
) -> InitReport:
    """Initialise a whole model, layer by layer, from the signal around each layer.

    Schemes (Linear and Conv layers; RNNs, attention and norms get their own rules):

    * ``"auto"``: per layer from the activations around it (module docstring): He
      (``kaiming_normal_``, fan_in, ``gain = sqrt(2 / (1 + a^2))``) next to the ReLU
      family; orthogonal critical gains (``chi_1 = 1``) after tanh, sigmoid (with a
      mean-centring bias), ELU, SELU, ...; variance-pinned orthogonal after GELU, SiLU, Mish;
      unit pre-activation second moment where the input is data or a normalised stream.
      LSTM/GRU/RNN: per-gate orthogonal recurrent blocks, per-gate Xavier input blocks,
      LSTM forget-gate bias 1. Attention: Xavier per q/k/v block. Norms: weight 1, bias 0.
      With ``data`` the statistics are measured on the batch (one pass, each layer is
      initialised just before it runs); without, they follow the mean-field recursion.
    * ``"he"``, ``"xavier"``, ``"orthogonal"``: that distribution everywhere (per gate for
      recurrent weights, per block for attention), biases zero.
    * ``"lsuv"``: orthogonal, then every layer's output variance set to 1 on ``data``
      (Mishkin & Matas 2016), followed by a backward check with :func:`gradguard.probe`
      that warns when gradients still explode or vanish (LSUV fixes the forward pass only:
      on tanh it lands in the chaotic phase).

    Residual scaling (needs ``data`` to find the branches): ``"gpt2"``, ``"fixup"``,
    ``"deepnorm"`` (module docstring), ``None`` for none; ``"auto"`` applies ``"gpt2"``
    when ``scheme="auto"`` and residual branches are found.

    Modules with parameters that no rule covers (custom layers, parameters held directly by
    containers) are listed in ``report.unhandled`` and a warning is issued;
    ``strict=True`` raises instead.

    Args:
        model: the model; its parameters are overwritten in place.
        scheme: one of ``"auto"``, ``"he"``, ``"xavier"``, ``"orthogonal"``, ``"lsuv"``.
        data: an example batch (as for :func:`gradguard.probe`), used to trace the model's
            structure (activations, residual branches) and measure statistics. Required
            for ``"lsuv"`` and for residual scaling.
        residual: ``"auto"``, ``None``/``"none"``, ``"gpt2"``, ``"fixup"`` or ``"deepnorm"``.
        seed: seed of the private generator used for all draws (the global RNG is not
            touched).
        strict: raise ``TypeError`` instead of warning about unhandled modules.

    Returns:
        An :class:`InitReport` of what was done to each module and what was not.

    Raises:
        ValueError: unknown ``scheme`` or ``residual``; ``"lsuv"`` or explicit residual
            scaling without ``data``.
        TypeError: ``model`` is not an ``nn.Module``; unhandled modules with ``strict``.

    References:
        He et al. 2015; Saxe et al. 2014; Schoenholz et al. 2017; Pennington et al. 2017;
        Mishkin & Matas 2016; Zhang et al. 2019 (Fixup); Wang et al. 2022 (DeepNet).

    Example:
        >>> import torch, torch.nn as nn, gradguard as gg
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> rep = gg.init_model(net, "auto")
        >>> rep.entries[0].action
        'He for relu (kaiming_normal_, fan_in)'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_choice(scheme, "scheme", SCHEMES)
    _check_choice(residual, "residual", ("auto", None, "none", *RESIDUAL_SCALINGS))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if residual == "none":
        residual = None
    if data is None and scheme == "lsuv":
        raise ValueError("scheme='lsuv' is data-driven: pass data=<an example batch>")
    if data is None and residual in RESIDUAL_SCALINGS:
        raise ValueError(
            f"residual={residual!r} needs data=<an example batch> to locate the residual "
            "branches")

    gen = torch.Generator().manual_seed(seed)
    report = InitReport(scheme, None, data is not None)
    batch = as_batches(data, 1, name="data")[0] if data is not None else None
    recs, residuals = _structure(model, batch, scheme, seed, report)
    if residual == "auto":
        residual = "gpt2" if scheme == "auto" and residuals else None
    report.residual = residual
    report.n_residual_branches = len(residuals)
    planner = Planner(recs, scheme, gen, entries=report.entries, notes=report.notes,
                      residual=residual, data_driven=batch is not None)
    if residual is not None:
        _plan_residual(planner, residuals, residual, report)
    _apply(model, planner, batch, seed, report)
    _report_unhandled(model, report, strict)
    if scheme == "lsuv":
        _lsuv_backward_check(model, data, seed, report)
    return report


def _structure(model: nn.Module, batch: tuple[tuple, dict] | None, scheme: str, seed: int,
               report: InitReport) -> tuple[list[Rec], list[Residual]]:
    """The records to initialise and the residual branches: traced on ``batch``, or in
    registration order without one (no residual branches then)."""
    if batch is not None:
        tracer = Tracer(model)
        with isolated(model, train=True, seed=seed), torch.no_grad(), tracer:
            _run(tracer, model, batch)
        tracer.branch_members()
        return tracer.recs, tracer.residuals
    recs = static_records(model)
    if scheme == "auto" and not any(r.kind == "act" for r in recs) and any(
        r.kind == "param" for r in recs[1:]
    ):
        report.notes.append(
            "no activation modules found in registration order: activations called as "
            "functions (F.relu) are only seen with data=<a batch>")
    return recs, []


def _apply(model: nn.Module, planner: Planner, batch: tuple[tuple, dict] | None, seed: int,
           report: InitReport) -> None:
    """Initialise every record (layer by layer on a second pass over ``batch`` for the
    data-driven schemes), then the modules the batch never reached, statically."""
    recs = planner.recs
    if batch is not None and planner.scheme in ("auto", "lsuv"):
        tracer = InitTracer(model, planner, [r.name for r in recs])
        with isolated(model, train=True, seed=seed), torch.no_grad(), tracer:
            _run(tracer, model, batch)
    for rec in recs:
        planner.init_record(rec, None)
    srecs = static_records(model)
    leftovers = [r for r in srecs
                 if r.kind in ("param", "norm") and id(r.module) not in planner.done_modules]
    if not leftovers:
        return
    if batch is not None:
        report.notes.append(
            "not reached by the batch, initialised statically: "
            + ", ".join(r.name for r in leftovers))
    static = Planner(srecs, planner.scheme, planner.gen, entries=report.entries,
                     notes=report.notes, residual=planner.residual, data_driven=False)
    static.done_modules = planner.done_modules
    static.done_params = planner.done_params
    for r in leftovers:
        static.init_record(static.recs[r.index], None)


def _lsuv_backward_check(model: nn.Module, data: Any, seed: int, report: InitReport) -> None:
    """LSUV normalises the forward pass only: measure the gradients with the probe's own
    measurement and rule (its defaults), and warn when they still explode or vanish."""
    after = judge(measure(model, as_batches(data, 1, name="data"), seed=seed), model,
                  DEFAULT_TOLERANCE)
    report.backward_check = {"verdict": after.verdict, "backward_gain": after.backward_gain}
    if after.verdict != "healthy":
        msg = (f"init_model('lsuv'): the forward pass is normalised but gradients are "
               f"{after.verdict} (accumulated backward gain {after.backward_gain:.3g}); "
               "use scheme='auto'")
        report.notes.append(msg)
        warnings.warn(msg, stacklevel=3)


def _run(tracer: Tracer, model: nn.Module, batch: tuple[tuple, dict]) -> Any:
    """One traced forward pass on copies of the batch's tensors."""
    args, kwargs = batch
    args = tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args)
    kwargs = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
    for t in tensors_in(args) + tensors_in(kwargs):
        tracer.add_input(t)
    return model(*args, **kwargs)


def _plan_residual(planner: Planner, residuals: list[Residual], kind: str,
                   report: InitReport) -> None:
    usable = [r for r in residuals if r.out_layer is not None]
    for r in residuals:
        if r.out_layer is None:
            report.notes.append(
                "a residual branch does not end in a known layer (or ends in a functional "
                "normalisation): not scaled")
    b = len(usable)
    if b == 0:
        report.notes.append(f"residual={kind!r}: no scalable residual branch found")
        return
    if kind == "gpt2":
        f = 1.0 / math.sqrt(b)
        for r in usable:
            planner.scale[r.out_layer] = (f, f"gpt2: 1/sqrt({b} branches)")  # type: ignore[index]
            if _pre_norm(planner, r) and planner.data_driven:
                planner.stream_scale[r.out_layer] = (r.skip_node, b)  # type: ignore[index]
    elif kind == "fixup":
        for r in usable:
            planner.scale[r.out_layer] = (0.0, "fixup: last layer of the branch zeroed")  # type: ignore[index]
            m = len(r.members)
            if m >= 2:
                f = b ** (-1.0 / (2 * m - 2))
                for i in r.members:
                    if i != r.out_layer:
                        planner.member_scale[i] = (f, f"fixup: {b}^(-1/{2 * m - 2})")
    else:  # deepnorm
        n = max(1.0, b / 2)
        beta = (8 * n) ** -0.25
        for r in usable:
            planner.scale[r.out_layer] = (beta, f"deepnorm: beta=(8N)^-1/4, N={n:g}")  # type: ignore[index]
            for i in r.members:
                mod = planner.recs[i].module
                if i != r.out_layer and mod is not None and (
                    isinstance(mod, CONV) or linear_layout(mod) is not None
                ):
                    planner.member_scale[i] = (beta, "deepnorm beta")
        report.notes.append(
            f"deepnorm also needs the residual written as x * alpha + f(x) with alpha = "
            f"(2N)^(1/4) = {(2 * n) ** 0.25:.3g} (Post-LN); init_model cannot change forward()")


def _pre_norm(planner: Planner, r: Residual) -> bool:
    """A Pre-LN branch: it normalises its input, and the stream it adds to is not
    normalised (so the stream keeps the embedding's scale)."""
    return not r.skip_normed and any(planner.recs[i].normed_input for i in r.members)


def _report_unhandled(model: nn.Module, report: InitReport, strict: bool) -> None:
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, ATOMIC):
            inside.append(name)
            continue
        own = [pn for pn, _ in m.named_parameters(recurse=False)]
        if not own or has_rule(m):
            continue
        label = name or "<root>"
        report.unhandled.append(
            (label, f"{type(m).__name__} holds parameters {own} that no rule covers; "
                    "they keep their current values"))
    if report.unhandled:
        msg = "init_model left these modules as they were: " + "; ".join(
            f"{n} ({t.split(' holds')[0]})" for n, t in report.unhandled)
        if strict:
            raise TypeError(msg)
        warnings.warn(msg, stacklevel=3)
