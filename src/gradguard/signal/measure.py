"""The measurement behind the probe: one forward and one backward pass per batch, recorded
per layer.

:class:`ProbeTracer` extends :class:`gradguard.signal.tracing.Tracer` with forward
statistics (RMS, mean, saturated and dead fractions, spread across the batch) and gradient
taps on every record's inputs and outputs. :func:`measure` runs the batches inside
:func:`gradguard.signal.inputs.isolated` (no side effect on the model), backpropagates a
random unit output cotangent drawn from a private generator (or ``loss_fn``'s gradient) with
``torch.autograd.grad``, takes all norms from the norm engine in one call, and averages the
batches into one :class:`LayerStats` per record.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.engine.norms import tensor_norms
from gradguard.signal.activations import RELU_FAMILY
from gradguard.signal.inputs import isolated, output_tensors, tensors_in
from gradguard.signal.modules import CONV, fan_in, is_understood, linear_layout
from gradguard.signal.tracing import Rec, Residual, Tracer

__all__ = ["LayerStats", "Measurement", "ProbeTracer", "StreamPoint", "measure"]

SMOOTH_SATURATING = {"tanh": 0.964, "hardtanh": 1.0}  # |y| beyond this: tanh'(z) < 0.07


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

    Recurrent modules: from a random cotangent on the *last* output step alone,
    ``time_gain`` = |grad wrt the first input step| / |grad wrt the last input step| (the
    product of the recurrent Jacobians over the sequence) and ``time_gain_far`` = |grad wrt
    the first step| / |grad wrt the middle step| (the far half alone: growth that goes on,
    not a build-up over the last steps).
    ``known`` is False for a parametrised module no rule understands (an unknown module).
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
    time_gain_far: float | None = None
    feed: str | None = None
    follow: str | None = None
    gated: bool = False
    residual_out: bool = False
    branch: str | None = None
    known: bool = True


@dataclass
class StreamPoint:
    """The residual stream at one residual addition: the skip value going in (``role="skip"``)
    or the sum coming out (``"sum"``), in execution order.

    ``rms`` is the value's RMS, ``bwd_cum`` = |grad wrt the value| / |grad wrt the model
    output|, ``after`` the last record executed before the addition, ``order`` how many
    records ran before it (to place it among the layers).
    """

    index: int
    residual: int
    role: str
    order: int
    after: str
    rms: float
    bwd_cum: float | None

    @property
    def name(self) -> str:
        """``"residual 3 sum"``: the stream after the third residual branch."""
        return f"residual {self.residual + 1} {self.role}"


class ProbeTracer(Tracer):
    """Adds forward statistics and gradient taps to :class:`gradguard.signal.tracing.Tracer`."""

    def __init__(self, model: nn.Module, modules: tuple[type, ...] | None) -> None:
        super().__init__(model, modules)
        self.fwd: dict[int, dict[str, Any]] = {}
        self.out_grads: dict[int, list[Tensor]] = {}
        self.in_grads: dict[int, list[Tensor | None]] = {}
        self.in_clones: dict[int, list[Tensor]] = {}
        self.time_dim: dict[int, int] = {}
        self.rnn_out: dict[int, Tensor] = {}  # an RNN record's output sequence
        self.stream: list[dict[str, Any]] = []  # the residual stream, see StreamPoint
        self.stream_ids: set[int] = set()
        self.tapping = True  # gradient taps record only the main backward pass

    def tap(self, store: list[Tensor]) -> Callable[[Tensor], None]:
        """A gradient hook that appends to ``store`` during the main backward pass."""
        def hook(g: Tensor) -> None:
            if self.tapping:
                store.append(g)

        return hook

    def on_residual(self, residual: Residual, skip: Tensor, out: Tensor) -> None:
        """Record the stream going into and out of a residual addition (each value once)."""
        for role, t in (("skip", skip), ("sum", out)):
            if id(t) in self.stream_ids:
                continue  # the sum of one branch is the skip of the next
            self.stream_ids.add(id(t))
            grads: list[Tensor] = []
            if t.requires_grad:
                t.register_hook(self.tap(grads))
            with torch.no_grad():
                ms = float(t.detach().float().pow(2).mean()) if t.numel() else 0.0
            after = self.recs[residual.order - 1].name if residual.order > 0 else ""
            self.stream.append({"residual": len(self.residuals) - 1, "role": role,
                                "order": residual.order, "after": after, "ms": ms,
                                "grads": grads})

    def tap_inputs(self, rec: Rec, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Replace the floating inputs by clones whose gradients are tapped."""
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

                def keep(g: Tensor, slot: int = slot) -> None:
                    if self.tapping:
                        grads[slot] = g

                c.register_hook(keep)
                memo[id(t)] = c
                clones.append(c)
            return memo[id(t)]

        if isinstance(rec.module, nn.RNNBase):
            self.time_dim[rec.index] = 1 if rec.module.batch_first else 0
        return tuple(sub(a) for a in args), {k: sub(v) for k, v in kwargs.items()}

    def on_output(self, rec: Rec, outs: list[Tensor]) -> None:
        """Tap the output gradients; record forward statistics (and an RNN's output)."""
        grads = self.out_grads.setdefault(rec.index, [])
        for t in outs:
            if t.requires_grad:
                t.register_hook(self.tap(grads))
        if rec.index in self.time_dim and outs and outs[0].requires_grad:
            self.rnn_out[rec.index] = outs[0]
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
        if act in SMOOTH_SATURATING:
            return {"sat": float((y.abs() >= SMOOTH_SATURATING[act]).float().mean())}
        if act in ("sigmoid", "hardsigmoid"):
            return {"sat": float(((y < 0.018) | (y > 0.982)).float().mean())}
        if act in RELU_FAMILY:
            src = self.recs[rec.src].module if rec.src is not None else None
            unit = 1 if (isinstance(src, nn.modules.conv._ConvNd) and y.ndim >= 3) else -1
            inactive = (y <= 0).movedim(unit, -1).reshape(-1, y.shape[unit])
            return {"dead": float(inactive.all(dim=0).float().mean())}
        return {}


