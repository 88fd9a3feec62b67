"""Choosing and drawing the weights of each layer: the rules of ``init_model``, layer by layer.

:class:`Planner` is shared by the static path (module registration order, mean-field
statistics) and the traced path (each layer initialised just before it runs, from the
statistics of its actual input, by :class:`InitTracer`). Per layer type:

* Linear layers (``nn.Linear``, ``transformers``' ``Conv1D`` whose weight is ``(in, out)``)
  and convolutions (``scheme="auto"``): He next to the ReLU family; orthogonal at
  the critical gain (``chi_1 = 1``) after tanh, sigmoid (with a mean-centring bias), ELU,
  SELU; orthogonal variance-preserving after GELU, SiLU, Mish (no stable fixed point); unit
  pre-activation second moment when fed by data or a normalised stream; gain 1 otherwise.
* LSTM/GRU/RNN: per-gate orthogonal recurrent blocks, per-gate Xavier input blocks, LSTM
  forget-gate bias 1 (Jozefowicz et al. 2015).
* ``nn.MultiheadAttention``: Xavier per q/k/v block. Norms (torch's, or any scale-invariant
  module such as a custom RMSNorm): weight 1, bias 0.
* Residual factors (:attr:`Planner.scale`, :attr:`Planner.member_scale`) multiply a layer
  after its rule; :attr:`Planner.stream_scale` scales a Pre-LN branch's last layer to the
  stream's RMS on the batch (GPT-2's rule at the stream's scale).

Frozen parameters and parameters tied to a module initialised earlier are kept.

References:
    He et al. 2015. Saxe, McClelland, Ganguli 2014. Schoenholz et al. 2017. Pennington,
    Schoenholz, Ganguli 2017. Mishkin & Matas 2016 (LSUV). Jozefowicz et al. 2015.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradguard.signal.activations import CENTERED, RELU_FAMILY, is_unstable, moments
from gradguard.signal.modules import ATOMIC, CONV, EMBEDDINGS, fan_in, is_norm, linear_layout
from gradguard.signal.tracing import Rec, Tracer

__all__ = ["InitEntry", "InitTracer", "Planner", "draw", "has_rule"]


@dataclass
class InitEntry:
    """What :func:`init_model` did to one module."""

    name: str
    type: str
    action: str
    gain: float | None = None


def draw(shape: tuple[int, ...], dist: str, gain: float, fan: int,
         gen: torch.Generator) -> Tensor:
    """A CPU float32 weight: ``normal`` (variance gain^2/fan), ``uniform`` (same variance)
    or ``orthogonal`` (rows orthonormal, rescaled to variance gain^2/fan when expanding)."""
    if dist == "orthogonal" and len(shape) >= 2:
        rows, cols = shape[0], math.prod(shape[1:])
        w = torch.empty(rows, cols)
        nn.init.orthogonal_(w, gain=1.0, generator=gen)
        w *= math.sqrt(cols / fan) * (math.sqrt(rows / cols) if rows > cols else 1.0)
        return (w * gain).reshape(shape)
    std = gain / math.sqrt(fan)
    if dist == "uniform":
        return (torch.rand(shape, generator=gen) * 2 - 1) * (std * math.sqrt(3.0))
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def _assign(p: Tensor, value: Tensor) -> None:
    p.copy_(value.to(dtype=p.dtype))


def has_rule(m: nn.Module) -> bool:
    """Whether the planner has a rule for ``m`` (everything else is reported as unhandled):
    linear layers (either weight layout), convolutions, RNNs, attention, normalisations,
    embeddings and PReLU."""
    return (isinstance(m, (*CONV, *ATOMIC, *EMBEDDINGS, nn.PReLU))
            or linear_layout(m) is not None or is_norm(m))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, CONV) or linear_layout(m) is not None


def _oriented(w: Tensor, m: nn.Module) -> Tensor:
    """The weight as ``(out, in, *kernel)``: a transposed linear weight is transposed back."""
    return w.T if w.ndim == 2 and linear_layout(m) == "in_out" else w


class Planner:
    """Chooses and applies weights, layer by layer (shared by the static and traced paths)."""

    def __init__(self, recs: list[Rec], scheme: str, gen: torch.Generator, *,
                 entries: list[InitEntry], notes: list[str], residual: str | None,
                 data_driven: bool) -> None:
        """Args: the records to initialise, the scheme, the generator of every draw, the
        lists that receive what is done (``entries``) and found (``notes``), the residual
        scaling in force and whether statistics are measured on a batch."""
        self.recs = recs
        self.scheme = scheme
        self.gen = gen
        self.entries = entries
        self.notes = notes
        self.residual = residual
        self.data_driven = data_driven
        self.q_out: dict[int, float] = {}  # mean-field pre-activation second moments
        self.scale: dict[int, tuple[float, str]] = {}  # residual factor per record
        self.member_scale: dict[int, tuple[float, str]] = {}
        self.done: set[int] = set()
        self.done_modules: set[int] = set()
        self.done_params: set[int] = set()  # ids of parameters already claimed by a module
        self.live: list[Rec] | None = None  # records of the pass being initialised
        self.live_values: dict[int, Tensor] = {}  # value node -> tensor in that pass
        # residual branches scaled against the stream they add to: record -> (skip node,
        # number of branches), measured on the batch (Pre-LN branches)
        self.stream_scale: dict[int, tuple[int, int]] = {}

    # -- helpers -----------------------------------------------------------------------
    def _act(self, idx: int | None) -> Rec | None:
        return self.recs[idx] if idx is not None else None

    def _feed(self, rec: Rec) -> Rec | None:
        """The activation feeding ``rec``: measured in the current pass when there is one."""
        if self.live is not None and rec.feed is not None and rec.feed < len(self.live):
            return self.live[rec.feed]
        return self._act(rec.feed)

    def _feed_stats(self, rec: Rec, x: Tensor | None) -> tuple[float, float | None, float]:
        """``(m_in, dphi2_feed, q_feed)`` for a param record: measured or mean-field."""
        feed = self._feed(rec)
        if self.data_driven and x is not None:
            xf = x.detach().float()
            if feed is not None and feed.act in CENTERED:
                dims = [d for d in range(xf.ndim) if d != _feature_dim(rec, xf)]
                xf = xf - xf.mean(dim=dims, keepdim=True)
            m_in = float(xf.pow(2).mean()) if xf.numel() else 1.0
            return max(m_in, 1e-12), (feed.dphi2 if feed else None), (
                feed.q_in if feed and feed.q_in else 1.0)
        if feed is None or feed.act is None:
            return 1.0, None, 1.0
        q = self.q_out.get(feed.src, 1.0) if feed.src is not None else 1.0
        m2, mean, d2 = moments(feed.act, feed.act_param, q)
        if feed.act in CENTERED:
            m2 -= mean * mean
        return m2, d2, q

    def _linear_rule(self, rec: Rec, x: Tensor | None) -> tuple[str, float, str]:
        """``(distribution, gain, description)`` for a Linear/Conv record."""
        follow, feed = self._act(rec.follow), self._feed(rec)
        fa = follow.act if follow else None
        fd = feed.act if feed else None
        m_in, d2, q = self._feed_stats(rec, x)
        if self.scheme == "he":
            a = _slope(follow) if fa in RELU_FAMILY else 0.0
            return "normal", math.sqrt(2 / (1 + a * a)), "He (kaiming_normal_, fan_in)"
        if self.scheme == "xavier":
            return "xavier", 1.0, "Xavier (xavier_normal_, gain 1)"
        if self.scheme in ("orthogonal", "lsuv"):
            return "orthogonal", 1.0, "orthogonal (gain 1)"
        if fa in RELU_FAMILY or (fa is None and fd in RELU_FAMILY):
            a = _slope(follow if fa in RELU_FAMILY else feed)
            return ("normal", math.sqrt(2 / (1 + a * a)),
                    f"He for {fa or fd} (kaiming_normal_, fan_in)")
        if fd is not None and feed is not None and fd not in RELU_FAMILY:
            if is_unstable(fd, feed.act_param):
                return ("orthogonal", math.sqrt(1.0 / m_in),
                        f"orthogonal, variance-preserving for {fd} (no stable fixed point: "
                        "pre-activation second moment pinned to 1)")
            if d2 is None or d2 <= 0:
                return "orthogonal", 1.0, f"orthogonal gain 1 after {fd}"
            centre = " with mean-centring bias" if fd in CENTERED else ""
            return ("orthogonal", 1.0 / math.sqrt(d2),
                    f"orthogonal, critical for {fd} (chi_1 = 1 at q={q:.3g}){centre}")
        dist = "orthogonal" if fa is not None else "normal"
        after = f" (followed by {fa})" if fa else ""
        if rec.from_input or rec.normed_input:
            src = "data" if rec.from_input else "a normalised input"
            return (dist, math.sqrt(1.0 / m_in),
                    f"{dist}, unit pre-activation second moment from {src}{after}")
        # fed by another layer's output (an embedding, an RNN, attention, a residual
        # stream): no activation in between, so the gradient-preserving gain is 1
        return dist, 1.0, f"{dist}, gain 1 (LeCun; no activation before it){after}"

    # -- per module ----------------------------------------------------------------------
    def init_record(self, rec: Rec, x: Tensor | None, *, lsuv: bool = False) -> None:
        """Initialise ``rec.module`` (once per module), then apply residual factors.

        Frozen parameters (``requires_grad=False``, e.g. a pretrained backbone) and
        parameters tied to a module initialised earlier (an output head sharing the
        embedding's weight) are left as they are.
        """
        m = rec.module
        if m is None or id(m) in self.done_modules:
            return
        self.done_modules.add(id(m))
        self.done.add(rec.index)
        params = list(m.parameters())
        frozen = {id(p) for p in params if not p.requires_grad}
        tied = {id(p) for p in params if id(p) in self.done_params} - frozen
        self.done_params.update(id(p) for p in params)
        if params and len(frozen | tied) == len({id(p) for p in params}):
            why = ("frozen (requires_grad=False)" if frozen
                   else "tied to a module initialised before")
            self.entries.append(InitEntry(rec.name, type(m).__name__, f"kept: {why}"))
            return
        keep = [(p, p.detach().clone()) for p in params if id(p) in frozen | tied]
        n_before = len(self.entries)
        try:
            self._init_module(rec, m, x, lsuv)
        finally:
            with torch.no_grad():  # what must not change is put back
                for p, saved in keep:
                    p.copy_(saved)
        if keep and len(self.entries) > n_before:
            self.entries[-1].action += (
                f"; {len(keep)} frozen or tied parameter(s) kept")

    def _init_module(self, rec: Rec, m: nn.Module, x: Tensor | None, lsuv: bool) -> None:
        n_before = len(self.entries)
        if _is_linear(m):
            self._init_linear(rec, x)
            if lsuv and x is not None:
                self._lsuv(rec, x)
        elif isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            self._init_rnn(rec.name, m)
        elif isinstance(m, nn.MultiheadAttention):
            self._init_mha(rec, m)
        elif is_norm(m):
            with torch.no_grad():
                for pn, p in m.named_parameters(recurse=False):
                    # a custom norm's shift may be called beta or offset, its scale anything
                    shift = any(k in pn.lower() for k in ("bias", "beta", "shift", "offset"))
                    p.fill_(0.0 if shift else 1.0)
            self.entries.append(InitEntry(rec.name, type(m).__name__, "weight 1, bias 0"))
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag, nn.PReLU)):
            self.entries.append(InitEntry(rec.name, type(m).__name__,
                                                 "kept (default init)"))
        if len(self.entries) == n_before:
            return  # not a handled type: init_model reports it as unhandled
        entry = self.entries[-1]
        if rec.index in self.member_scale:
            f, why = self.member_scale[rec.index]
            self._scale_module(m, f)
            entry.action += f"; x{f:.3g} ({why})"
        if rec.index in self.stream_scale and x is not None:
            self._scale_to_stream(rec, m, x, entry)
        elif rec.index in self.scale:
            f, why = self.scale[rec.index]
            self._scale_out(m, f)
            entry.action += f"; output x{f:.3g} ({why})"

    def _scale_to_stream(self, rec: Rec, m: nn.Module, x: Tensor, entry: InitEntry) -> None:
        """GPT-2's rule against the stream's own scale: the branch's last layer is scaled so
        that its output RMS on the batch is the stream's RMS over sqrt(B), the stream's RMS
        taken at its smallest token (a class token or a position table of std 0.02 next to
        unit-scale patch embeddings would otherwise be swamped by the first branch).

        A Pre-LN branch sees a normalised input, so its output scale is set by its weights
        alone, while the stream keeps the scale of the embedding (std 0.02 in GPT-2): the
        fixed factor 1/sqrt(B) would let B unit-scale branches swamp it."""
        skip_node, b = self.stream_scale[rec.index]
        skip = self.live_values.get(skip_node)
        with torch.no_grad():
            y = m.forward(x)
        stream = _smallest_token_rms(skip) if isinstance(skip, Tensor) else None
        if stream is None or not isinstance(y, Tensor):
            f = 1.0 / math.sqrt(b)
            why = f"gpt2: 1/sqrt({b} branches); the stream was not found on the batch"
        else:
            got = float(y.detach().float().pow(2).mean().sqrt())
            f = stream / math.sqrt(b) / got if got > 0 and math.isfinite(got) else 1.0
            why = f"gpt2: output RMS = stream RMS {stream:.3g} / sqrt({b})"
        self._scale_out(m, f)
        entry.action += f"; output x{f:.3g} ({why})"

    def _lsuv(self, rec: Rec, x: Tensor) -> None:
        """Mishkin & Matas: rescale so the layer's output variance on the batch is 1."""
        m = rec.module
        assert m is not None
        with torch.no_grad():
            y = m.forward(x)
            var = float(y.detach().float().var()) if y.numel() > 1 else 0.0
            if var > 0 and math.isfinite(var):
                f = 1.0 / math.sqrt(var)
                m.weight.mul_(f)  # type: ignore[operator]
                entry = self.entries[-1]
                entry.gain = f
                entry.action = "LSUV: orthogonal, output variance 1 on the batch"

    def _init_linear(self, rec: Rec, x: Tensor | None) -> None:
        m = rec.module
        assert m is not None
        w: Tensor = m.weight  # type: ignore[assignment]
        fan = fan_in(w, m)
        shape = tuple(_oriented(w, m).shape)
        dist, gain, desc = self._linear_rule(rec, x)
        if dist == "xavier":
            fan_out = shape[0] * (math.prod(shape[2:]) if len(shape) > 2 else 1)
            value = torch.randn(shape, generator=self.gen) * math.sqrt(2.0 / (fan + fan_out))
        else:
            value = draw(shape, dist, gain, fan, self.gen)
        _assign(w, value.T if value.ndim == 2 and shape != tuple(w.shape) else value)
        bias = getattr(m, "bias", None)
        if isinstance(bias, Tensor):
            with torch.no_grad():
                bias.zero_()
                feed = self._feed(rec)
                if self.scheme == "auto" and feed is not None and feed.act in CENTERED:
                    mean = self._input_mean(rec, x, feed)
                    if mean is not None:
                        bias.copy_(-_apply_weight(m, mean).to(bias.dtype))
        elif self.scheme == "auto" and (f := self._feed(rec)) and f.act in CENTERED:
            self.notes.append(f"{rec.name}: no bias, so the mean of {f.act} is not removed")
        m_in, _, _ = self._feed_stats(rec, x)
        self.q_out[rec.index] = gain * gain * m_in
        self.entries.append(InitEntry(rec.name, type(m).__name__, desc, gain))

    def _input_mean(self, rec: Rec, x: Tensor | None, feed: Rec) -> Tensor | None:
        m = rec.module
        assert m is not None
        w: Tensor = _oriented(m.weight, m)  # type: ignore[arg-type]
        if self.data_driven and x is not None:
            xf = x.detach().float()
            d = _feature_dim(rec, xf)
            dims = [i for i in range(xf.ndim) if i != d]
            return xf.mean(dim=dims)
        q = self.q_out.get(feed.src, 1.0) if feed.src is not None else 1.0
        _, mean, _ = moments(feed.act or "", feed.act_param, q)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            n_in = w.shape[0]  # weight (in, out/groups, k...)
        else:
            n_in = w.shape[1] * (m.groups if isinstance(m, CONV) else 1)
        return torch.full((n_in,), mean)

    def _init_rnn(self, name: str, m: nn.Module) -> None:
        gates = {"LSTM": 4, "GRU": 3, "LSTMCell": 4, "GRUCell": 3}.get(type(m).__name__, 1)
        if isinstance(m, nn.RNNBase):
            gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
        h = m.hidden_size
        for pname, p in m.named_parameters(recurse=False):
            blocks = p.shape[0] // h if pname.startswith(("weight_ih", "weight_hh", "bias")) else 1
            if pname.startswith("bias"):
                with torch.no_grad():
                    p.zero_()
                    if gates == 4 and pname.startswith("bias_ih"):
                        p[h:2 * h].fill_(1.0)  # LSTM forget gate (gate order i, f, g, o)
                continue
            rows = p.shape[0] // blocks
            parts = []
            for _ in range(blocks):
                shape = (rows, *p.shape[1:])
                fan = fan_in(p)
                if self.scheme == "he":
                    parts.append(draw(shape, "normal", math.sqrt(2), fan, self.gen))
                elif self.scheme == "xavier" or (
                    self.scheme in ("auto", "lsuv") and not pname.startswith("weight_hh")
                ):
                    parts.append(torch.randn(shape, generator=self.gen)
                                 * math.sqrt(2.0 / (fan + rows)))
                else:
                    parts.append(draw(shape, "orthogonal", 1.0, fan, self.gen))
            _assign(p, torch.cat(parts))
        desc = {"auto": "per-gate: orthogonal recurrent blocks (gain 1), Xavier input blocks",
                "lsuv": "per-gate: orthogonal recurrent blocks (gain 1), Xavier input blocks",
                "orthogonal": "per-gate orthogonal blocks (gain 1)",
                "he": "per-gate He blocks", "xavier": "per-gate Xavier blocks"}[self.scheme]
        if gates == 4:
            desc += ", forget-gate bias 1, other biases 0"
        else:
            desc += ", biases 0"
        self.entries.append(InitEntry(name, type(m).__name__, desc))

    def _init_mha(self, rec: Rec, m: nn.MultiheadAttention) -> None:
        e = m.embed_dim
        with torch.no_grad():
            if m.in_proj_weight is not None:
                parts = [torch.randn(e, m.in_proj_weight.shape[1], generator=self.gen)
                         * math.sqrt(2.0 / (e + m.in_proj_weight.shape[1])) for _ in range(3)]
                _assign(m.in_proj_weight, torch.cat(parts))
            for pn in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                p = getattr(m, pn, None)
                if isinstance(p, Tensor):
                    _assign(p, torch.randn(tuple(p.shape), generator=self.gen)
                            * math.sqrt(2.0 / (p.shape[0] + p.shape[1])))
            if m.in_proj_bias is not None:
                m.in_proj_bias.zero_()
            ow = m.out_proj.weight
            _assign(ow, torch.randn(tuple(ow.shape), generator=self.gen)
                    * math.sqrt(2.0 / (ow.shape[0] + ow.shape[1])))
            if m.out_proj.bias is not None:
                m.out_proj.bias.zero_()
        self.entries.append(InitEntry(
            rec.name, type(m).__name__,
            "Xavier per q/k/v block (torch fuses them: variance 1/(2E) instead of 1/E), "
            "out_proj Xavier, biases 0"))

    def _scale_out(self, m: nn.Module, f: float) -> None:
        """Scale a branch's last module: its weight and bias (a norm's affine, as in
        torchvision's ``zero_init_residual``; an attention's output projection)."""
        target = m.out_proj if isinstance(m, nn.MultiheadAttention) else m
        with torch.no_grad():
            for pn in ("weight", "bias"):
                p = getattr(target, pn, None)
                if isinstance(p, Tensor):
                    p.mul_(f)
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None and (
                self.residual == "deepnorm"
            ):
                e = m.embed_dim
                m.in_proj_weight[2 * e:].mul_(f)

    def _scale_module(self, m: nn.Module, f: float) -> None:
        with torch.no_grad():
            for pn, p in m.named_parameters(recurse=False):
                if pn.startswith("weight"):
                    p.mul_(f)


def _apply_weight(m: nn.Module, mean: Tensor) -> Tensor:
    """``W @ mean`` summed over kernel positions (the response to a constant input)."""
    w = _oriented(m.weight, m).detach().float()  # type: ignore[arg-type]
    if w.ndim == 2:
        return w @ mean.to(w)
    groups = getattr(m, "groups", 1)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        # weight (in, out/groups, k...); an output position receives about
        # prod(kernel) / prod(stride) taps of each input channel
        wk = w.sum(dim=tuple(range(2, w.ndim))) / math.prod(m.stride)  # (in, out/groups)
        wg = wk.reshape(groups, wk.shape[0] // groups, wk.shape[1])
        mg = mean.to(w).reshape(groups, -1)
        return torch.einsum("gio,gi->go", wg, mg).reshape(-1)
    wk = w.sum(dim=tuple(range(2, w.ndim)))  # (out, in/groups)
    out = wk.shape[0]
    mg = mean.to(w).reshape(groups, -1)
    wg = wk.reshape(groups, out // groups, -1)
    return torch.einsum("goi,gi->go", wg, mg).reshape(out)


def _smallest_token_rms(t: Tensor) -> float | None:
    """The RMS over features of the stream's smallest token (features: the last dim of a
    ``(batch, tokens, features)`` stream, dim 1 of an image ``(batch, channels, h, w)``);
    all-zero tokens (padding) aside. None if there is none."""
    tf = t.detach().float()
    if tf.ndim < 2 or not tf.numel():
        return None
    feat = 1 if tf.ndim == 4 else tf.ndim - 1
    rms = tf.pow(2).mean(dim=feat).sqrt().flatten()
    rms = rms[rms > 1e-8 * float(rms.max())] if bool((rms > 0).any()) else rms[:0]
    return float(rms.min()) if rms.numel() else None


def _feature_dim(rec: Rec, x: Tensor) -> int:
    if isinstance(rec.module, CONV) and x.ndim >= 3:
        return 1
    return x.ndim - 1


def _slope(act: Rec | None) -> float:
    if act is None or act.act == "relu" or act.act == "relu6":
        return 0.0
    return float(act.act_param or 0.0)


class InitTracer(Tracer):
    """Initialises each parametrised module just before it runs, from its actual input."""

    def __init__(self, model: nn.Module, planner: Planner, names: list[str]) -> None:
        super().__init__(model)
        self.planner = planner
        self.names = names

    def on_param_start(self, rec: Rec, x: Tensor | None) -> None:
        """Initialise the planned record of this call from its input ``x``."""
        if rec.index >= len(self.names) or self.names[rec.index] != rec.name:
            raise RuntimeError(
                "init_model: the model took a different path on the second pass over `data` "
                f"(record {rec.index} is {rec.name!r}); data-dependent control flow is not "
                "supported, pass data=None for a static initialisation")
        planned = self.planner.recs[rec.index]
        planned.module = rec.module
        self.planner.live = self.recs
        self.planner.live_values = self.values
        self.planner.init_record(planned, x, lsuv=self.planner.scheme == "lsuv")
