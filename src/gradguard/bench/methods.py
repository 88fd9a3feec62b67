"""Stabilisation methods for the benchmark, built from spec strings.

A *method* turns ``(model, optimizer)`` into a *controller*. The training loop calls
``controller.step()`` right after ``loss.backward()``; the controller applies its clipping,
then performs (or skips) ``optimizer.step()``, and returns a :class:`StepInfo`: the total
L2 norm of the gradients *before* clipping, whether it clipped, whether it skipped.
Values may be tensors (:func:`~gradguard.bench.run.run_one` reads them once per step) or
Python scalars.

Specs are ``name`` or ``name:arg`` (``clip:1``, ``value:0.5``, ``agc:0.01``). Registered:

====================  =================================================================
``none``              ``optimizer.step()``, nothing else (the norm is only measured).
``clip:<t>``          ``torch.nn.utils.clip_grad_norm_(params, t)``.
``tuned``             meta-method: the grid runs ``clip:{0.1,0.3,1,3,10}`` and reports
                      the best threshold per task (by mean metric over the grid).
``value[:<t>]``       ``torch.nn.utils.clip_grad_value_(params, t)``; default ``t = 1``.
``agc[:<c>]``         ``gradguard.clip_grad_agc_(params, clipping=c)`` on every layer but
                      the final one (as in the paper); default ``c = 0.01``.
``peer-zclip[:<m>]``  the published ``zclip`` package, ``ZClip(max_grad_norm=m).step(model)``
                      with its defaults otherwise; ``m`` defaults to the package's 1.0,
                      ``none`` turns the hard cap off (pure z-score clipping).
``peer-autoclip[:q]`` the published ``autoclip`` package, ``QuantileClip(params, quantile=q,
                      history_length=1000, global_threshold=True)``: AutoClip as in the
                      paper (global norm, 10th percentile of the history, ``q = 0.1``).
``guard[:<policy>]``  ``gradguard.Guard(model, clip=policy).attach(optimizer)``; policy
                      ``auto`` by default; ``auto``, ``autoclip``, ``zclip`` and ``adagc``
                      are aliases of ``guard:<name>``.
====================  =================================================================

Adding a method is one decorated builder. The Guard methods are exactly this::

    @register_method("guard", parse=policy_arg, requires="gradguard.guard")
    def _guard(ctx: MethodContext, policy: float | str) -> Controller:
        import gradguard as gg

        guard = gg.Guard(ctx.model, clip=policy, sinks=[]).attach(ctx.optimizer)
        # clipping (and skipping non-finite steps) now runs inside optimizer.step()
        return StepThenReport(ctx.optimizer, lambda: StepInfo(
            guard.last["pre_norm"], guard.last["clipped"], guard.last["skipped"]))

    for _policy in ("auto", "autoclip", "zclip", "adagc"):
        register_alias(_policy, f"guard:{_policy}")

Why the choices:

* ``value`` defaults to 1.0: the value practitioners reach for by analogy with a norm
  threshold of 1 (Keras' ``clipvalue``, most RNN code). Per-entry clipping at 1 bounds the
  norm only by ``sqrt(n_params)``, so on healthy steps it is inert and it acts only on
  outlier entries; a smaller value would change the update direction on every step.
* ``agc`` leaves the final layer unclipped, as Brock et al. 2021 do ("we find it is
  beneficial not to clip the final linear layer"); 0.01 is the paper's value and
  gradguard's default.
* The ``peer-*`` wrappers import their package lazily; when it is missing the grid
  skips the method with a message naming the package (``pip install 'gradguard[peers]'``).
  Neither package reports whether it clipped, so their controllers measure the norm after
  clipping as well (one extra norm pass, part of their measured overhead).

References:
    Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
    networks" (norm clipping). Brock, De, Smith & Simonyan 2021, "High-Performance
    Large-Scale Image Recognition Without Normalization" (AGC). Seetharaman, Wichern,
    Pardo & Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
    Networks". Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training".
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from gradguard import clip as _clip
from gradguard.engine import norms as _norms

__all__ = [
    "LABELS",
    "METHODS",
    "TUNED_THRESHOLDS",
    "ClipThenStep",
    "Controller",
    "Method",
    "MethodContext",
    "MethodDef",
    "MethodUnavailable",
    "StepInfo",
    "StepThenReport",
    "expand_method_specs",
    "float_arg",
    "get_method",
    "method_label",
    "register_alias",
    "register_method",
    "str_arg",
    "unregister",
]

#: How tables name some methods: torch's clip at 1.0 is what the Hugging Face Trainer
#: (``max_grad_norm=1.0``), Megatron and most language-model recipes use by default.
LABELS: dict[str, str] = {"clip:1": "clip:1 (HF default)"}
# The thresholds the ``tuned`` meta-method sweeps.
TUNED_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
# A step counts as clipped when the norm fell by more than this fraction.
_CLIPPED_RTOL = 1e-6


# ======================================================================================
# Protocol
# ======================================================================================


@dataclass(frozen=True)
class StepInfo:
    """What a controller did on one step.

    Attributes:
        norm: the total L2 norm of all gradients before clipping (NaN/inf when the
            gradients are not finite).
        clipped: whether the gradients were scaled or clamped.
        skipped: whether ``optimizer.step()`` was skipped.
    """

    norm: Tensor | float
    clipped: Tensor | bool
    skipped: Tensor | bool = False


@runtime_checkable
class Controller(Protocol):
    """Called once per step after ``loss.backward()``: clips, steps (or skips), reports."""

    def step(self) -> StepInfo: ...


@dataclass(frozen=True)
class MethodContext:
    """What a method may use to build its controller.

    Attributes:
        model: the model being trained (its gradients are filled).
        optimizer: its optimizer; the controller must call ``optimizer.step()`` itself
            (or have it called, e.g. by a hook), unless it skips the step.
        head: the parameters of the final (read-out) layer, which AGC does not clip.
        log: where a method that keeps a log (the Guard) writes it, or ``None``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    head: tuple[nn.Parameter, ...] = ()
    log: str | None = None  # a JSONL path for methods that keep a log (the Guard's)

    def parameters(self) -> list[nn.Parameter]:
        """All trainable parameters of the model, in order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def body(self) -> list[nn.Parameter]:
        """The trainable parameters that are not in the final layer."""
        head = {id(p) for p in self.head}
        return [p for p in self.parameters() if id(p) not in head]


class ClipThenStep:
    """A controller from a clipping function: ``info = clip(); optimizer.step()``
    unless ``info.skipped`` is true (read on the host: one sync on accelerators)."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip: Callable[[], StepInfo]) -> None:
        self.optimizer = optimizer
        self.clip = clip

    def step(self) -> StepInfo:
        info = self.clip()
        if not bool(info.skipped):
            self.optimizer.step()
        return info


