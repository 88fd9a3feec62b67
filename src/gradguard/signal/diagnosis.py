"""Why a verdict: named causes, notes and the recommendation, from the measured layers.

A cause is recognised from measurements, never assumed: torch's default init under ReLU
(weight variance 1/(3 fan_in), He/6), ReLU weights off the He gain, finite width at He init
(Hanin 2018), chaotic or ordered tanh (``chi_1`` above or below 1), sigmoid's saturation
and mean shift, activations whose variance map has no stable fixed point (GELU, SiLU,
Mish), unscaled residual growth, recurrent modules that attenuate their input gradient,
recurrent gates initialised as one fused orthogonal matrix, LSTM forget-gate bias near 0
(Jozefowicz et al. 2015), one layer out of scale. A healthy verdict gets no cause.

References:
    He et al. 2015. Poole et al. 2016. Schoenholz et al. 2017. Pennington, Schoenholz,
    Ganguli 2017. Hanin 2018, "Which neural net architectures give rise to exploding and
    vanishing gradients?". Jozefowicz et al. 2015, "An empirical exploration of recurrent
    network architectures".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradguard.signal.activations import (
    RELU_FAMILY,
    derivative_at_zero,
    is_unstable,
    moments,
    variance_map_slope,
)
from gradguard.signal.measure import LayerStats
from gradguard.signal.tracing import Rec, Residual
from gradguard.signal.verdict import Judgement

__all__ = ["RNN_TYPES", "Cause", "Diagnosis", "diagnose", "fmt_gain", "fmt_percent"]

RNN_TYPES = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")


@dataclass
class Cause:
    """A recognised reason for a verdict: a short code, a title and the measured detail."""

    code: str
    title: str
    detail: str


@dataclass
class Diagnosis:
    """Causes (most specific first), notes, the recommendation and the fix plan (the
    :func:`gradguard.init_model` arguments ``report.fix`` uses)."""

    causes: list[Cause] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recommendation: str = ""
    fix_plan: dict[str, Any] = field(default_factory=lambda: {"scheme": "auto",
                                                              "residual": "auto"})


def fmt_gain(v: float | None) -> str:
    """A gain for reports: 3 significant digits, scientific notation far from 1."""
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


def fmt_percent(v: float | None) -> str:
    """A fraction as a whole percentage (``-`` for None)."""
    return "-" if v is None else f"{100 * v:.0f}%"


def _median(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _spread_text(params: list[LayerStats]) -> str:
    last = [lay.spread for lay in params[:-1] if lay.spread is not None]
    if last and last[-1] < 1e-3:
        return (f"; but only {fmt_gain(last[-1])} of the last hidden layer's second moment "
                "varies across the batch: every input is mapped to the same vector")
    return ""


def _fragile(layers: list[LayerStats], tolerance: float) -> list[str]:
    """Notes on activations whose variance map is unstable when the depth amplifies drift."""
    notes = []
    for act in sorted({lay.act for lay in layers if lay.kind == "act" and lay.act}):
        if act in RELU_FAMILY or not is_unstable(act, None):
            continue
        n = sum(1 for lay in layers if lay.act == act)
        slope = variance_map_slope(act, None)
        if slope ** n > tolerance:
            notes.append(
                f"{n} {act} layers: the variance map's fixed point is unstable (slope "
                f"{slope:.3g} per layer at q=1, {slope:.3g}^{n} = {fmt_gain(slope ** n)}), so "
                "even a balanced initialisation is an unstable equilibrium that training "
                "leaves within a few steps; at this depth prefer normalisation (LayerNorm) or "
                "residual connections")
    return notes


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
                if float((gram - eye).norm()) < 0.05 * math.sqrt(gram.shape[0]):
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


def _rate_text(j: Judgement) -> str:
    return f"{j.rate:.3g}" if j.rate else "?"


def _residual_causes(j: Judgement, residuals: list[Residual]) -> list[Cause]:
    n_res = len([r for r in residuals if r.out_layer is not None])
    if n_res < 2 or j.verdict != "exploding":
        return []
    per = (max(j.backward_gain, j.forward_gain)) ** (1 / n_res)
    return [Cause(
        "residual_growth", "residual growth with depth",
        f"{n_res} residual branches each add their variance to the stream, unscaled: the "
        f"signal grows x{per:.3g} per branch (gradient gain {fmt_gain(j.backward_gain)}, "
        f"forward {fmt_gain(j.forward_gain)}). Scale the last layer of each branch by "
        f"1/sqrt({n_res}) (GPT-2) or zero it (Fixup)")]


def _relu_causes(j: Judgement, params: list[LayerStats],
                 acts: list[LayerStats]) -> list[Cause]:
    """Causes for networks mostly made of layers followed by ReLU."""
    relu_layers = [lay for lay in params if lay.follow in RELU_FAMILY and lay.weight_gain]
    if not relu_layers or len(relu_layers) * 2 < len(params):
        return []
    causes = []
    g, rate_s = j.backward_gain, _rate_text(j)
    gains = [lay.weight_gain for lay in relu_layers if lay.weight_gain]
    var = statistics.median(x * x for x in gains)
    ratio = math.sqrt(var) / math.sqrt(2.0)
    n = len(relu_layers)
    types = sorted({lay.type for lay in relu_layers})
    if j.verdict == "vanishing" and 0.25 <= var <= 0.42:
        fwd_rms = statistics.median(lay.rms for lay in relu_layers[-3:])
        causes.append(Cause(
            "default_init_relu", "default-init ReLU vanishing",
            f"{n} {'/'.join(types)} layers followed by ReLU have weight variance "
            f"{var:.3g}/fan_in: torch's default (kaiming_uniform_ with a=sqrt(5), "
            f"1/(3 fan_in)), i.e. He/6. Each layer multiplies the gradient by sqrt(1/6) "
            f"= 0.41 (measured x{rate_s} per layer, x{fmt_gain(g)} in total). The default "
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
    return causes


def _unstable_cause(j: Judgement, act: str, sg: float | None,
                    act_layers: list[LayerStats]) -> Cause:
    first = act_layers[0].rms_in or act_layers[0].rms
    last = act_layers[-1].rms_in or act_layers[-1].rms
    slope = variance_map_slope(act, None)
    d0 = derivative_at_zero(act, None)
    where = "contracts to 0" if last < first else "runs away"
    return Cause(
        "no_stable_fixed_point", f"{act.upper()} without a stable fixed point",
        f"with zero bias the variance map q -> g^2 E[{act}(sqrt(q) z)^2] has no stable "
        f"fixed point (slope {slope:.3g} > 1 at its fixed point; ReLU's is neutral). "
        f"At weight gain {sg:.3g} the pre-activation RMS {where}: {fmt_gain(first)} -> "
        f"{fmt_gain(last)} over {len(act_layers)} layers"
        + (f"; near 0 {act} is linear with slope {d0:.2g}, so each layer multiplies "
           f"gradients by {sg * d0:.3g}" if where == "contracts to 0" and sg else "")
        + f" (measured x{_rate_text(j)} per layer)")


def _activation_cause(j: Judgement, act: str, params: list[LayerStats],
                      acts: list[LayerStats]) -> Cause | None:
    """The cause for layers fed by the smooth activation ``act``, if one fits."""
    fed = [lay for lay in params if lay.feed == act and lay.chi is not None]
    chi = _median([lay.chi for lay in fed])  # type: ignore[misc]
    sg = _median([lay.weight_gain for lay in fed])  # type: ignore[misc]
    sat = _median([lay.saturated for lay in acts if lay.act == act])  # type: ignore[misc]
    act_layers = [lay for lay in acts if lay.act == act]
    rate_s = _rate_text(j)
    if act in ("tanh", "hardtanh") and j.verdict == "exploding" and chi and chi > 1:
        return Cause(
            "chaotic_tanh", "chaotic tanh",
            f"{len(fed)} layers feed on tanh with weight gain {sg:.3g}: chi_1 = "
            f"sigma_w^2 E[tanh'(h)^2] = {chi:.3g} > 1, the chaotic phase (Poole et al. "
            f"2016): gradients grow x{rate_s} per layer, x{fmt_gain(j.backward_gain)} in "
            "total. The edge of chaos (chi_1 = 1) is reached with orthogonal weights and "
            "gain -> 1")
    if act in ("sigmoid", "hardsigmoid") and j.verdict == "vanishing":
        mean = _median([lay.mean for lay in act_layers]) or 0.5
        return Cause(
            "sigmoid", "sigmoid saturation and mean shift",
            f"sigmoid'(x) <= 1/4 and its outputs have mean {mean:.2f}: with weight gain "
            f"{sg:.3g}, chi_1 = {chi:.3g} and gradients shrink x{rate_s} per layer "
            f"({100 * (sat or 0):.0f}% saturated). Sigmoid = 1/2 + tanh(x/2)/2: remove "
            "the mean with the next bias and use gain ~4 to get the critical tanh network")
    if act in ("tanh", "hardtanh") and j.verdict == "vanishing":
        return Cause(
            "ordered_tanh", "tanh in the ordered phase",
            f"chi_1 = {chi:.3g} < 1 at weight gain {sg:.3g} ({100 * (sat or 0):.0f}% "
            "saturated): gradients shrink every layer")
    if is_unstable(act, None):
        return _unstable_cause(j, act, sg, act_layers)
    if chi is not None and chi > 1 and j.verdict == "exploding":
        m2, _, d2 = moments(act, None, 1.0)
        return Cause(
            f"chaotic_{act}", f"chaotic {act}",
            f"chi_1 = sigma_w^2 E[{act}'(h)^2] = {chi:.3g} > 1 at weight gain {sg:.3g}: "
            f"gradients grow x{rate_s} per layer (at the variance-preserving gain "
            f"{1 / math.sqrt(m2):.3g}, chi_1 = {d2 / m2:.3g})")
    if chi is not None and chi < 1 and j.verdict == "vanishing":
        return Cause(
            f"ordered_{act}", f"{act} in the ordered phase",
            f"chi_1 = {chi:.3g} < 1 at weight gain {sg:.3g}: gradients shrink "
            f"x{rate_s} per layer")
    return None


def _activation_causes(j: Judgement, params: list[LayerStats], acts: list[LayerStats],
                       causes: list[Cause]) -> None:
    """Append a cause per smooth activation feeding parametrised layers."""
    for act in sorted({lay.act for lay in acts if lay.act is not None}):
        fed = [lay for lay in params if lay.feed == act and lay.chi is not None]
        if act in RELU_FAMILY or not fed or (causes and causes[-1].code.startswith(act)):
            continue
        cause = _activation_cause(j, act, params, acts)
        if cause is not None:
            causes.append(cause)


def _recurrent_causes(j: Judgement, params: list[LayerStats], recs: list[Rec]) -> list[Cause]:
    causes = []
    recurrent = [lay for lay in params if lay.type in RNN_TYPES and lay.bwd_gain is not None]
    for lay in recurrent:
        if abs(math.log(max(lay.bwd_gain, 1e-300))) > 0.5 * math.log(j.tolerance):
            mod = next((r.module for r in recs if r.index == lay.index), None)
            gains = _rnn_weight_gains(mod) if mod is not None else ""
            causes.append(Cause(
                "recurrent_gain", f"{lay.type} attenuates the gradient to its input",
                f"{lay.name} alone multiplies the gradient by {fmt_gain(lay.bwd_gain)} from "
                f"its output to its input ({gains}; torch's default U(+-1/sqrt(H)) is gain "
                "0.58 and the gates' derivatives are <= 1/4)"))
    return causes


def _outlier_cause(j: Judgement, params: list[LayerStats]) -> list[Cause]:
    locals_ = [(lay, math.log(lay.bwd_gain)) for lay in params
               if lay.bwd_gain and lay.bwd_gain > 0 and math.isfinite(lay.bwd_gain)]
    if not locals_:
        return []
    med = statistics.median(v for _, v in locals_)
    worst, lv = max(locals_, key=lambda t: abs(t[1] - med))
    if abs(lv - med) <= 0.5 * abs(math.log(max(j.backward_gain, 1e-300))):
        return []
    return [Cause(
        "outlier_layer", "one layer out of scale",
        f"{worst.name} alone multiplies the gradient by {fmt_gain(worst.bwd_gain)} "
        f"(weight norm {fmt_gain(worst.weight_norm)}; median layer "
        f"{fmt_gain(math.exp(med))})")]


def _time_notes(layers: list[LayerStats], tolerance: float) -> list[str]:
    return [f"{lay.name}: the gradient reaching its first time step is x"
            f"{fmt_gain(lay.time_gain)} of that at its last (memory fades over the sequence; "
            "expected at init for gated RNNs, not counted in the verdict)"
            for lay in layers
            if lay.time_gain is not None and 0 < lay.time_gain < 1 / tolerance and lay.shape]


def diagnose(j: Judgement, layers: list[LayerStats], model: nn.Module, recs: list[Rec],
             residuals: list[Residual]) -> Diagnosis:
    """Name the causes of the verdict ``j`` and recommend a fix.

    Args:
        j: the verdict.
        layers: the measured layers.
        model: the model (recurrent weights and LSTM biases are read from it).
        recs: the trace's records.
        residuals: the residual branches found by the trace.

    Returns:
        A :class:`Diagnosis`; a healthy verdict gets no cause and "nothing to fix".
    """
    d = Diagnosis()
    params = [lay for lay in layers if lay.kind == "param"]
    acts = [lay for lay in layers if lay.kind == "act"]
    rnn = _rnn_findings(model)
    d.notes += _fragile(layers, j.tolerance) + _time_notes(layers, j.tolerance)
    if j.verdict == "healthy":
        d.notes += [f"{c.title}: {c.detail}" for c in rnn]
        d.recommendation = (
            f"nothing to fix: gradients and activations stay within x{j.tolerance:g} over "
            "the depth (not a gradient problem)")
        return d
    causes: list[Cause] = []
    if j.nonfinite:
        causes.append(Cause("nonfinite", "non-finite values",
                            f"first at {j.nonfinite[0].name} (overflow of an exploding signal)"))
    causes += _residual_causes(j, residuals)
    if not causes:
        causes += _relu_causes(j, params, acts)
    _activation_causes(j, params, acts, causes)
    causes += _recurrent_causes(j, params, recs)
    causes += [c for c in rnn if c.code == "fused_gates"]
    d.notes += [f"{c.title}: {c.detail}" for c in rnn if c.code != "fused_gates"]
    if not causes:
        causes += _outlier_cause(j, params)
    if not causes:
        causes.append(Cause(
            "unrecognised", "no known pattern",
            f"the gradient gain reaches {fmt_gain(j.backward_gain)} ({j.direction}), "
            f"x{_rate_text(j)} per parametrised layer; see the table for where it changes"))
    d.causes = causes
    if any(c.code == "residual_growth" for c in causes):
        d.fix_plan = {"scheme": "auto", "residual": "gpt2"}
    d.recommendation = recommend(layers, d.fix_plan, len(residuals))
    if {c.code for c in causes} <= {"depth_over_width", "dead_relu"}:
        d.recommendation = (
            "the weights already have the He gain, so initialisation cannot do better: the "
            "loss comes from finite width at this depth. Widen the layers, add residual "
            "connections or normalisation (report.fix would only redraw He weights)")
    return d


def _recommendation_key(lay: LayerStats) -> str | None:
    """What :func:`gradguard.init_model` does to this layer, as one phrase (None: skipped)."""
    if lay.kind != "param" or lay.type in ("Embedding", "EmbeddingBag"):
        return None
    if lay.type in RNN_TYPES:
        return f"{lay.type}: per-gate orthogonal recurrent blocks (gain 1)" + (
            ", forget-gate bias 1" if "LSTM" in lay.type else "")
    if lay.type == "MultiheadAttention":
        return "MultiheadAttention: Xavier per q/k/v block"
    if lay.follow in RELU_FAMILY or (lay.follow is None and lay.feed in RELU_FAMILY):
        return (f"{lay.type} next to {lay.follow or lay.feed}: He (kaiming_normal_, "
                "fan_in, gain sqrt 2), zero bias")
    if lay.feed is not None and is_unstable(lay.feed, None):
        return (f"{lay.type} after {lay.feed}: orthogonal, variance-preserving gain "
                f"{1 / math.sqrt(moments(lay.feed, None, 1.0)[0]):.4g}, pre-activation "
                "second moment pinned to 1 on the batch")
    if lay.feed in ("sigmoid", "hardsigmoid"):
        return (f"{lay.type} after sigmoid: orthogonal, critical gain (~4) and a bias that "
                "removes the mean 1/2")
    if lay.feed is not None:
        return (f"{lay.type} after {lay.feed}: orthogonal, critical gain (chi_1 = 1"
                + (", -> 1 with depth" if lay.feed == "tanh" else "") + ")")
    return (f"{lay.type} with no activation before it: LeCun (unit pre-activation "
            "variance on data or a normalised input, gain 1 otherwise)")


def recommend(layers: list[LayerStats], fix_plan: dict[str, Any], n_res: int) -> str:
    """The recommendation text: what the fix re-initialises, grouped by rule."""
    groups: dict[str, int] = {}
    for lay in layers:
        key = _recommendation_key(lay)
        if key is not None:
            groups[key] = groups.get(key, 0) + 1
    parts = [f"{n} x {k}" for k, n in groups.items()]
    res = ""
    if fix_plan.get("residual") == "gpt2" or (n_res and fix_plan.get("residual") == "auto"):
        res = (f"; multiply the last layer of each of the {n_res} residual branches by "
               f"1/sqrt({n_res}) (GPT-2)")
    call = "gg.init_model(model, 'auto', data=batch" + (
        ", residual='gpt2')" if fix_plan.get("residual") == "gpt2" else ")")
    return ("re-initialise " + "; ".join(parts) + res + f": `{call}`, or `report.fix(model)`, "
            "which applies it and probes again")
