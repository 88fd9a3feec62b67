"""The coefficient rules and the in-place scaling: how much to shrink, and shrinking.

Every clip coefficient gradguard computes comes from this module, whoever asks
(:mod:`gradguard.clip`, the policies, the Guard):

* :func:`clip_coefficient` -- torch's ``min(1, threshold / (norm + 1e-6))`` for a
  threshold that is a device tensor, where NaN means "no threshold in force" (the
  policies' rule);
* :func:`torch_clip_coefficient` -- the same rule with the roundings of
  ``torch.nn.utils.clip_grad_norm_`` for a Python-number threshold, so that gradguard's
  drop-in is bitwise torch's (a tensor threshold follows the same two roundings);
* :func:`strict_clip_coefficient` -- scale only norms strictly above the threshold (the
  ZClip and AdaGC reference code);
* :func:`agc_coefficients` -- the unit-wise rule of adaptive gradient clipping (NFNets).

The in-place helpers multiply (or clamp, or divide) with one foreach call per (device,
dtype) group. On CPU, tensors whose coefficient is not below 1 are left untouched (the
multiply would be the identity, and the check is free there); on accelerators every
tensor is multiplied, branch-free, so that no device->host read is needed.

References:
    torch ``torch/nn/utils/clip_grad.py`` (the rule and its ``1e-6``). Brock, De, Smith &
    Simonyan 2021, "High-Performance Large-Scale Image Recognition Without Normalization",
    arXiv:2102.06171 (AGC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradguard.engine.norms import TensorGroups, foreach_ok, group_by_device_and_dtype

__all__ = [
    "NORM_EPS",
    "agc_coefficients",
    "clamp_",
    "clip_coefficient",
    "div_list_",
    "mul_",
    "mul_list_",
    "on_device",
    "strict_clip_coefficient",
    "torch_clip_coefficient",
    "zero_nonfinite_",
]

#: torch's guard against division by zero in ``clip_grad_norm_``, kept identical so that
#: a fixed threshold behaves bitwise like torch.
NORM_EPS = 1e-6


def on_device(limit: Tensor, like: Tensor) -> Tensor:
    """A tensor threshold in ``like``'s dtype and on its device (a copy only if needed)."""
    return limit.to(device=like.device, dtype=like.dtype)


def clip_coefficient(threshold: Tensor, norm: Tensor) -> Tensor:
    """``min(1, threshold / (norm + 1e-6))``; a NaN threshold does not clip.

    Args:
        threshold: the threshold(s) in force, device tensor(s); NaN where there is none.
        norm: the norm(s) to bound, broadcastable against ``threshold``.

    Returns:
        The coefficient(s) in ``[0, 1]`` (NaN for a NaN norm under a real threshold,
        like torch).
    """
    coef = torch.clamp(threshold / (norm + NORM_EPS), max=1.0)
    return torch.where(torch.isnan(threshold), torch.ones_like(coef), coef)


def torch_clip_coefficient(limit: float | Tensor, norms: Tensor) -> Tensor:
    """``min(1, limit / (norm + 1e-6))`` with torch's arithmetic; never amplifies, and a
    NaN norm (or a NaN tensor limit) gives NaN, like torch.

    torch computes ``max_norm / (norm + 1e-6)`` with a Python float, which is
    ``Tensor.__rtruediv__``: ``reciprocal(norm + 1e-6) * max_norm``. A tensor limit
    follows the same two roundings (in the norm's dtype), so its result is bitwise torch's
    for ``float(limit)``, without reading it on the host.
    """
    if isinstance(limit, Tensor):
        return torch.clamp((norms + NORM_EPS).reciprocal() * on_device(limit, norms), max=1.0)
    return torch.clamp(limit / (norms + NORM_EPS), max=1.0)


def strict_clip_coefficient(threshold: Tensor, norm: Tensor) -> Tensor:
    """``threshold / (norm + 1e-6)`` only where ``norm > threshold``, else 1 (NaN: 1).

    The rule of the ZClip and AdaGC reference code: a norm at or below its threshold is
    never scaled, however small (torch's clamp rule shrinks norms below ~1e-6 a little).
    """
    return torch.where(norm > threshold, threshold / (norm + NORM_EPS), torch.ones_like(norm))


def agc_coefficients(
    grad_units: Sequence[Tensor], param_units: Sequence[Tensor], clipping: float | Tensor,
    eps: float,
) -> list[Tensor]:
    """The AGC rule per unit: ``c * max(||W||, eps) / ||G||`` where ``||G||`` exceeds
    ``c * max(||W||, eps)``, else 1 (a gradient is never amplified).

    Args:
        grad_units: unit norms of the gradients (any shapes), e.g. one stacked tensor per
            unit group.
        param_units: the parameters' unit norms, shaped like ``grad_units``.
        clipping: the largest allowed ratio ``c`` (a number, or a tensor used on the
            device).
        eps: the floor on parameter norms.

    Returns:
        The coefficients, shaped like ``grad_units``.
    """
    out = []
    for gn, wn in zip(grad_units, param_units, strict=True):
        c = on_device(clipping, wn) if isinstance(clipping, Tensor) else clipping
        limit = wn.clamp_min(eps) * c
        out.append(torch.where(gn > limit, limit / gn, 1.0))
    return out


