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

Gains computed numerically by :func:`activation_gain` (Gauss–Legendre quadrature, 20
panels of 24 nodes on [-10, 10] plus the kinks; no random numbers), at ``q = 1``:

=============  ============  ==============  ==================  ==========================
activation     E[phi(z)^2]   variance gain   chi_1 at that gain  slope of q-map (stable<1)
=============  ============  ==============  ==================  ==========================
relu           0.5000        1.4142 (He)     1.0000              1.0000 (neutral)
tanh           0.3943        1.5925 (~5/3)   1.1778 (chaotic)    0.4611
sigmoid        0.2934        1.8462          0.1528              0.1063
gelu           0.4252        1.5335          1.0720              1.1441 (unstable)
silu           0.3558        1.6765          1.0666              1.1726 (unstable)
mish           0.4523        1.4868          1.0591              1.0763 (unstable)
elu            0.6449        1.2452          1.0410              0.8985
selu           1.0000        1.0000          1.1694 (chaotic)    0.8855
softplus       0.9212        1.0419          0.3185              0.4921
=============  ============  ==============  ==================  ==========================

Two rows are worth reading twice: torch's tanh gain 5/3 is (nearly) the variance-preserving
gain, which puts tanh in the chaotic phase; and SELU's self-normalising LeCun init keeps
the forward variance but lets gradients grow by ``sqrt(1.17) = 1.08`` per layer.

Residual networks: the stream's variance grows by ``1 + Var(branch)/Var(stream)`` per
branch. ``residual="gpt2"`` multiplies the last layer of each of the ``B`` branches by
``1/sqrt(B)`` (GPT-2's ``1/sqrt(2N)`` for ``N`` layers of two branches), ``"fixup"`` zeroes
it and scales the other branch layers by ``B^(-1/(2m-2))`` (Zhang et al. 2019), and
``"deepnorm"`` scales the branch layers (value and output projections, feed-forward) by
``beta = (8N)^(-1/4)`` with ``N = B/2`` (Wang et al. 2022).

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

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "RESIDUAL_SCALINGS",
    "SCHEMES",
    "InitEntry",
    "InitReport",
    "activation_gain",
    "init_model",
]

SCHEMES = ("auto", "he", "xavier", "orthogonal", "lsuv")
RESIDUAL_SCALINGS = ("gpt2", "fixup", "deepnorm")

# --------------------------------------------------------------------------------------
# Activations and their mean-field moments
# --------------------------------------------------------------------------------------

RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "prelu", "rrelu"})
# Activations whose mean is larger than their standard deviation: the next layer's bias
# removes the mean (sigmoid = 1/2 + tanh(x/2)/2).
_CENTERED = frozenset({"sigmoid", "hardsigmoid"})
_KINKS: dict[str, tuple[float, ...]] = {
    "relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "prelu": (0.0,),
    "rrelu": (0.0,), "elu": (0.0,), "celu": (0.0,), "selu": (0.0,),
    "hardtanh": (-1.0, 1.0), "hardswish": (-3.0, 3.0), "hardsigmoid": (-3.0, 3.0),
}


def _phi(name: str, param: Any) -> Callable[[Tensor], Tensor]:
    """The activation ``name`` (with its parameter) as a function of a tensor."""
    table: dict[str, Callable[[Tensor], Tensor]] = {
        "relu": F.relu,
        "relu6": F.relu6,
        "leaky_relu": lambda x: F.leaky_relu(x, 0.01 if param is None else float(param)),
        "prelu": lambda x: F.leaky_relu(x, 0.25 if param is None else float(param)),
        "rrelu": lambda x: F.leaky_relu(x, 0.2292 if param is None else float(param)),
        "elu": lambda x: F.elu(x, 1.0 if param is None else float(param)),
        "celu": lambda x: F.celu(x, 1.0 if param is None else float(param)),
        "selu": F.selu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "mish": F.mish,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "softplus": lambda x: F.softplus(x, *(param or (1.0, 20.0))),
        "hardtanh": lambda x: F.hardtanh(x, *(param or (-1.0, 1.0))),
        "hardswish": F.hardswish,
        "hardsigmoid": F.hardsigmoid,
        "softsign": F.softsign,
        "logsigmoid": F.logsigmoid,
        "tanhshrink": F.tanhshrink,
    }
    if name not in table:
        raise ValueError(f"activation must be one of {sorted(table)}, got {name!r}")
    return table[name]