@dataclass
class Measurement:
    """What :func:`measure` found: the layers and the residual stream (averaged over the
    batches), the trace of the last batch (records, residual branches) and the
    zero-initialised head, if any."""

    layers: list[LayerStats]
    tracer: ProbeTracer
    head_zero: int | None
    stream: list[StreamPoint] = field(default_factory=list)


def measure(model: nn.Module, batches: list[tuple[tuple, dict]], *,
            loss_fn: Callable[[Any], Tensor] | None = None,
            modules: tuple[type, ...] | None = None, train: bool = True,
            seed: int = 0) -> Measurement:
    """Run every batch forward and backward under a :class:`ProbeTracer`, without side effects.

    Args:
        model: the model.
        batches: ``(args, kwargs)`` calls (:func:`gradguard.signal.inputs.as_batches`).
        loss_fn: ``loss_fn(output) -> scalar`` or None for a random unit output cotangent.
        modules: record instances of these types instead of leaf modules.
        train: run in training mode.
        seed: seed of the cotangents (batch ``b`` uses ``seed + b``) and of dropout.

    Returns:
        A :class:`Measurement`.

    Raises:
        ValueError: the model took different paths on different batches, nothing in the
            output requires grad, or ``loss_fn`` did not return a scalar.
    """
    raws = []
    tracer: ProbeTracer | None = None
    with isolated(model, train=train, seed=seed):
        for b, batch in enumerate(batches):
            tracer = ProbeTracer(model, modules)
            raws.append(_run_batch(model, tracer, batch, loss_fn, seed + b))
    assert tracer is not None
    names = [r.name for r in tracer.recs]
    for raw in raws:
        if raw["names"] != names:
            raise ValueError("the model took different paths on different batches; probe "
                             "them separately (n_batches=1)")
    return Measurement(_assemble(tracer.recs, raws), tracer, raws[0]["head_zero"],
                       _assemble_stream(raws))


