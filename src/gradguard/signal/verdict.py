"""The verdict rule: from the measured layers to healthy, exploding or vanishing.

Mean-field theory (Poole et al. 2016; Schoenholz et al. 2017) gives the squared gradient
norm a per-layer multiplier ``chi_1``: over ``l`` layers it changes by ``chi_1^l =
exp(-l / xi)``, with depth scale ``xi = -1 / ln chi_1``. Schoenholz et al. find random
networks trainable to a depth of about ``6 xi_c`` (the correlation depth scale, equal to
the gradient's ``xi`` in the ordered phase), i.e. while the squared signal changes by at
most ``e^6``. Applied to gradients: the gradient *norm* may change by at most ``e^3 = 20``
over the depth. The probe measures the accumulated gain directly, so the rule needs no
model of the architecture:

* ``exploding`` if the gradient norm at the output of some parametrised layer (where
  weight gradients form) exceeds ``tolerance`` (20) times the norm at the model output;
  ``vanishing`` if it falls below ``1/tolerance``. The forward RMS along the main path,
  relative to the first parametrised layer, is judged the same way ("both" when it agrees,
  "forward" alone when only it fails).
* A model with residual branches is judged along its **residual stream**: the gradient
  at every residual addition (the skip going in, the sum coming out), relative to the
  gradient at the stream's end, and the stream's RMS relative to its start. Depth lives in
  the stream; the embedding or stem before it and the head after it are one layer each and
  only scale it by a constant (a tied 50k-word GPT-2 head multiplies the gradient by ~5,
  its final LayerNorm by 1/RMS of a stream of std 0.02), so they are not judged. Nor is the
  inside of a branch relative to its own last layer: Transformers built with small weights
  (std 0.02) pass their branches little gradient by design while the stream stays flat;
  a note says so when that ratio leaves the band.
* Otherwise ``healthy``. Signals blocked by deliberately zero-initialised weights (Fixup,
  ReZero, a zero head) are "gated", not vanishing. A recurrent module is exploding "through
  time" when, from a cotangent on its last output step, its input gradient is more than
  ``tolerance`` times larger at the first step than at the last and still growing over the
  far half of the sequence (more than sqrt(tolerance)): a build-up over the last steps
  that then stays flat (a stacked LSTM keeping its memory) is not an explosion. Fading
  memory is a note only (gated RNNs forget at init).

The "layer where it starts" (``onset``) is the first layer, in the direction of
propagation (from the output for gradients), after which the accumulated gain stays more
than 2x away from 1 on the failing side.

References:
    Poole et al. 2016, "Exponential expressivity in deep neural networks through transient
    chaos". Schoenholz et al. 2017, "Deep information propagation". Pascanu, Mikolov,
    Bengio 2013, "On the difficulty of training recurrent neural networks".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from gradguard.signal.measure import LayerStats, Measurement

__all__ = ["DEFAULT_TOLERANCE", "VERDICTS", "Judgement", "judge", "zero_initialised"]

VERDICTS = ("healthy", "exploding", "vanishing")
DEFAULT_TOLERANCE = 20.0  # e^3: six mean-field depth scales of the squared signal

Series = list[tuple[str, float]]  # (where, accumulated gain) in propagation order


@dataclass
class Judgement:
    """The verdict on a :class:`gradguard.signal.measure.Measurement`.

    Attributes:
        verdict: ``"healthy"``, ``"exploding"`` or ``"vanishing"``.
        direction: ``"backward"``, ``"forward"``, ``"both"``, ``"time"`` or None.
        onset: name (and type) of the layer where the failure starts.
        backward_gain: extreme accumulated gradient gain.
        forward_gain: extreme accumulated forward RMS gain.
        rate: per-layer gain over the failing stretch (geometric mean), or None.
        tolerance: the band factor.
        notes: findings of the rule (zero-initialised weights, where the failure is).
        nonfinite: layers with a non-finite output or weight gradient.
        along_stream: judged along a residual stream (gains per residual branch).
    """

    verdict: str
    direction: str | None
    onset: str | None
    backward_gain: float
    forward_gain: float
    rate: float | None
    tolerance: float
    notes: list[str] = field(default_factory=list)
    nonfinite: list[LayerStats] = field(default_factory=list)
    along_stream: bool = False


def zero_initialised(model: nn.Module) -> list[str]:
    """Names of the non-bias parameters that are all zero (Fixup, ReZero, zero heads)."""
    return [n for n, p in model.named_parameters()
            if not n.endswith("bias") and p.numel() and not bool(p.detach().any())]


def series_verdict(series: Series, lt: float) -> tuple[str, int | None]:
    """``(verdict, position of the extreme)`` for gains in propagation order; ``lt`` is
    the log of the tolerance."""
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


def onset_position(series: Series, pos: int, verdict: str) -> int:
    """First position (propagation order) after which the gain stays > 2x on the bad side."""
    def bad(g: float) -> bool:
        return g > 2.0 if verdict == "exploding" else g < 0.5

    i = pos
    while i > 0 and bad(series[i - 1][1]):
        i -= 1
    return i


def _mark_layers(m: Measurement, model: nn.Module, branch: dict[int, int], internal: set[int],
                 notes: list[str]) -> None:
    """Flag gated layers (blocked by zero weights) and residual-branch membership."""
    layers = m.layers
    zero = zero_initialised(model)
    for lay in layers:
        if zero and (lay.rms == 0 or lay.bwd_cum == 0):
            lay.gated = True
        if lay.index in internal:
            lay.branch = "internal"
        elif lay.index in branch:
            lay.branch = "branch"
    if m.head_zero is not None:
        layers[m.head_zero].bwd_gain = 0.0
        notes.append(f"{layers[m.head_zero].name} is zero-initialised: the cotangent is "
                     "injected at its input, so gains upstream are measured as if it passed "
                     "gradients through")
    if zero:
        notes.append(f"zero-initialised weights ({', '.join(zero[:4])}"
                     f"{', ...' if len(zero) > 4 else ''}): signals they block are 'gated', "
                     "not vanishing")


def _label(lay: LayerStats) -> str:
    return f"{lay.name} ({lay.type})"


def _classic_series(m: Measurement, internal: set[int], branch: dict[int, int],
                    all_records: bool) -> tuple[Series, Series]:
    """``(backward, forward)`` for a model without residual stream: parametrised outputs
    relative to the model output, main-path RMS relative to the first layer."""
    layers = m.layers

    def counted(lay: LayerStats) -> bool:
        return (all_records or lay.kind == "param") and not lay.gated

    # gradients: where weight gradients form (parametrised outputs), from the output back
    bwd = [(_label(lay), lay.bwd_cum) for lay in reversed(layers)
           if counted(lay) and lay.bwd_cum is not None and lay.index not in internal]
    # activations: along the main path (outputs of branches are not the stream)
    main = [lay for lay in layers if (all_records or lay.kind in ("param", "norm"))
            and not lay.gated and lay.index not in branch and math.isfinite(lay.rms)]
    ref = next((lay for lay in main if lay.rms > 0), None)
    fwd: Series = []
    for lay in main:
        if ref is not None and lay.index >= ref.index:
            fwd.append((_label(lay), lay.rms / ref.rms))
    return bwd, fwd  # type: ignore[return-value]


def _stream_series(m: Measurement, branch: dict[int, int]) -> tuple[Series, Series] | None:
    """``(backward, forward)`` along the residual stream: its gradient at every residual
    addition (and at main-path parametrised layers between the first and the last) relative
    to the gradient at the stream's end, its RMS relative to the stream's start. The
    embedding or stem before the stream and the head after it are one layer each, not
    depth: they scale the stream's gradient by a constant and are not judged. None if the
    stream's end has no gradient."""
    points = [p for p in m.stream if p.bwd_cum is not None and math.isfinite(p.rms)]
    if len(points) < 2 or not points[-1].bwd_cum or points[0].rms <= 0:
        return None
    g_end, rms_start = points[-1].bwd_cum, points[0].rms
    first, last = points[0].order, points[-1].order
    entries: list[tuple[float, str, float]] = [
        (p.order + 0.5 * (p.role == "sum"), f"{p.name} (after {p.after})", p.bwd_cum / g_end)
        for p in points]
    entries += [(lay.index + 0.75, _label(lay), lay.bwd_cum / g_end) for lay in m.layers
                if lay.kind == "param" and not lay.gated and lay.index not in branch
                and lay.bwd_cum is not None and first <= lay.index < last]
    bwd = [(label, g) for _, label, g in sorted(entries, key=lambda e: -e[0])]
    fwd = [(f"{p.name} (after {p.after})", p.rms / rms_start) for p in points]
    return bwd, fwd