class StepThenReport:
    """A controller for methods that run inside ``optimizer.step()`` (a hook, e.g. an
    attached Guard): ``optimizer.step(); return report()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, report: Callable[[], StepInfo]) -> None:
        self.optimizer = optimizer
        self.report = report

    def step(self) -> StepInfo:
        self.optimizer.step()
        return self.report()


# ======================================================================================
# Registry
# ======================================================================================

Builder = Callable[[MethodContext, Any], Controller]
ArgParser = Callable[[str | None], Any]


class MethodUnavailable(RuntimeError):
    """A registered method whose optional dependency is not installed."""


@dataclass(frozen=True)
class MethodDef:
    """A registered method.

    Attributes:
        name: the spec name (before ``:``).
        build: ``(ctx, arg) -> Controller``.
        parse: turns the spec's argument (``None`` when absent) into ``arg``; raises
            ``ValueError`` for a bad one. Its ``format`` attribute, if any, gives the
            canonical argument string.
        help: one line for ``--help`` and the docs.
        requires: a module that must be importable (optional dependencies), or ``None``.
    """

    name: str
    build: Builder
    parse: ArgParser
    help: str = ""
    requires: str | None = None

    def available(self) -> bool:
        """Whether the optional dependency, if any, is installed."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


@dataclass(frozen=True)
class Method:
    """A parsed method spec: a definition and its argument.

    Attributes:
        spec: the canonical spec string (e.g. ``"clip:1"`` for ``"clip:1.0"``).
        definition: the registered method.
        arg: the parsed argument.
    """

    spec: str
    definition: MethodDef
    arg: Any

    def build(self, ctx: MethodContext) -> Controller:
        """The controller for one training run.

        Raises:
            MethodUnavailable: if the method's optional package is not installed.
        """
        d = self.definition
        if not d.available():
            raise MethodUnavailable(unavailable_message(self.spec))
        return d.build(ctx, self.arg)


