"""What a module is, for signal propagation: an activation, a normalisation, a pass-through,
a parametrised layer, or something else; which modules a trace records; their fan-in.

torch's own classes are recognised by type. Modules of other libraries are recognised by
what they do, not by their class name, so that a new library needs no table:

* a parameterless leaf module that maps ``z`` elementwise like a known activation (to
  1e-4 on ``[-6, 6]``) is that activation (``transformers``' ``NewGELUActivation``,
  ``SiLUActivation``, ...), one that returns its input is a pass-through;
* a leaf module whose parameters are 1-D vectors of one size and whose output does not
  change when its input is scaled (by 3) is a normalisation (``LlamaRMSNorm``, T5's
  ``LayerNorm``, a channels-first ``LayerNorm2d``);
* a leaf module holding a 2-D ``weight`` (and a 1-D ``bias``) that computes ``x @ W + b``
  is a linear layer with a transposed weight (``transformers``' ``Conv1D``).

Each test runs the module's ``forward`` once on a small seeded input, without hooks, torch
function modes or gradients, with its buffers restored; the answer is cached per module.
Leaf modules with parameters that none of this explains are *unknown*
(:func:`is_understood`): the probe names them and lowers its confidence.

The tables also name the functional calls the tracer understands: pass-through functions
(views, dropout, pooling), functional normalisations and additions (candidate residuals).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.signal.activations import activation_of_module, phi

__all__ = [
    "ADD_FUNCS",
    "ATOMIC",
    "CONV",
    "EMBEDDINGS",
    "NORMS",
    "NORM_FUNCS",
    "PASS",
    "PASS_FUNCS",
    "activation_spec_of",
    "fan_in",
    "is_norm",
    "is_understood",
    "linear_layout",
    "module_kind",
    "select_modules",
]

ATOMIC = (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)
NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
PASS = (
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
CONV = (nn.modules.conv._ConvNd,)
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
PASS_FUNCS = frozenset({
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
NORM_FUNCS = frozenset({
    "layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "normalize",
})
ADD_FUNCS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})


# activations tried, in this order, on parameterless modules of unknown type
_ACTIVATION_CANDIDATES = (
    "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "elu", "selu", "celu",
    "softplus", "mish", "hardswish", "hardsigmoid", "relu6", "leaky_relu", "hardtanh",
    "softsign", "logsigmoid", "tanhshrink",
)
_IDENTITY = ("identity", None)
_behaviour: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def _run_alone(m: nn.Module, x: Tensor) -> Tensor | None:
    """``m.forward(x)`` with no hooks, no torch function mode (the tracer's), no autograd,
    the module's buffers restored; None if it fails or returns something else."""
    buffers = [(b, b.detach().clone()) for b in m.buffers(recurse=False)]
    try:
        with torch._C.DisableTorchFunction(), torch.no_grad():
            y = m.forward(x)
    except Exception:  # any module that does not take a lone tensor is simply not it
        return None
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if not isinstance(y, Tensor) or y.shape[:-1] != x.shape[:-1]:
        return None
    return y


def _cached(m: nn.Module, key: str, test: Callable[[nn.Module], Any]) -> Any:
    """``test(m)``, once per module (the tests draw and compute outside any trace)."""
    entry = _behaviour.setdefault(m, {})
    if key not in entry:
        with torch._C.DisableTorchFunction():
            entry[key] = test(m)
    return entry[key]


def _activation_by_behaviour(m: nn.Module) -> tuple[str, Any] | None:
    """The known activation (or the identity) a parameterless module computes, if any."""
    z = torch.linspace(-6.0, 6.0, 241)
    y = _run_alone(m, z)
    if y is None or y.shape != z.shape or not y.is_floating_point():
        return None
    y = y.float()
    if torch.allclose(y, z, atol=1e-6):
        return _IDENTITY
    for name in _ACTIVATION_CANDIDATES:
        with torch._C.DisableTorchFunction():
            ref = phi(name, None)(z)
        if torch.allclose(y, ref, rtol=1e-4, atol=1e-4):
            return name, None
    return None


def _norm_by_behaviour(m: nn.Module) -> bool:
    """Whether a leaf module with 1-D parameters of one size is scale-invariant."""
    params = list(m.parameters(recurse=False))
    if (not params or next(m.children(), None) is not None
            or any(p.ndim != 1 for p in params) or len({p.numel() for p in params}) != 1):
        return False
    d, ref = params[0].numel(), params[0]
    gen = torch.Generator().manual_seed(0)
    for shape in ((4, d), (2, d, 3, 3)):  # normalised over the last dim, or channels first
        x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(ref.device, ref.dtype)
        y1, y3 = _run_alone(m, x), _run_alone(m, 3 * x)
        if (y1 is not None and y3 is not None and y1.shape == x.shape
                and bool(torch.isfinite(y1).all())
                and torch.allclose(y1, y3, rtol=1e-3, atol=1e-4)
                and not torch.allclose(y1, x, rtol=1e-3, atol=1e-4)):
            return True
    return False


def _layout_by_behaviour(m: nn.Module) -> str | None:
    """``"in_out"`` for ``x @ W + b`` (a transposed weight), ``"out_in"`` for
    ``x @ W.T + b``, for a leaf module holding only ``weight`` (2-D) and ``bias`` (1-D)."""
    own = dict(m.named_parameters(recurse=False))
    w, b = own.get("weight"), own.get("bias")
    if (w is None or w.ndim != 2 or set(own) - {"weight", "bias"}
            or next(m.children(), None) is not None):
        return None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        wd = w.detach()
        for layout, n_in, ref in (("in_out", w.shape[0], lambda x: x @ wd),
                                  ("out_in", w.shape[1], lambda x: x @ wd.T)):
            x = torch.randn(3, n_in, generator=gen).to(w.device, w.dtype)
            y = _run_alone(m, x)
            if y is None or y.shape[-1] != (w.shape[1] if layout == "in_out" else w.shape[0]):
                continue
            with torch._C.DisableTorchFunction():
                expected = ref(x) + (b.detach() if b is not None else 0)
            if torch.allclose(y, expected, rtol=1e-4, atol=1e-5):
                return layout
    return None


def activation_spec_of(m: nn.Module) -> tuple[str, Any] | None:
    """``(name, parameter)`` of the activation ``m`` applies: by type for torch's classes,
    by behaviour for parameterless modules of other libraries; None if it is none."""
    spec = activation_of_module(m)
    if spec is not None:
        return spec
    if isinstance(m, (*NORMS, *PASS, *ATOMIC)) or any(True for _ in m.parameters(recurse=False)):
        return None
    if next(m.children(), None) is not None:
        return None
    spec = _cached(m, "act", _activation_by_behaviour)
    return None if spec is _IDENTITY or spec == _IDENTITY else spec


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer: torch's classes, or a scale-invariant leaf module with 1-D
    parameters (a custom RMSNorm or LayerNorm)."""
    if isinstance(m, NORMS):
        return True
    if isinstance(m, (*ATOMIC, *CONV, *EMBEDDINGS, nn.Linear)) or activation_of_module(m):
        return False
    return bool(_cached(m, "norm", _norm_by_behaviour))


def linear_layout(m: nn.Module) -> str | None:
    """``"out_in"`` for ``nn.Linear`` (weight ``(out, in)``) and modules that compute the
    same, ``"in_out"`` for linear layers with a transposed weight ``(in, out)``
    (``transformers``' ``Conv1D``), None for anything else."""
    if isinstance(m, nn.Linear):
        return "out_in"
    if isinstance(m, (*ATOMIC, *CONV, *EMBEDDINGS, *NORMS)):
        return None
    return _cached(m, "layout", _layout_by_behaviour)


def module_kind(m: nn.Module) -> str:
    """``"act"``, ``"norm"``, ``"pass"``, ``"param"`` or ``"other"``."""
    if activation_spec_of(m) is not None:
        return "act"
    if is_norm(m):
        return "norm"
    if isinstance(m, PASS):
        return "pass"
    if isinstance(m, ATOMIC) or any(True for _ in m.parameters(recurse=False)):
        return "param"
    if (next(m.children(), None) is None
            and _cached(m, "act", _activation_by_behaviour) == _IDENTITY):
        return "pass"
    return "other"


def is_understood(m: nn.Module) -> bool:
    """Whether a leaf module is one the probe and ``init_model`` have rules for: an
    activation, a normalisation, a pass-through, a linear or convolutional layer (either
    weight layout), an embedding, an RNN or ``nn.MultiheadAttention``, or a parameterless
    module (its gains are measured like any other)."""
    kind = module_kind(m)
    if kind != "param":
        return True
    return isinstance(m, (*ATOMIC, *CONV, *EMBEDDINGS)) or linear_layout(m) is not None


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


def fan_in(w: Tensor, module: nn.Module | None = None) -> int:
    """Inputs per output unit: ``in_features``, ``in_channels/groups * prod(kernel)``; the
    first dimension of a transposed linear weight (``Conv1D``)."""
    if module is not None and w.ndim == 2 and linear_layout(module) == "in_out":
        return max(1, w.shape[0])
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        stride = math.prod(module.stride)
        return max(1, w.shape[0] // module.groups * math.prod(w.shape[2:]) // stride)
    return max(1, math.prod(w.shape[1:])) if w.ndim >= 2 else max(1, w.numel())

