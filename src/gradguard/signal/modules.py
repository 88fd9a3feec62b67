"""What a module is, for signal propagation: an activation, a normalisation, a pass-through,
a parametrised layer, or something else; which modules a trace records; their fan-in.

The tables also name the functional calls the tracer understands: pass-through functions
(views, dropout, pooling), functional normalisations and additions (candidate residuals).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from gradguard.signal.activations import activation_of_module

__all__ = [
    "ADD_FUNCS",
    "ATOMIC",
    "CONV",
    "NORMS",
    "NORM_FUNCS",
    "PASS",
    "PASS_FUNCS",
    "fan_in",
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


def module_kind(m: nn.Module) -> str:
    """``"act"``, ``"norm"``, ``"pass"``, ``"param"`` or ``"other"``."""
    if activation_of_module(m) is not None:
        return "act"
    if isinstance(m, NORMS):
        return "norm"
    if isinstance(m, PASS):
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


def fan_in(w: Tensor, module: nn.Module | None = None) -> int:
    """Inputs per output unit: ``in_features``, ``in_channels/groups * prod(kernel)``."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        stride = math.prod(module.stride)
        return max(1, w.shape[0] // module.groups * math.prod(w.shape[2:]) // stride)
    return max(1, math.prod(w.shape[1:])) if w.ndim >= 2 else max(1, w.numel())