METHODS: dict[str, MethodDef] = {}
_ALIASES: dict[str, str] = {}
# Meta-methods the grid expands into several concrete specs.
META_METHODS: dict[str, tuple[str, ...]] = {
    "tuned": tuple(f"clip:{t:g}" for t in TUNED_THRESHOLDS),
}


def register_method(
    name: str, *, parse: ArgParser | None = None, help: str = "", requires: str | None = None
) -> Callable[[Builder], Builder]:
    """Register a builder ``(ctx, arg) -> Controller`` under ``name`` (a decorator).

    Args:
        name: the spec name; must not contain ``:``.
        parse: the argument parser (:func:`float_arg`, :func:`str_arg` or your own);
            ``None`` for methods that take no argument.
        help: one line of description.
        requires: a module that must be importable for the method to run.

    Raises:
        ValueError: for an empty name, a name with ``:`` or one already registered.
    """
    if not name or ":" in name:
        raise ValueError(f"name must be non-empty and contain no ':', got {name!r}")
    if name in METHODS or name in _ALIASES or name in META_METHODS:
        raise ValueError(f"name {name!r} is already registered")

    def deco(build: Builder) -> Builder:
        METHODS[name] = MethodDef(name, build, parse or no_arg(name), help, requires)
        return build

    return deco


def register_alias(alias: str, spec: str) -> None:
    """Make ``alias`` stand for ``spec`` (e.g. ``"auto"`` for ``"guard:auto"``)."""
    if not alias or ":" in alias:
        raise ValueError(f"alias must be non-empty and contain no ':', got {alias!r}")
    if alias in METHODS or alias in _ALIASES or alias in META_METHODS:
        raise ValueError(f"alias {alias!r} is already registered")
    _ALIASES[alias] = spec


def unregister(name: str) -> None:
    """Remove the method or alias ``name`` (registered by :func:`register_method` or
    :func:`register_alias`), e.g. a plug-in's, or a test's; an unknown name is ignored.
    Built-in meta-methods stay."""
    METHODS.pop(name, None)
    _ALIASES.pop(name, None)


def no_arg(name: str) -> ArgParser:
    """A parser for methods without an argument."""

    def parse(arg: str | None) -> None:
        if arg is not None:
            raise ValueError(f"methods: {name!r} takes no argument, got {name}:{arg}")

    return parse


def float_arg(
    name: str, default: float | None, *, lo: float = 0.0, hi: float = math.inf,
    allow_none: bool = False,
) -> ArgParser:
    """A parser for a positive float argument in ``(lo, hi]`` with a default.

    ``default=None`` makes the argument required; ``allow_none`` accepts the word
    ``none`` (returned as ``None``).
    """

    def parse(arg: str | None) -> float | None:
        if arg is None:
            if default is None:
                raise ValueError(f"methods: {name!r} needs an argument, e.g. {name}:1")
            return default
        if allow_none and arg.strip().lower() == "none":
            return None
        try:
            v = float(arg)
        except ValueError:
            raise ValueError(f"methods: {name}:{arg}: the argument must be a number") from None
        if not (math.isfinite(v) and lo < v <= hi):
            raise ValueError(f"methods: {name}:{arg}: the argument must be in ({lo:g}, {hi:g}]")
        return v

    parse.format = lambda v: "none" if v is None else f"{v:g}"  # type: ignore[attr-defined]
    parse.default = default  # type: ignore[attr-defined]
    return parse


def str_arg(default: str, choices: Sequence[str] | None = None) -> ArgParser:
    """A parser for a string argument with a default (and optionally a fixed set)."""

    def parse(arg: str | None) -> str:
        v = default if arg is None else arg.strip()
        if not v or (choices is not None and v not in choices):
            allowed = f"one of {', '.join(choices)}" if choices else "non-empty"
            raise ValueError(f"methods: argument {arg!r} must be {allowed}")
        return v

    parse.format = str  # type: ignore[attr-defined]
    parse.default = default  # type: ignore[attr-defined]
    return parse


def unavailable_message(spec: str) -> str:
    """Why ``spec`` cannot run here, and how to fix it."""
    name = spec.partition(":")[0]
    d = METHODS.get(name)
    req = d.requires if d is not None else None
    return (
        f"method {spec!r} skipped: the {req!r} package is not installed "
        "(pip install 'gradguard[peers]')"
    )