@lru_cache(maxsize=4)
def _legendre(n: int = 24) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights on [-1, 1] (Golub–Welsch, float64)."""
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k * k - 1)
    nodes, vecs = torch.linalg.eigh(torch.diag(beta, 1) + torch.diag(beta, -1))
    return nodes, 2 * vecs[0] ** 2


@lru_cache(maxsize=1024)
def _moments(name: str, param: Any, q: float) -> tuple[float, float, float]:
    """``(E[phi(x)^2], E[phi(x)], E[phi'(x)^2])`` for ``x ~ N(0, q)``, by quadrature."""
    phi = _phi(name, param)
    s = math.sqrt(q)
    kinks = _KINKS.get(name, ())
    if name == "hardtanh" and param:
        kinks = tuple(float(v) for v in param)
    cuts = {float(i) for i in range(-10, 11)} | {k / s for k in kinks if abs(k / s) < 10}
    cuts_sorted = sorted(cuts)
    x, w = _legendre()
    zs, ws = [], []
    for a, b in itertools.pairwise(cuts_sorted):
        if b - a > 1e-12:
            zs.append((b - a) / 2 * x + (a + b) / 2)
            ws.append(w * (b - a) / 2)
    z = torch.cat(zs)
    wt = torch.cat(ws) * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    with torch.enable_grad():
        u = (s * z).requires_grad_(True)
        y = phi(u)
        (d,) = torch.autograd.grad(y.sum(), u)
    y = y.detach()
    return float((wt * y * y).sum()), float((wt * y).sum()), float((wt * d * d).sum())


def _q_slope(name: str, param: Any) -> float:
    """Slope d log q'/d log q of the variance map at its fixed point q = 1."""
    h = 1e-3
    m_hi = _moments(name, param, 1 + h)[0]
    m_lo = _moments(name, param, 1 - h)[0]
    return (math.log(m_hi) - math.log(m_lo)) / (math.log(1 + h) - math.log(1 - h))


@lru_cache(maxsize=64)
def _unstable(name: str, param: Any) -> bool:
    """True for activations whose variance map has no stable fixed point (GELU, SiLU, Mish)."""
    if name in RELU_FAMILY or name in _CENTERED:
        return False
    return _q_slope(name, param) > 1.0 + 1e-3


def _activation_spec(activation: str | nn.Module) -> tuple[str, Any]:
    if isinstance(activation, nn.Module):
        spec = activation_of_module(activation)
        if spec is None:
            raise ValueError(f"activation: {type(activation).__name__} is not a known activation")
        return spec
    if not isinstance(activation, str):
        raise TypeError(
            f"activation must be a name or an nn.Module, got {type(activation).__name__}"
        )
    name = activation.lower()
    _phi(name, None)  # raises ValueError for unknown names
    return name, None


def activation_gain(
    activation: str | nn.Module, q: float = 1.0, *, criterion: str = "variance"
) -> float:
    """The weight gain for a layer fed by ``activation``, computed numerically.

    For pre-activations ``z ~ N(0, q)`` feeding ``phi`` and weights of variance
    ``gain^2 / fan_in``:

    * ``criterion="variance"``: the gain that keeps the second moment of the
      pre-activation fixed, ``gain = sqrt(q / E[phi(z)^2])`` (He's argument; ``sqrt(2)``
      for ReLU, ``1`` for SELU, ``1.5925`` for tanh, close to torch's 5/3);
    * ``criterion="critical"``: the gain that makes the layer's squared-gradient
      multiplier ``chi_1 = gain^2 E[phi'(z)^2]`` equal to 1 (edge of chaos).

    Expectations are Gauss–Legendre quadratures (deterministic, no random numbers).

    Args:
        activation: a name (``"relu"``, ``"gelu"``, ``"silu"``, ``"elu"``, ``"mish"``,
            ``"tanh"``, ...) or an activation module (``nn.LeakyReLU(0.2)``).
        q: the second moment of the pre-activation (> 0).
        criterion: ``"variance"`` or ``"critical"``.

    Returns:
        The gain as a float.

    Raises:
        ValueError: unknown activation or criterion, or ``q <= 0``.

    References:
        He et al. 2015; Poole et al. 2016; Schoenholz et al. 2017.

    Example:
        >>> import gradguard.init as gi
        >>> round(gi.activation_gain("relu"), 4), round(gi.activation_gain("gelu"), 4)
        (1.4142, 1.5335)
    """
    name, param = _activation_spec(activation)
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not q > 0 or math.isinf(q):
        raise ValueError(f"q must be a finite number > 0, got {q!r}")
    m2, _, d2 = _moments(name, param, float(q))
    if criterion == "variance":
        return math.sqrt(q / m2)
    if criterion == "critical":
        return 1.0 / math.sqrt(d2)
    raise ValueError(f"criterion must be 'variance' or 'critical', got {criterion!r}")


# --------------------------------------------------------------------------------------
# Module and function classification
# --------------------------------------------------------------------------------------

ATOMIC = (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)
_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_PASS = (
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
_CONV = (nn.modules.conv._ConvNd,)
_PASS_FUNCS = frozenset({
    "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout", "dropout1d",
    "dropout2d", "dropout3d", "view", "view_as", "reshape", "reshape_as", "flatten",
    "unflatten", "permute", "transpose", "transpose_", "t", "contiguous", "squeeze",
    "unsqueeze", "clone", "to", "float", "double", "half", "bfloat16", "type_as",
    "__getitem__", "narrow", "select", "expand", "expand_as", "max_pool1d", "max_pool2d",
    "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "pad",
    "mean", "chunk", "split", "unbind",
})
_NORM_FUNCS = frozenset({
    "layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "normalize",
})
_ADD_FUNCS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})


def activation_of_module(m: nn.Module) -> tuple[str, Any] | None:
    """``(name, parameter)`` of an activation module, or None if ``m`` is not one."""
    if isinstance(m, nn.ReLU):
        return "relu", None
    if isinstance(m, nn.ReLU6):
        return "relu6", None
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", float(m.negative_slope)
    if isinstance(m, nn.PReLU):
        return "prelu", float(m.weight.detach().float().mean())
    if isinstance(m, nn.RReLU):
        return "rrelu", (m.lower + m.upper) / 2
    if isinstance(m, nn.Hardtanh):
        return "hardtanh", (float(m.min_val), float(m.max_val))
    simple: dict[type, str] = {
        nn.SELU: "selu", nn.SiLU: "silu", nn.Mish: "mish", nn.Tanh: "tanh",
        nn.Sigmoid: "sigmoid", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
        nn.Softsign: "softsign", nn.LogSigmoid: "logsigmoid", nn.Tanhshrink: "tanhshrink",
    }
    for t, name in simple.items():
        if isinstance(m, t):
            return name, None
    if isinstance(m, nn.ELU):
        return "elu", float(m.alpha)
    if isinstance(m, nn.CELU):
        return "celu", float(m.alpha)
    if isinstance(m, nn.GELU):
        return ("gelu_tanh" if m.approximate == "tanh" else "gelu"), None
    if isinstance(m, nn.Softplus):
        return "softplus", (float(m.beta), float(m.threshold))
    return None


def _arg(args: tuple, kwargs: Mapping[str, Any], i: int, key: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def _activation_of_call(
    name: str, args: tuple, kwargs: Mapping[str, Any]
) -> tuple[str, Any] | None:
    """``(name, parameter)`` of a functional activation call, or None."""
    base = name.rstrip("_")
    if base in ("relu", "selu", "silu", "mish", "tanh", "sigmoid", "relu6", "hardswish",
                "hardsigmoid", "softsign", "logsigmoid", "tanhshrink"):
        return base, None
    if base == "leaky_relu":
        return base, float(_arg(args, kwargs, 1, "negative_slope", 0.01))
    if base in ("elu", "celu"):
        return base, float(_arg(args, kwargs, 1, "alpha", 1.0))
    if base == "gelu":
        return ("gelu_tanh" if kwargs.get("approximate") == "tanh" else "gelu"), None
    if base == "softplus":
        return base, (float(_arg(args, kwargs, 1, "beta", 1.0)),
                      float(_arg(args, kwargs, 2, "threshold", 20.0)))
    if base == "hardtanh":
        return base, (float(_arg(args, kwargs, 1, "min_val", -1.0)),
                      float(_arg(args, kwargs, 2, "max_val", 1.0)))
    if base == "prelu":
        w = _arg(args, kwargs, 1, "weight", None)
        return base, (float(w.detach().float().mean()) if isinstance(w, Tensor) else 0.25)
    return None


def module_kind(m: nn.Module) -> str:
    """``"act"``, ``"norm"``, ``"pass"``, ``"param"`` or ``"other"``."""
    if activation_of_module(m) is not None:
        return "act"
    if isinstance(m, _NORMS):
        return "norm"
    if isinstance(m, _PASS):
        return "pass"
    if isinstance(m, ATOMIC) or any(True for _ in m.parameters(recurse=False)):
        return "param"
    return "other"


def select_modules(
    model: nn.Module, types: tuple[type, ...] | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules a trace records: leaves and atomic modules, or instances of ``types``.

    Atomic modules (``nn.MultiheadAttention``, RNNs) use their children's parameters
    without calling them, so they are recorded as one unit. Nothing inside a selected
    module is selected again.
    """
    chosen: list[tuple[str, nn.Module]] = []
    covered: list[str] = []
    for name, m in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered if c != "") or (
            "" in covered and name != ""
        ):
            continue
        if types is not None:
            hit = isinstance(m, types)
        else:
            hit = isinstance(m, ATOMIC) or next(m.children(), None) is None
        if hit:
            chosen.append((name, m))
            covered.append(name)
    return chosen


# --------------------------------------------------------------------------------------
# Inputs, isolation
# --------------------------------------------------------------------------------------


def as_batches(example_inputs: Any, n_batches: int,
               name: str = "example_inputs") -> list[tuple[tuple, dict]]:
    """Turn ``example_inputs`` into up to ``n_batches`` ``(args, kwargs)`` calls.

    A Tensor is one positional argument, a tuple is the positional arguments, a dict the
    keyword arguments; a list or any other iterable (a DataLoader) is a sequence of such
    batches. With one batch and ``n_batches > 1`` the batch is reused (fresh random
    cotangents and dropout masks each time). ``name`` is the argument's name in errors.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be an int >= 1, got {n_batches!r}")

    def one(b: Any) -> tuple[tuple, dict]:
        if isinstance(b, Tensor):
            return (b,), {}
        if isinstance(b, tuple):
            return b, {}
        if isinstance(b, Mapping):
            return (), dict(b)
        raise TypeError(
            f"{name} must be a Tensor, a tuple of positional arguments, a dict of "
            f"keyword arguments, or an iterable of those; got {type(b).__name__}"
        )

    if isinstance(example_inputs, (Tensor, tuple, Mapping)):
        return [one(example_inputs)] * n_batches
    if isinstance(example_inputs, (str, bytes)) or not isinstance(example_inputs, Iterable):
        raise TypeError(
            f"{name} must be a Tensor, a tuple, a dict or an iterable of batches, "
            f"got {type(example_inputs).__name__}"
        )
    batches = []
    for b in example_inputs:
        if isinstance(b, list):
            b = tuple(b)
        batches.append(one(b))
        if len(batches) == n_batches:
            break
    if not batches:
        raise ValueError(f"{name} is an empty iterable")
    return batches


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in a (nested) output structure, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _devices(model: nn.Module) -> list[int]:
    return sorted({
        t.device.index or 0
        for t in list(model.parameters()) + list(model.buffers())
        if t.device.type == "cuda"
    })


@contextlib.contextmanager
def isolated(model: nn.Module, *, train: bool = True, seed: int = 0) -> Iterator[None]:
    """Run ``model`` without side effects on its buffers, modes or the global RNG.

    Buffers (BatchNorm running statistics, counters) are copied and restored, every
    module's ``training`` flag is restored, and the CPU and CUDA RNGs of the model's
    devices are forked and seeded with ``seed`` (dropout masks are reproducible and the
    caller's random stream is untouched).
    """
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = _devices(model)
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(seed)
        model.train(train)
        try:
            yield
        finally:
            for m, flag in modes:
                m.training = flag
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)


# --------------------------------------------------------------------------------------
# The tracer: execution order, activations around each layer, residual branches
# --------------------------------------------------------------------------------------


@dataclass
class Rec:
    """One call of a recorded module, or one functional activation."""

    index: int
    name: str
    type: str
    kind: str  # "param" | "act" | "norm" | "pass" | "other"
    module: nn.Module | None = None
    act: str | None = None
    act_param: Any = None
    src: int | None = None  # act: the record whose output it activates
    feed: int | None = None  # param: the act record whose output feeds it
    follow: int | None = None  # param: the act record applied to its output
    from_input: bool = False  # param: fed by the model input (through pass-through ops)
    normed_input: bool = False  # param: fed by a normalisation layer
    in_nodes: tuple[int, ...] = ()
    out_node: int = -1
    # measured on the batch (acts: the input z and output y; params: the input)
    q_in: float | None = None  # E[z^2] (act) or E[x^2] (param)
    dphi2: float | None = None  # E[phi'(z)^2] (act)
    residual_out: bool = False  # its output is added to a residual stream


@dataclass
class _Prov:
    node: int
    src: int | None = None  # last param record reached through pass-through ops
    act: int | None = None  # act record whose output this is (through pass-through ops)
    normed: bool = False
    from_input: bool = False
    norm: int | None = None  # the normalisation record it last passed through


@dataclass
class Residual:
    """A residual addition ``skip + branch`` found by the tracer."""

    skip_node: int
    branch_node: int
    out_layer: int | None  # the param record whose output the branch ends with
    via_act: bool = False
    normed: bool = False
    members: list[int] = field(default_factory=list)
    root_node: int = -1  # where the branch starts (the skip, or a projection's input)


class Tracer(TorchFunctionMode):
    """Records the execution of a model: one :class:`Rec` per recorded module call and per
    functional activation, a value graph for residual detection, and measured statistics.

    Subclasses hook :meth:`tap_inputs` (replace a record's inputs), :meth:`on_output` and
    :meth:`on_param_start` (before a parametrised module runs).
    """

    def __init__(self, model: nn.Module, modules: tuple[type, ...] | None = None) -> None:
        super().__init__()
        self.model = model
        self.selected = select_modules(model, modules)
        self.recs: list[Rec] = []
        self.residuals: list[Residual] = []
        self.prov: dict[int, _Prov] = {}
        self.keep: list[Tensor] = []
        self.parents: list[tuple[int, ...]] = []
        self._depth = 0
        self._quiet = 0
        self._scope: list[str] = []
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._open: dict[int, list[Rec]] = {}

    # -- graph -------------------------------------------------------------------------
    def _node(self, parents: Iterable[int]) -> int:
        self.parents.append(tuple(parents))
        return len(self.parents) - 1

    def _set(self, t: Tensor, prov: _Prov) -> None:
        self.prov[id(t)] = prov
        self.keep.append(t)

    def _get(self, t: Any) -> _Prov | None:
        return self.prov.get(id(t)) if isinstance(t, Tensor) else None

    def is_ancestor(self, a: int, b: int) -> bool:
        """Whether value node ``a`` is an ancestor of (or equal to) node ``b``."""
        if a == b:
            return True
        seen, stack = set(), [b]
        while stack:
            n = stack.pop()
            for p in self.parents[n]:
                if p == a:
                    return True
                if p > a and p not in seen:  # ancestors are always created earlier
                    seen.add(p)
                    stack.append(p)
        return False

    def add_input(self, t: Tensor) -> None:
        self._set(t, _Prov(self._node(()), from_input=True))

    # -- context -----------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        chosen = {id(m) for _, m in self.selected}
        for name, m in self.model.named_modules():
            if id(m) in chosen:
                self._handles.append(m.register_forward_pre_hook(
                    self._make_pre(name), with_kwargs=True))
                self._handles.append(m.register_forward_hook(
                    self._make_post(name), with_kwargs=True, always_call=True))
            else:
                self._handles.append(m.register_forward_pre_hook(self._make_scope_pre(name)))
                self._handles.append(m.register_forward_hook(
                    self._make_scope_post(), always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_scope_pre(self, name: str) -> Callable:
        def pre(module: nn.Module, args: tuple) -> None:
            if not self._depth:
                self._scope.append(name)

        return pre

    def _make_scope_post(self) -> Callable:
        def post(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._depth and self._scope:
                self._scope.pop()

        return post

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Our own computations: not traced (and no interception overhead)."""
        self._quiet += 1
        try:
            with torch._C.DisableTorchFunction():
                yield
        finally:
            self._quiet -= 1

    # -- records -------------------------------------------------------------------------
    def _new_rec(self, name: str, type_: str, kind: str, module: nn.Module | None) -> Rec:
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        rec = Rec(len(self.recs), name if k == 0 else f"{name}#{k + 1}", type_, kind, module)
        self.recs.append(rec)
        return rec

    def _link_inputs(self, rec: Rec, tensors: list[Tensor]) -> _Prov | None:
        provs = [p for p in (self._get(t) for t in tensors) if p is not None]
        rec.in_nodes = tuple(p.node for p in provs)
        first = self._get(next((t for t in tensors if t.is_floating_point()), None))
        if first is None:
            return None
        if rec.kind == "act":
            rec.src = first.src
            if first.src is not None and self.recs[first.src].follow is None:
                self.recs[first.src].follow = rec.index
        elif rec.kind == "param":
            rec.feed = first.act
            rec.from_input = first.from_input
            rec.normed_input = first.normed
        return first

    def _out_prov(self, rec: Rec, first: _Prov | None) -> _Prov:
        node = self._node(rec.in_nodes)
        rec.out_node = node
        if rec.kind == "param" or rec.kind == "other":
            return _Prov(node, src=rec.index if rec.kind == "param" else None)
        if rec.kind == "act":
            return _Prov(node, act=rec.index)
        f = first or _Prov(node)
        if rec.kind == "norm":
            return _Prov(node, src=f.src, normed=True, norm=rec.index)
        return _Prov(node, src=f.src, act=f.act, normed=f.normed, from_input=f.from_input,
                     norm=f.norm)

    def _act_stats(self, rec: Rec, z: Tensor) -> None:
        with self.quiet(), torch.no_grad():
            zf = z.detach().float()
            rec.q_in = float(zf.pow(2).mean()) if zf.numel() else 0.0
            with torch.enable_grad():
                u = zf.clone().requires_grad_(True)
                (d,) = torch.autograd.grad(_phi(rec.act or "", rec.act_param)(u).sum(), u)
            rec.dphi2 = float(d.pow(2).mean()) if d.numel() else 0.0

    def _make_pre(self, name: str) -> Callable:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if self._depth:
                self._depth += 1
                return None
            kind = module_kind(module)
            rec = self._new_rec(name, type(module).__name__, kind, module)
            if kind == "act":
                rec.act, rec.act_param = activation_of_module(module)  # type: ignore[misc]
            tensors = _tensors(args) + _tensors(kwargs)
            first = self._link_inputs(rec, tensors)
            self._open.setdefault(id(module), []).append(rec)
            rec._first = first  # type: ignore[attr-defined]
            x = next((t for t in tensors if t.is_floating_point()), None)
            with self.quiet():
                if x is not None:
                    if kind == "act":
                        self._act_stats(rec, x)
                    else:
                        rec.q_in = float(x.detach().float().pow(2).mean()) if x.numel() else 0.0
                if kind == "param":
                    self.on_param_start(rec, x)
                new = self.tap_inputs(rec, args, kwargs)
            self._depth += 1
            return new

        return pre

    def _make_post(self, name: str) -> Callable:
        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._depth -= 1
            if self._depth:
                return None
            stack = self._open.get(id(module))
            if not stack:
                return None
            rec = stack.pop()
            prov = self._out_prov(rec, rec._first)  # type: ignore[attr-defined]
            outs = _tensors(output)
            for t in outs:
                self._set(t, prov)
            with self.quiet():
                self.on_output(rec, outs)
            return None

        return post

    # -- function interception ---------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._depth or self._quiet:
            return func(*args, **kwargs)
        fname = getattr(func, "__name__", "")
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.is_floating_point() and self._get(x) is not None:
            spec = _activation_of_call(fname, args, kwargs)
            if spec is not None:
                return self._functional_activation(func, fname, spec, args, kwargs)
        out = func(*args, **kwargs)
        self._quiet += 1
        try:
            self._after(fname, args, kwargs, out)
        finally:
            self._quiet -= 1
        return out

    def _functional_activation(self, func: Any, fname: str, spec: tuple[str, Any],
                               args: tuple, kwargs: dict) -> Any:
        scope = self._scope[-1] if self._scope else ""
        label = f"{scope}.{spec[0]}" if scope else spec[0]
        rec = self._new_rec(label, f"F.{fname}", "act", None)
        rec.act, rec.act_param = spec
        x = args[0]
        first = self._link_inputs(rec, [x])
        with self.quiet():
            self._act_stats(rec, x)
            inplace = fname.endswith("_") or bool(kwargs.get("inplace", False))
            new_args = args if inplace else self.tap_inputs(rec, args, kwargs)[0]
        out = func(*new_args, **kwargs)
        prov = self._out_prov(rec, first)
        self._set(out, prov)
        with self.quiet():
            self.on_output(rec, [out])
        return out

    def _after(self, fname: str, args: tuple, kwargs: dict, out: Any) -> None:
        ins = [t for t in _tensors(args) + _tensors(kwargs) if isinstance(t, Tensor)]
        provs = [self._get(t) for t in ins]
        tracked = [(t, p) for t, p in zip(ins, provs, strict=True) if p is not None]
        outs = [t for t in _tensors(out) if isinstance(t, Tensor)]
        if not tracked or not outs:
            return
        node = self._node(p.node for _, p in tracked)
        first = tracked[0][1]
        if fname in _PASS_FUNCS:
            prov = _Prov(node, first.src, first.act, first.normed, first.from_input, first.norm)
        elif fname in _NORM_FUNCS:
            prov = _Prov(node, first.src, normed=True)
        else:
            prov = _Prov(node)
            if fname in _ADD_FUNCS and len(tracked) == 2:
                self._residual(tracked[0], tracked[1])
        for t in outs:
            self._set(t, prov)

    def _residual(self, a: tuple[Tensor, _Prov], b: tuple[Tensor, _Prov]) -> None:
        (ta, pa), (tb, pb) = a, b
        if ta.shape != tb.shape:
            return
        root = -1
        if self.is_ancestor(pa.node, pb.node):
            skip, branch = pa, pb
        elif self.is_ancestor(pb.node, pa.node):
            skip, branch = pb, pa
        else:  # projection shortcut: skip = proj(x) with x an ancestor of the branch
            skip = branch = None
            for u, v in ((pa, pb), (pb, pa)):
                hits = [n for n in (self.recs[u.src].in_nodes if u.src is not None else ())
                        if self.is_ancestor(n, v.node)]
                if hits:
                    skip, branch, root = u, v, hits[0]
                    break
            if skip is None or branch is None:
                return
        out, via_act = branch.src, False
        if branch.normed:  # the branch ends in a norm (BN ResNets): its affine is the scale
            out = branch.norm
        elif out is None and branch.act is not None:
            out, via_act = self.recs[branch.act].src, True
        self.residuals.append(Residual(skip.node, branch.node, out, via_act, branch.normed,
                                       root_node=root if root >= 0 else skip.node))
        if out is not None:
            self.recs[out].residual_out = True

    def branch_members(self) -> None:
        """Fill each residual's ``members``: param records between its skip and its end."""
        for r in self.residuals:
            r.members = [
                rec.index for rec in self.recs
                if rec.kind == "param" and rec.out_node >= 0
                and self.is_ancestor(rec.out_node, r.branch_node)
                and any(self.is_ancestor(r.root_node, n) for n in rec.in_nodes)
            ]

    def branch_records(self) -> tuple[dict[int, int], set[int]]:
        """``(branch, internal)``: record index -> residual index for every record on a
        residual branch (its outputs are branch values, not the stream), and the records
        strictly before each branch's last layer (their gradients are the branch's)."""
        branch: dict[int, int] = {}
        internal: set[int] = set()
        for k, r in enumerate(self.residuals):
            for rec in self.recs:
                if rec.out_node < 0 or rec.index in branch:
                    continue
                if self.is_ancestor(rec.out_node, r.branch_node) and any(
                    self.is_ancestor(r.root_node, n) for n in rec.in_nodes
                ):
                    branch[rec.index] = k
                    if r.out_layer is not None and rec.index < r.out_layer:
                        internal.add(rec.index)
        return branch, internal

    # -- extension points ----------------------------------------------------------------
    def tap_inputs(self, rec: Rec, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None if rec.module is not None else (args, kwargs)

    def on_output(self, rec: Rec, outs: list[Tensor]) -> None:
        pass

    def on_param_start(self, rec: Rec, x: Tensor | None) -> None:
        pass


def call_model(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    return model(*args, **kwargs)


def static_records(model: nn.Module) -> list[Rec]:
    """Records in module registration order, linked as if the model were a Sequential."""
    recs: list[Rec] = []
    last_param: int | None = None
    last_act: int | None = None
    for name, m in select_modules(model):
        kind = module_kind(m)
        rec = Rec(len(recs), name, type(m).__name__, kind, m)
        if kind == "act":
            rec.act, rec.act_param = activation_of_module(m)  # type: ignore[misc]
            rec.src = last_param
            if last_param is not None and recs[last_param].follow is None:
                recs[last_param].follow = rec.index
            last_act, last_param = rec.index, None
        elif kind == "param":
            rec.feed = last_act
            rec.from_input = last_act is None and not any(r.kind == "param" for r in recs)
            last_param, last_act = rec.index, None
        elif kind == "other":
            last_param = last_act = None
        recs.append(rec)
    return recs


# --------------------------------------------------------------------------------------
# Drawing weights
# --------------------------------------------------------------------------------------


def fan_in(w: Tensor, module: nn.Module | None = None) -> int:
    """Inputs per output unit: ``in_features``, ``in_channels/groups * prod(kernel)``."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        stride = math.prod(module.stride)
        return max(1, w.shape[0] // module.groups * math.prod(w.shape[2:]) // stride)
    return max(1, math.prod(w.shape[1:])) if w.ndim >= 2 else max(1, w.numel())


def _draw(shape: tuple[int, ...], dist: str, gain: float, fan: int,
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


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


@dataclass
class InitEntry:
    """What :func:`init_model` did to one module."""

    name: str
    type: str
    action: str
    gain: float | None = None


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


# --------------------------------------------------------------------------------------
# init_model
# --------------------------------------------------------------------------------------

_HANDLED = (nn.Linear, *_CONV, *ATOMIC, *_NORMS, nn.Embedding, nn.EmbeddingBag,
            nn.PReLU)


class _Planner:
    """Chooses and applies weights, layer by layer (shared by the static and traced paths)."""

    def __init__(self, recs: list[Rec], scheme: str, gen: torch.Generator, report: InitReport,
                 data_driven: bool) -> None:
        self.recs = recs
        self.scheme = scheme
        self.gen = gen
        self.report = report
        self.data_driven = data_driven
        self.q_out: dict[int, float] = {}  # mean-field pre-activation second moments
        self.scale: dict[int, tuple[float, str]] = {}  # residual factor per record
        self.member_scale: dict[int, tuple[float, str]] = {}
        self.done: set[int] = set()
        self.done_modules: set[int] = set()
        self.done_params: set[int] = set()  # ids of parameters already claimed by a module
        self.live: list[Rec] | None = None  # records of the pass being initialised

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
            if feed is not None and feed.act in _CENTERED:
                dims = [d for d in range(xf.ndim) if d != _feature_dim(rec, xf)]
                xf = xf - xf.mean(dim=dims, keepdim=True)
            m_in = float(xf.pow(2).mean()) if xf.numel() else 1.0
            return max(m_in, 1e-12), (feed.dphi2 if feed else None), (
                feed.q_in if feed and feed.q_in else 1.0)
        if feed is None or feed.act is None:
            return 1.0, None, 1.0
        q = self.q_out.get(feed.src, 1.0) if feed.src is not None else 1.0
        m2, mean, d2 = _moments(feed.act, feed.act_param, q)
        if feed.act in _CENTERED:
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
            if _unstable(fd, feed.act_param):
                return ("orthogonal", math.sqrt(1.0 / m_in),
                        f"orthogonal, variance-preserving for {fd} (no stable fixed point: "
                        "pre-activation second moment pinned to 1)")
            if d2 is None or d2 <= 0:
                return "orthogonal", 1.0, f"orthogonal gain 1 after {fd}"
            centre = " with mean-centring bias" if fd in _CENTERED else ""
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
            self.report.entries.append(InitEntry(rec.name, type(m).__name__, f"kept: {why}"))
            return
        keep = [(p, p.detach().clone()) for p in params if id(p) in frozen | tied]
        n_before = len(self.report.entries)
        try:
            self._init_module(rec, m, x, lsuv)
        finally:
            with torch.no_grad():  # what must not change is put back
                for p, saved in keep:
                    p.copy_(saved)
        if keep and len(self.report.entries) > n_before:
            self.report.entries[-1].action += (
                f"; {len(keep)} frozen or tied parameter(s) kept")

    def _init_module(self, rec: Rec, m: nn.Module, x: Tensor | None, lsuv: bool) -> None:
        n_before = len(self.report.entries)
        if isinstance(m, (nn.Linear, *_CONV)):
            self._init_linear(rec, x)
            if lsuv and x is not None:
                self._lsuv(rec, x)
        elif isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            self._init_rnn(rec.name, m)
        elif isinstance(m, nn.MultiheadAttention):
            self._init_mha(rec, m)
        elif isinstance(m, _NORMS):
            with torch.no_grad():
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(w, Tensor):
                    w.fill_(1.0)
                if isinstance(b, Tensor):
                    b.zero_()
            self.report.entries.append(InitEntry(rec.name, type(m).__name__,
                                                 "weight 1, bias 0"))
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag, nn.PReLU)):
            self.report.entries.append(InitEntry(rec.name, type(m).__name__,
                                                 "kept (default init)"))
        if len(self.report.entries) == n_before:
            return  # not a handled type: reported by _report_unhandled
        entry = self.report.entries[-1]
        if rec.index in self.member_scale:
            f, why = self.member_scale[rec.index]
            self._scale_module(m, f)
            entry.action += f"; x{f:.3g} ({why})"
        if rec.index in self.scale:
            f, why = self.scale[rec.index]
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
                entry = self.report.entries[-1]
                entry.gain = f
                entry.action = "LSUV: orthogonal, output variance 1 on the batch"

    def _init_linear(self, rec: Rec, x: Tensor | None) -> None:
        m = rec.module
        assert m is not None
        w: Tensor = m.weight  # type: ignore[assignment]
        fan = fan_in(w, m)
        dist, gain, desc = self._linear_rule(rec, x)
        if dist == "xavier":
            fan_out = w.shape[0] * (math.prod(w.shape[2:]) if w.ndim > 2 else 1)
            value = torch.randn(tuple(w.shape), generator=self.gen) * math.sqrt(
                2.0 / (fan + fan_out))
        else:
            value = _draw(tuple(w.shape), dist, gain, fan, self.gen)
        _assign(w, value)
        bias = getattr(m, "bias", None)
        if isinstance(bias, Tensor):
            with torch.no_grad():
                bias.zero_()
                feed = self._feed(rec)
                if self.scheme == "auto" and feed is not None and feed.act in _CENTERED:
                    mean = self._input_mean(rec, x, feed)
                    if mean is not None:
                        bias.copy_(-_apply_weight(m, mean).to(bias.dtype))
        elif self.scheme == "auto" and (f := self._feed(rec)) and f.act in _CENTERED:
            self.report.notes.append(f"{rec.name}: no bias, so the mean of {f.act} is not removed")
        m_in, _, _ = self._feed_stats(rec, x)
        self.q_out[rec.index] = gain * gain * m_in
        self.report.entries.append(InitEntry(rec.name, type(m).__name__, desc, gain))

    def _input_mean(self, rec: Rec, x: Tensor | None, feed: Rec) -> Tensor | None:
        m = rec.module
        assert m is not None
        w: Tensor = m.weight  # type: ignore[assignment]
        if self.data_driven and x is not None:
            xf = x.detach().float()
            d = _feature_dim(rec, xf)
            dims = [i for i in range(xf.ndim) if i != d]
            return xf.mean(dim=dims)
        q = self.q_out.get(feed.src, 1.0) if feed.src is not None else 1.0
        _, mean, _ = _moments(feed.act or "", feed.act_param, q)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            n_in = w.shape[0]  # weight (in, out/groups, k...)
        else:
            n_in = w.shape[1] * (m.groups if isinstance(m, _CONV) else 1)
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
                    parts.append(_draw(shape, "normal", math.sqrt(2), fan, self.gen))
                elif self.scheme == "xavier" or (
                    self.scheme in ("auto", "lsuv") and not pname.startswith("weight_hh")
                ):
                    parts.append(torch.randn(shape, generator=self.gen)
                                 * math.sqrt(2.0 / (fan + rows)))
                else:
                    parts.append(_draw(shape, "orthogonal", 1.0, fan, self.gen))
            _assign(p, torch.cat(parts))
        desc = {"auto": "per-gate: orthogonal recurrent blocks (gain 1), Xavier input blocks",
                "lsuv": "per-gate: orthogonal recurrent blocks (gain 1), Xavier input blocks",
                "orthogonal": "per-gate orthogonal blocks (gain 1)",
                "he": "per-gate He blocks", "xavier": "per-gate Xavier blocks"}[self.scheme]
        if gates == 4:
            desc += ", forget-gate bias 1, other biases 0"
        else:
            desc += ", biases 0"
        self.report.entries.append(InitEntry(name, type(m).__name__, desc))

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
        self.report.entries.append(InitEntry(
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
                self.report.residual == "deepnorm"
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
    w = m.weight.detach().float()  # type: ignore[union-attr]
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


def _feature_dim(rec: Rec, x: Tensor) -> int:
    if isinstance(rec.module, _CONV) and x.ndim >= 3:
        return 1
    return x.ndim - 1


def _slope(act: Rec | None) -> float:
    if act is None or act.act == "relu" or act.act == "relu6":
        return 0.0
    return float(act.act_param or 0.0)


class _InitTracer(Tracer):
    """Initialises each parametrised module just before it runs, from its actual input."""

    def __init__(self, model: nn.Module, planner: _Planner, names: list[str]) -> None:
        super().__init__(model)
        self.planner = planner
        self.names = names

    def on_param_start(self, rec: Rec, x: Tensor | None) -> None:
        if rec.index >= len(self.names) or self.names[rec.index] != rec.name:
            raise RuntimeError(
                "init_model: the model took a different path on the second pass over `data` "
                f"(record {rec.index} is {rec.name!r}); data-dependent control flow is not "
                "supported, pass data=None for a static initialisation")
        planned = self.planner.recs[rec.index]
        planned.module = rec.module
        self.planner.live = self.recs
        self.planner.init_record(planned, x, lsuv=self.planner.scheme == "lsuv")


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

    # 1. structure
    residuals: list[Residual] = []
    if batch is not None:
        tracer = Tracer(model)
        with isolated(model, train=True, seed=seed), torch.no_grad(), tracer:
            _run(tracer, model, batch)
        tracer.branch_members()
        recs, residuals = tracer.recs, tracer.residuals
    else:
        recs = static_records(model)
        if scheme == "auto" and not any(r.kind == "act" for r in recs) and any(
            r.kind == "param" for r in recs[1:]
        ):
            report.notes.append(
                "no activation modules found in registration order: activations called as "
                "functions (F.relu) are only seen with data=<a batch>")
    # 2. residual scaling
    if residual == "auto":
        residual = "gpt2" if scheme == "auto" and residuals else None
    report.residual = residual
    report.n_residual_branches = len(residuals)
    planner = _Planner(recs, scheme, gen, report, data_driven=batch is not None)
    if residual is not None:
        _plan_residual(planner, residuals, residual, report)
    # 3. apply
    if batch is not None and scheme in ("auto", "lsuv"):
        tracer2 = _InitTracer(model, planner, [r.name for r in recs])
        with isolated(model, train=True, seed=seed), torch.no_grad(), tracer2:
            _run(tracer2, model, batch)
    for rec in recs:
        planner.init_record(rec, None)
    # modules the batch never reached: static rules in registration order
    srecs = static_records(model)
    leftovers = [r for r in srecs
                 if r.kind in ("param", "norm") and id(r.module) not in planner.done_modules]
    if leftovers:
        if batch is not None:
            report.notes.append(
                "not reached by the batch, initialised statically: "
                + ", ".join(r.name for r in leftovers))
        static = _Planner(srecs, scheme, gen, report, data_driven=False)
        static.done_modules = planner.done_modules
        static.done_params = planner.done_params
        for r in leftovers:
            static.init_record(static.recs[r.index], None)
    # 4. modules no rule covers
    _report_unhandled(model, report, strict)
    if scheme == "lsuv":
        from gradguard.probe import probe as _probe

        after = _probe(model, data, seed=seed)
        report.backward_check = {"verdict": after.verdict,
                                 "backward_gain": after.backward_gain}
        if after.verdict != "healthy":
            msg = (f"init_model('lsuv'): the forward pass is normalised but gradients are "
                   f"{after.verdict} (accumulated backward gain {after.backward_gain:.3g}); "
                   "use scheme='auto'")
            report.notes.append(msg)
            warnings.warn(msg, stacklevel=2)
    return report


def _run(tracer: Tracer, model: nn.Module, batch: tuple[tuple, dict]) -> Any:
    args, kwargs = batch
    args = tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args)
    kwargs = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
    for t in _tensors(args) + _tensors(kwargs):
        tracer.add_input(t)
    return call_model(model, args, kwargs)


def _plan_residual(planner: _Planner, residuals: list[Residual], kind: str,
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
                if i != r.out_layer and isinstance(mod, (nn.Linear, *_CONV)):
                    planner.member_scale[i] = (beta, "deepnorm beta")
        report.notes.append(
            f"deepnorm also needs the residual written as x * alpha + f(x) with alpha = "
            f"(2N)^(1/4) = {(2 * n) ** 0.25:.3g} (Post-LN); init_model cannot change forward()")


def _report_unhandled(model: nn.Module, report: InitReport, strict: bool) -> None:
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, ATOMIC):
            inside.append(name)
            continue
        own = [pn for pn, _ in m.named_parameters(recurse=False)]
        if not own or isinstance(m, _HANDLED):
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