def _inner_note(m: Measurement, branch: dict[int, int], internal: set[int],
                lt: float) -> str | None:
    """A note when the gradient inside residual branches, relative to the branch's end,
    leaves the band: small-init branches (std 0.02 weights) are built that way."""
    layers, residuals = m.layers, m.tracer.residuals
    inner = []
    for lay in layers:
        if lay.index in internal and lay.kind == "param" and not lay.gated and lay.bwd_cum:
            out = residuals[branch[lay.index]].out_layer
            ref_g = layers[out].bwd_cum if out is not None else None
            if ref_g:
                inner.append((lay, lay.bwd_cum / ref_g))
    if not inner:
        return None
    lay, g = min(inner, key=lambda t: t[1]) if min(v for _, v in inner) < 1 else max(
        inner, key=lambda t: t[1])
    if abs(math.log(g)) <= lt:
        return None
    return (f"inside residual branches the gradient reaches x{g:.2g} of the stream's at the "
            f"branch's end ({lay.name}): branches with small weights pass little gradient to "
            "their own first layers by design, so the verdict follows the residual stream, "
            "not the inside of each branch")


def _set_forward_cum(layers: list[LayerStats], branch: dict[int, int],
                     all_records: bool) -> None:
    """Each layer's output RMS relative to the first main-path layer (for the table)."""
    main = [lay for lay in layers if (all_records or lay.kind in ("param", "norm"))
            and not lay.gated and lay.index not in branch and math.isfinite(lay.rms)]
    ref = next((lay for lay in main if lay.rms > 0), None)
    for lay in layers:
        if ref is not None and lay.index >= ref.index and lay.rms_in:
            lay.fwd_cum = lay.rms / ref.rms


