"""Activations and their mean-field moments: the maths behind the probe and ``init_model``.

For a layer ``z' = W phi(z)`` with weight variance ``g^2 / fan_in`` and ``u ~ N(0, 1)``
(Poole et al. 2016; Schoenholz et al. 2017):

* the second moment of the pre-activation maps as ``q' = g^2 E[phi(sqrt(q) u)^2]``;
* the squared gradient norm maps as ``chi_1 = g^2 E[phi'(sqrt(q) u)^2]``.

Gradients neither explode nor vanish with depth iff ``chi_1 = 1``. :func:`moments` computes
the three expectations by Gauss–Legendre quadrature (20 panels of 24 nodes on [-10, 10] plus
the kinks; no random numbers), :func:`activation_gain` turns them into a gain, and
:func:`activation_of_module` / :func:`activation_of_call` name the activation a module or a
functional call applies. Gains at ``q = 1``:

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
the forward variance but lets gradients grow by ``sqrt(1.17) = 1.08`` per layer. GELU, SiLU
and Mish have a variance map with *no stable fixed point* (:func:`is_unstable`).

References:
    He et al. 2015, "Delving deep into rectifiers". Poole et al. 2016, "Exponential
    expressivity in deep neural networks through transient chaos". Schoenholz et al. 2017,
    "Deep information propagation". Pennington, Schoenholz, Ganguli 2017, "Resurrecting the
    sigmoid in deep learning through dynamical isometry".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CENTERED",
    "RELU_FAMILY",
    "activation_gain",
    "activation_of_call",
    "activation_of_module",
    "activation_spec",
    "derivative_at_zero",
    "is_unstable",
    "moments",
    "phi",
    "variance_map_slope",
]


RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "prelu", "rrelu"})
# Activations whose mean is larger than their standard deviation: the next layer's bias
# removes the mean (sigmoid = 1/2 + tanh(x/2)/2).
CENTERED = frozenset({"sigmoid", "hardsigmoid"})
_KINKS: dict[str, tuple[float, ...]] = {
    "relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "prelu": (0.0,),
    "rrelu": (0.0,), "elu": (0.0,), "celu": (0.0,), "selu": (0.0,),
    "hardtanh": (-1.0, 1.0), "hardswish": (-3.0, 3.0), "hardsigmoid": (-3.0, 3.0),
}


def phi(name: str, param: Any) -> Callable[[Tensor], Tensor]:
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
def moments(name: str, param: Any, q: float) -> tuple[float, float, float]:
    """``(E[phi(x)^2], E[phi(x)], E[phi'(x)^2])`` for ``x ~ N(0, q)``, by quadrature."""
    fn = phi(name, param)
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
        y = fn(u)
        (d,) = torch.autograd.grad(y.sum(), u)
    y = y.detach()
    return float((wt * y * y).sum()), float((wt * y).sum()), float((wt * d * d).sum())


def variance_map_slope(name: str, param: Any) -> float:
    """Slope d log q'/d log q of the variance map at its fixed point q = 1."""
    h = 1e-3
    m_hi = moments(name, param, 1 + h)[0]
    m_lo = moments(name, param, 1 - h)[0]
    return (math.log(m_hi) - math.log(m_lo)) / (math.log(1 + h) - math.log(1 - h))


@lru_cache(maxsize=64)
def is_unstable(name: str, param: Any) -> bool:
    """True for activations whose variance map has no stable fixed point (GELU, SiLU, Mish)."""
    if name in RELU_FAMILY or name in CENTERED:
        return False
    return variance_map_slope(name, param) > 1.0 + 1e-3


def activation_spec(activation: str | nn.Module) -> tuple[str, Any]:
    """``(name, parameter)`` of an activation given by name or as a module.

    Raises:
        ValueError: an unknown name, or a module that is not an activation.
        TypeError: neither a string nor a module.
    """
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
    phi(name, None)  # raises ValueError for unknown names
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
        >>> import gradguard as gg
        >>> round(gg.activation_gain("relu"), 4), round(gg.activation_gain("gelu"), 4)
        (1.4142, 1.5335)
    """
    name, param = activation_spec(activation)
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not q > 0 or math.isinf(q):
        raise ValueError(f"q must be a finite number > 0, got {q!r}")
    m2, _, d2 = moments(name, param, float(q))
    if criterion == "variance":
        return math.sqrt(q / m2)
    if criterion == "critical":
        return 1.0 / math.sqrt(d2)
    raise ValueError(f"criterion must be 'variance' or 'critical', got {criterion!r}")


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


def activation_of_call(
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


def derivative_at_zero(name: str, param: Any = None) -> float:
    """``phi'(0)``: the slope of the activation at the origin (its gain on tiny signals)."""
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        (d,) = torch.autograd.grad(phi(name, param)(x).sum(), x)
    return float(d)