def _run_batch(model: nn.Module, tracer: ProbeTracer, batch: tuple[tuple, dict],
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
    inputs = [t for t in tensors_in(args) + tensors_in(kwargs)]
    with torch.enable_grad(), tracer:
        for t in inputs:
            tracer.add_input(t)
        output = model(*args, **kwargs)
    outs = [t for t in output_tensors(output) if t.is_floating_point() and t.requires_grad]
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
    grads = torch.autograd.grad(roots, leaves, grads_out, allow_unused=True,
                                retain_graph=bool(tracer.rnn_out))
    pgrads = dict(zip(params, grads[: len(params)], strict=True))
    return _raw(tracer, pgrads, model_grads, head_zero, _time_grads(tracer, gen))


def _time_grads(tracer: ProbeTracer, gen: torch.Generator) -> dict[int, Tensor]:
    """Per RNN record, the gradient of its input sequence from a random cotangent on its
    *last* output step alone: ``|grad at step 0| / |grad at the last step|`` is then the
    product of the recurrent Jacobians over the sequence (Pascanu et al. 2013), not a sum
    of contributions from every output step."""
    out: dict[int, Tensor] = {}
    tracer.tapping = False
    try:
        for idx, y in tracer.rnn_out.items():
            clones, d = tracer.in_clones.get(idx), tracer.time_dim[idx]
            if not clones or y.ndim != 3 or clones[0].ndim != 3 or y.shape[d] < 2:
                continue
            last = y.select(d, y.shape[d] - 1)
            cot = torch.randn(tuple(last.shape), generator=gen).to(last)
            (g,) = torch.autograd.grad(last, clones[0], cot, retain_graph=True,
                                       allow_unused=True)
            if g is not None:
                out[idx] = g
    finally:
        tracer.tapping = True
    return out


def _zero_head(tracer: ProbeTracer, outs: list[Tensor]) -> int | None:
    """The last parametrised record if its weights are all zero and it makes the output."""
    params = [r for r in tracer.recs if r.kind == "param"]
    if not params:
        return None
    head = params[-1]
    prov = tracer.provenance(outs[0])
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


def _raw(tracer: ProbeTracer, pgrads: dict[Tensor, Tensor | None],
         model_grads: list[Tensor], head_zero: int | None,
         time_grads: dict[int, Tensor]) -> dict[str, Any]:
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
        if r.index in time_grads:
            g, d = time_grads[r.index], tracer.time_dim[r.index]
            put(("t0", r.index), [g.select(d, 0)])
            put(("tm", r.index), [g.select(d, g.shape[d] // 2)])
            put(("t1", r.index), [g.select(d, g.shape[d] - 1)])
    for i, point in enumerate(tracer.stream):
        put(("stream", i), point["grads"])
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
            "t0": sq(("t0", r.index)), "t1": sq(("t1", r.index)), "tm": sq(("tm", r.index)),
        })
    stream = [{**{k: v for k, v in p.items() if k != "grads"}, "g2": sq(("stream", i))}
              for i, p in enumerate(tracer.stream)]
    return {"names": [r.name for r in recs], "per": per, "model2": sq(("model", -1)),
            "head_zero": head_zero, "stream": stream}


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
        lay.time_gain_far = _ratio(t0, _mean([p["tm"] for p in ps]))
        mod = r.module
        w = getattr(mod, "weight", None) if mod is not None else None
        if r.kind == "param" and isinstance(w, Tensor) and w.ndim >= 2 and (
            isinstance(mod, CONV) or linear_layout(mod) is not None  # type: ignore[arg-type]
        ):
            wf = w.detach().float()
            lay.weight_gain = math.sqrt(fan_in(w, mod) * float(wf.pow(2).mean()))
        lay.known = mod is None or is_understood(mod)
        if r.feed is not None:
            feed = recs[r.feed]
            lay.feed = feed.act
            if lay.weight_gain is not None and feed.dphi2 is not None:
                lay.chi = lay.weight_gain ** 2 * feed.dphi2
        if r.follow is not None:
            lay.follow = recs[r.follow].act
        layers.append(lay)
    return layers


def _assemble_stream(raws: list[dict[str, Any]]) -> list[StreamPoint]:
    """The residual stream, averaged over the batches (empty if the batches disagree)."""
    streams = [raw["stream"] for raw in raws]
    if any(len(st) != len(streams[0]) for st in streams):
        return []
    model2 = _mean([r["model2"] for r in raws])
    points = []
    for i, first in enumerate(streams[0]):
        ms = _mean([st[i]["ms"] for st in streams])
        g2 = [st[i]["g2"] for st in streams]
        points.append(StreamPoint(
            index=i, residual=first["residual"], role=first["role"], order=first["order"],
            after=first["after"], rms=math.sqrt(ms) if ms is not None else math.nan,
            bwd_cum=_ratio(_mean(g2), model2) if all(v is not None for v in g2) else None))
    return points