def _rate(series: Series, pos: int) -> float | None:
    """Geometric mean gain per step up to ``pos`` (up to the last positive gain when later
    ones underflowed)."""
    positive = [k for k in range(pos + 1) if series[k][1] > 0]
    pos_r = positive[-1] if positive else pos
    g_ext = series[pos_r][1]
    # steps from the start of the series (the output itself when it has gain 1)
    n_steps = pos_r + (0 if abs(series[0][1] - 1.0) < 1e-6 else 1)
    if n_steps > 0 and g_ext > 0 and math.isfinite(g_ext):
        return g_ext ** (1.0 / n_steps)
    return None


def _grows_through_time(lay: LayerStats, tolerance: float) -> bool:
    """Exploding through time: the gradient from the last output step is more than
    ``tolerance`` times larger at the first input step than at the last, and still growing
    over the far half of the sequence (by more than sqrt(tolerance)). A gradient that builds
    up over the last steps and then stays flat (a stacked LSTM whose forget gates keep its
    memory) is not exploding."""
    if lay.time_gain is None or lay.time_gain <= tolerance:
        return False
    return lay.time_gain_far is None or lay.time_gain_far > math.sqrt(tolerance)


def judge(m: Measurement, model: nn.Module, tolerance: float,
          all_records: bool = False) -> Judgement:
    """Apply the verdict rule (module docstring) to a measurement.

    Marks the layers in place (``gated``, ``branch``, ``fwd_cum``; a zero head's
    ``bwd_gain``).

    Args:
        m: the measurement.
        model: the measured model (its zero-initialised weights gate signals).
        tolerance: the band factor (> 1).
        all_records: judge every record (``modules=`` given), not only parametrised ones.

    Returns:
        A :class:`Judgement`.
    """
    lt = math.log(tolerance)
    notes: list[str] = []
    branch, internal = m.tracer.branch_records()
    _mark_layers(m, model, branch, internal, notes)
    layers = m.layers
    _set_forward_cum(layers, branch, all_records)
    stream = None if all_records else _stream_series(m, branch)
    if stream is not None:
        bwd, fwd = stream
        note = _inner_note(m, branch, internal, lt)
        if note:
            notes.append(note)
    else:
        bwd, fwd = _classic_series(m, internal, branch, all_records)
    bv, bpos = series_verdict(bwd, lt)
    fv, fpos = series_verdict(fwd, lt)
    nonfinite = [lay for lay in layers if not math.isfinite(lay.rms) or (
        lay.grad_norm is not None and not math.isfinite(lay.grad_norm))]
    time_bad = [lay for lay in layers if _grows_through_time(lay, tolerance)]

    verdict, direction, series, pos = "healthy", None, bwd, bpos
    if bv != "healthy":
        verdict, direction = bv, ("both" if fv == bv else "backward")
    elif fv != "healthy":
        verdict, direction, series, pos = fv, "forward", fwd, fpos
    elif time_bad:
        verdict, direction = "exploding", "time"
    if nonfinite and verdict == "healthy":
        verdict, direction = "exploding", "forward"
    g_b = bwd[bpos][1] if bpos is not None else 1.0
    g_f = fwd[fpos][1] if fpos is not None else 1.0
    onset = rate = None
    if verdict != "healthy" and direction != "time" and pos is not None and series:
        onset = series[onset_position(series, pos, verdict)][0]
        rate = _rate(series, pos)
    elif direction == "time":
        onset = _label(time_bad[0])
    return Judgement(verdict, direction, onset, g_b, g_f, rate, tolerance, notes, nonfinite,
                     along_stream=stream is not None)
