"""The norm engine: measure gradients (per-tensor, total and unit-wise norms, DTensor
aware, fp32 accumulation, foreach per device and dtype) and scale them in place with one
coefficient rule.

Modules:
    :mod:`~gradguard.engine.norms` (per-tensor and total norms, prepared tensor groups),
    :mod:`~gradguard.engine.sharding` (DTensor shards, how norms of parts combine),
    :mod:`~gradguard.engine.units` (unit-wise norms for AGC),
    :mod:`~gradguard.engine.scaling` (the clip coefficient rules, in-place scaling).
"""

from gradguard.engine.norms import (
    TensorGroups,
    TensorOrTensors,
    as_tensor_list,
    get_grads,
    get_total_norm,
    grad_groups,
    grad_norms,
    tensor_norms,
    total_norm,
    validate_norm_type,
)
from gradguard.engine.scaling import (
    NORM_EPS,
    agc_coefficients,
    clip_coefficient,
    strict_clip_coefficient,
    torch_clip_coefficient,
)
from gradguard.engine.units import UnitNorms, num_units, unit_norms, unit_shape

__all__ = [
    "NORM_EPS",
    "TensorGroups",
    "TensorOrTensors",
    "UnitNorms",
    "agc_coefficients",
    "as_tensor_list",
    "clip_coefficient",
    "get_grads",
    "get_total_norm",
    "grad_groups",
    "grad_norms",
    "num_units",
    "strict_clip_coefficient",
    "tensor_norms",
    "torch_clip_coefficient",
    "total_norm",
    "unit_norms",
    "unit_shape",
    "validate_norm_type",
]