# --------------------------------------------------------------------------------------
# In place
# --------------------------------------------------------------------------------------


def mul_(groups: TensorGroups, coef: Tensor, foreach: bool | None = None) -> None:
    """Multiply prepared tensors in place by a coefficient ``<= 1``: a 0-d tensor or one
    per tensor.

    On CPU, tensors whose coefficient is not below 1 are left untouched; on accelerators
    every tensor is multiplied, branch-free.

    Raises:
        TypeError: for ``Partial`` DTensors (see :meth:`TensorGroups.writable`).
    """
    if not groups.local:
        return
    groups.writable()
    if coef.ndim == 0:
        if groups.all_cpu and coef.device.type == "cpu" and bool(coef >= 1):
            return
        for (device, _), (group, _) in groups.groups.items():
            c = coef.to(device)
            if foreach_ok(group, device, foreach, groups.types_ok):
                torch._foreach_mul_(group, c)
            else:
                for g in group:
                    g.mul_(c)
        return
    coefs = list(coef.unbind(0))
    if groups.all_cpu and coef.device.type == "cpu":
        clip = torch.logical_not(coef >= 1).tolist()  # NaN coefficients multiply too
        keep = [i for i, c in enumerate(clip) if c]
        if not keep:
            return
        if len(keep) < len(groups.local):
            mul_list_([groups.local[i] for i in keep], [coefs[i] for i in keep], foreach)
            return
    mul_list_(groups.local, coefs, foreach)


def mul_list_(tensors: list[Tensor], coefs: list[Tensor], foreach: bool | None) -> None:
    """``tensors[i] *= coefs[i]`` (broadcasting), one foreach call per (device, dtype)."""
    for (device, _), (group, idx) in group_by_device_and_dtype(tensors).items():
        c = [coefs[i].to(device) for i in idx]
        if foreach_ok(group, device, foreach):
            torch._foreach_mul_(group, c)
        else:
            for g, ci in zip(group, c, strict=True):
                g.mul_(ci)


def div_list_(tensors: list[Tensor], denoms: list[Tensor], foreach: bool | None) -> None:
    """``tensors[i] /= denoms[i]`` (0-d, ``>= 1``); on CPU only where ``denoms[i] > 1``."""
    pairs = list(zip(tensors, denoms, strict=True))
    if all(t.device.type == "cpu" and d.device.type == "cpu" for t, d in pairs):
        divide = torch.logical_not(torch.stack([d.double() for d in denoms]) <= 1).tolist()
        pairs = [pair for pair, k in zip(pairs, divide, strict=True) if k]  # NaN divides
    if not pairs:
        return
    grouped = group_by_device_and_dtype([t for t, _ in pairs])
    for (device, _), (group, idx) in grouped.items():
        ds = [pairs[i][1].to(device) for i in idx]
        if foreach_ok(group, device, foreach):
            torch._foreach_div_(group, ds)
        else:
            for g, d in zip(group, ds, strict=True):
                g.div_(d)


def clamp_(groups: TensorGroups, value: float | Tensor, foreach: bool | None = None) -> None:
    """Clamp every entry of prepared tensors to ``[-value, value]`` in place, with torch's
    kernels.

    ``value`` may be a 0-d tensor: it is used on the device (the foreach clamps take a
    tensor only as one bound per tensor; a scalar would be read on the host).

    Raises:
        TypeError: for ``Partial`` DTensors (see :meth:`TensorGroups.writable`).
    """
    groups.writable()
    for (device, dtype), (group, _) in groups.groups.items():
        if isinstance(value, Tensor):
            hi: float | Tensor = value.to(device=device, dtype=dtype)
            lo: float | Tensor = -hi
        else:
            # Past the dtype's largest value every entry is inside the bounds; torch
            # raises instead ("value cannot be converted to type c10::Half without
            # overflow"). A tensor bound past the range becomes inf in the cast.
            hi = math.inf if value > torch.finfo(dtype).max else value
            lo = -hi
        if foreach_ok(group, device, foreach, groups.types_ok):
            if isinstance(hi, Tensor):
                torch._foreach_clamp_min_(group, [lo] * len(group))
                torch._foreach_clamp_max_(group, [hi] * len(group))
            else:
                torch._foreach_clamp_min_(group, lo)
                torch._foreach_clamp_max_(group, hi)
        else:
            for g in group:
                g.clamp_(min=lo, max=hi)


def zero_nonfinite_(groups: TensorGroups) -> None:
    """Replace NaN and +-inf entries of prepared tensors by 0, in place (no host read).

    Raises:
        TypeError: for ``Partial`` DTensors (see :meth:`TensorGroups.writable`).
    """
    groups.writable()
    for g in groups.local:
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