def get_method(spec: str) -> Method:
    """Parse a method spec (``"clip:1"``, ``"value"``, an alias) into a :class:`Method`.

    Raises:
        ValueError: for an unknown name, a meta-method (``tuned``: use
            :func:`expand_method_specs`) or a bad argument, naming the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"methods: a method spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    name, sep, arg = spec.partition(":")
    if name in _ALIASES and not sep:
        return get_method(_ALIASES[name])
    if name in META_METHODS:
        raise ValueError(
            f"methods: {spec!r} is a meta-method that stands for {', '.join(META_METHODS[name])};"
            " expand it with expand_method_specs()"
        )
    if name not in METHODS:
        known = sorted([*METHODS, *_ALIASES, *META_METHODS])
        raise ValueError(f"methods: unknown method {spec!r}; known methods: {', '.join(known)}")
    d = METHODS[name]
    value = d.parse(arg if sep else None)
    fmt = getattr(d.parse, "format", None)
    canonical = name if fmt is None else f"{name}:{fmt(value)}"
    return Method(canonical, d, value)


def method_label(spec: str) -> str:
    """How tables name the method ``spec`` (its spec, or :data:`LABELS`' name for it)."""
    return LABELS.get(spec, spec)


def expand_method_specs(specs: Sequence[str]) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Canonical concrete specs for ``specs``, in order and without duplicates.

    Meta-methods are replaced by what they stand for (``tuned`` -> ``clip:{0.1,...,10}``)
    and returned in a second value, ``{meta: concrete specs}``, for the aggregation.
    ``"default"`` stands for ``none, tuned, value, agc, autoclip, zclip, adagc, auto``
    and every ``peer-*`` method.

    Raises:
        ValueError: for an unknown or malformed spec.
    """
    out: list[str] = []
    metas: dict[str, tuple[str, ...]] = {}

    def add(s: str) -> None:
        canonical = get_method(s).spec
        if canonical not in out:
            out.append(canonical)

    for spec in specs:
        s = spec.strip()
        if s == "default":
            peers = [m for m in METHODS if m.startswith("peer-")]
            guards = [a for a in ("autoclip", "zclip", "adagc", "auto") if a in _ALIASES]
            for d in ("none", "tuned", "value", "agc", *guards, *peers):
                sub, sub_meta = expand_method_specs([d])
                for x in sub:
                    if x not in out:
                        out.append(x)
                metas.update(sub_meta)
            continue
        if s in META_METHODS:
            metas[s] = META_METHODS[s]
            for x in META_METHODS[s]:
                add(x)
            continue
        add(s)
    return out, metas


# ======================================================================================
# Built-in methods
# ======================================================================================


def _total_norm(params: Sequence[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return _norms.get_total_norm(grads) if grads else torch.tensor(0.0)


def _shrank(before: Tensor | float, after: Tensor | float) -> bool:
    b, a = float(before), float(after)
    return math.isfinite(b) and a < b * (1.0 - _CLIPPED_RTOL)


@register_method("none", help="no clipping: optimizer.step() only (the norm is measured)")
def _none(ctx: MethodContext, _: None) -> Controller:
    params = ctx.parameters()
    return ClipThenStep(ctx.optimizer, lambda: StepInfo(_total_norm(params), False))


@register_method(
    "clip", parse=float_arg("clip", None), help="torch.nn.utils.clip_grad_norm_(params, t)"
)
def _clip_norm(ctx: MethodContext, max_norm: float) -> Controller:
    params = ctx.parameters()

    def clip() -> StepInfo:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # torch scales by max_norm / (norm + 1e-6) when that is below 1.
        return StepInfo(norm, bool(norm + 1e-6 > max_norm))

    return ClipThenStep(ctx.optimizer, clip)


@register_method(
    "value", parse=float_arg("value", 1.0), help="torch.nn.utils.clip_grad_value_(params, t)"
)
def _clip_value(ctx: MethodContext, clip_value: float) -> Controller:
    params = ctx.parameters()

    def clip() -> StepInfo:
        grads = [p.grad for p in params if p.grad is not None]
        per_tensor = _norms.tensor_norms(grads, 2.0)
        max_abs = _norms.get_total_norm(grads, math.inf)
        torch.nn.utils.clip_grad_value_(params, clip_value)
        return StepInfo(_norms.total_norm(per_tensor, 2.0), bool(max_abs > clip_value))

    return ClipThenStep(ctx.optimizer, clip)


@register_method(
    "agc", parse=float_arg("agc", 0.01),
    help="gradguard.clip_grad_agc_(clipping=c) on all layers but the last (NFNets)",
)
def _agc(ctx: MethodContext, clipping: float) -> Controller:
    params, body = ctx.parameters(), ctx.body()

    def clip() -> StepInfo:
        norm = _total_norm(params)
        before = _clip.clip_grad_agc_(body, clipping=clipping)
        return StepInfo(norm, _shrank(before, _total_norm(body)))

    return ClipThenStep(ctx.optimizer, clip)


@register_method(
    "peer-zclip", parse=float_arg("peer-zclip", 1.0, allow_none=True), requires="zclip",
    help="the zclip package: ZClip(max_grad_norm=m).step(model), package defaults otherwise",
)
def _peer_zclip(ctx: MethodContext, max_grad_norm: float | None) -> Controller:
    zclip = importlib.import_module("zclip")
    # Package defaults: alpha=0.97, z_thresh=2.5, warmup_steps=25, mode="zscore",
    # clip_option="adaptive_scaling"; max_grad_norm=1.0 also clips the warm-up steps.
    zc = zclip.ZClip(max_grad_norm=max_grad_norm)
    params = ctx.parameters()

    def clip() -> StepInfo:
        norm = zc.step(ctx.model)  # a Python float: the pre-clip total norm
        return StepInfo(norm, _shrank(norm, _total_norm(params)))

    return ClipThenStep(ctx.optimizer, clip)


@register_method(
    "peer-autoclip", parse=float_arg("peer-autoclip", 0.1, hi=1.0), requires="autoclip",
    help="the autoclip package: QuantileClip(global_threshold=True, quantile=q), paper's q=0.1",
)
def _peer_autoclip(ctx: MethodContext, quantile: float) -> Controller:
    autoclip_torch = importlib.import_module("autoclip.torch")
    params = ctx.parameters()
    clipper = autoclip_torch.QuantileClip(
        params, quantile=float(quantile), history_length=1000, global_threshold=True
    )

    def clip() -> StepInfo:
        before = _total_norm(params)
        clipper.step()
        return StepInfo(before, _shrank(before, _total_norm(params)))

    return ClipThenStep(ctx.optimizer, clip)


def policy_arg(arg: str | None) -> float | str:
    """A Guard ``clip=`` policy: a number (fixed threshold) or a policy name, validated by
    :func:`gradguard.policies.make_policy`; default ``"auto"``."""
    text = "auto" if arg is None else arg.strip()
    value: float | str
    try:
        value = float(text)
    except ValueError:
        value = text
    try:
        from gradguard.policies.registry import make_policy
    except ImportError:  # pragma: no cover - the Guard is not built yet
        return value
    try:
        make_policy(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"methods: guard:{text}: {e}") from None
    return value


policy_arg.format = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # type: ignore[attr-defined]


@register_method(
    "guard", parse=policy_arg, requires="gradguard.guard",
    help="gradguard.Guard(model, clip=<policy>) attached to the optimizer (default auto)",
)
def _guard(ctx: MethodContext, policy: float | str) -> Controller:
    import gradguard as gg

    sinks = [ctx.log] if ctx.log else []
    guard = gg.Guard(ctx.model, clip=policy, sinks=sinks, log_every=10 if ctx.log else 100)
    guard.attach(ctx.optimizer)  # clipping and skipping now run inside optimizer.step()
    return GuardController(ctx.optimizer, guard)


class GuardController(StepThenReport):
    """The controller of the ``guard`` methods; it also hands the loss to the Guard (for
    its log) and exposes the Guard itself."""

    def __init__(self, optimizer: torch.optim.Optimizer, guard: Any) -> None:
        super().__init__(optimizer, lambda: StepInfo(
            guard.last["pre_norm"], guard.last["clipped"], guard.last["skipped"]))
        self.guard = guard

    def observe_loss(self, loss: Tensor) -> None:
        self.guard.observe_loss(loss)

    def close(self) -> None:
        """Flush the Guard's log and detach it from the optimizer."""
        self.guard.close()


for _policy in ("auto", "autoclip", "zclip", "adagc"):
    register_alias(_policy, f"guard:{_policy}")
