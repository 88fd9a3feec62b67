"""Stateless, in-place gradient clipping with no host synchronisation.

Every function takes a Tensor, an iterable of Tensors/Parameters or ``model.parameters()``,
skips parameters whose ``.grad`` is ``None``, gets its norms from :mod:`gradguard.norms`
(fp32 accumulation, foreach kernels, DTensor-aware) and scales gradients in place with
foreach kernels. Coefficients stay on the device; on accelerators gradients are always
multiplied by the clamped coefficient (a branch would need a device->host read). On CPU
the read is free, so the multiply is skipped for the tensors that are not clipped.

References:
    Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
    networks" (global norm clipping). Brock, De, Smith & Simonyan 2021, "High-Performance
    Large-Scale Image Recognition Without Normalization" (adaptive gradient clipping).
    optax ``clip_by_block_rms``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from gradguard import norms as _norms
from gradguard.norms import TensorOrTensors

__all__ = [
    "check_threshold",
    "clip_grad_agc_",
    "clip_grad_block_rms_",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "scale_grads_",
]

# torch's guard against division by zero in clip_grad_norm_; kept identical so that the
# results are bitwise equal to torch's on fp32.
_NORM_EPS = 1e-6


def check_threshold(value: object, name: str, *, positive: bool = False) -> float:
    """Validate a clipping threshold: a finite real number, ``>= 0`` (``> 0`` if ``positive``).

    Args:
        value: the threshold given by the user.
        name: the argument name, for the error message.
        positive: reject zero as well.

    Returns:
        ``value`` as a float.

    Raises:
        TypeError: if ``value`` is not a real number.
        ValueError: if it is NaN, infinite, negative (or zero when ``positive``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _all_cpu(tensors: Sequence[Tensor]) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def _group_by_device(tensors: Sequence[Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


def _foreach_mul_(tensors: list[Tensor], coef: Tensor | list[Tensor], foreach: bool | None) -> None:
    """In-place multiply, one foreach call per (device, dtype) group, loop fallback."""
    if not tensors:
        return
    per_tensor = isinstance(coef, list)
    grouped = _norms._group_by_device_and_dtype(tensors)
    for (device, _), (group, idx) in grouped.items():
        if per_tensor:
            c: Tensor | list[Tensor] = [coef[i].to(device) for i in idx]  # type: ignore[index]
        else:
            c = coef.to(device)  # type: ignore[union-attr]
        if _norms._foreach_ok(group, device, foreach):
            torch._foreach_mul_(group, c)
        else:
            for k, g in enumerate(group):
                g.mul_(c[k] if per_tensor else c)  # type: ignore[index]


def scale_grads_(
    grads: Sequence[Tensor], coef: Tensor, *, foreach: bool | None = None
) -> None:
    """Multiply gradients in place by a clip coefficient that is at most 1.

    ``coef`` is a 0-d tensor (one coefficient for all) or a 1-D tensor with one entry per
    gradient. On CPU, gradients whose coefficient is not below 1 are left untouched (the
    multiply would be the identity); elsewhere everything is multiplied, branch-free.
    DTensor gradients are scaled through their local shards.

    Args:
        grads: the gradients to scale.
        coef: the coefficients, ``<= 1``; NaN propagates like torch.
        foreach: use foreach kernels (``None``: where supported).
    """
    grads = list(grads)
    if not grads:
        return
    local, _ = _norms._localize(grads)
    if coef.ndim == 0:
        if coef.device.type == "cpu" and _all_cpu(local) and bool(coef >= 1):
            return  # a free host read on CPU: nothing is clipped
        _foreach_mul_(local, coef, foreach)
        return
    if coef.device.type == "cpu" and _all_cpu(local):
        clipped = (~(coef >= 1)).tolist()
        local = [g for g, c in zip(local, clipped, strict=True) if c]
        coefs = [c for c, k in zip(coef.unbind(0), clipped, strict=True) if k]
        _foreach_mul_(local, coefs, foreach)
        return
    _foreach_mul_(local, list(coef.unbind(0)), foreach)


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> Tensor:
    """Scale gradients given a pre-computed total norm (torch's ``clip_grads_with_norm_``).

    ``grad *= min(max_norm / (total_norm + 1e-6), 1)``, computed on the device.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        max_norm: the largest allowed total norm (finite, ``>= 0``).
        total_norm: the total norm of the gradients, e.g. from :func:`gradguard.get_total_norm`.
        foreach: use foreach kernels (``None``: where supported).

    Returns:
        The clamped coefficient that was applied (a 0-d tensor on ``total_norm``'s device).
    """
    max_norm = check_threshold(max_norm, "max_norm")
    grads = _norms.get_grads(parameters)
    coef = torch.clamp(max_norm / (total_norm + _NORM_EPS), max=1.0)
    scale_grads_(grads, coef, foreach=foreach)
    return coef


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: object | None = None,
) -> Tensor:
    """Clip the total gradient norm in place: a drop-in for ``torch.nn.utils.clip_grad_norm_``.

    Same signature, same rule (``grad *= min(max_norm / (norm + 1e-6), 1)``) and the same
    return value (the total norm before clipping). On fp32 the results are equal to
    torch's. Differences, all fixes:

    * fp16/bf16 gradients are accumulated in fp32 and the norm is returned in fp32, so
      finite gradients never give an ``inf`` norm (torch returns ``inf`` in fp16 once the
      norm passes 65,504, and then zeroes every gradient).
    * On CPU nothing is multiplied when nothing is clipped.
    * DTensor (FSDP2) gradients give the norm of the full gradient as a plain tensor.
    * ``process_group`` reduces the norm over ranks holding disjoint parameters.
    * ``max_norm`` is validated: negative, NaN or infinite values raise ``ValueError``
      (use :func:`gradguard.get_total_norm` to only measure the norm).

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        max_norm: the largest allowed total norm (finite, ``>= 0``).
        norm_type: the order p of the norm (``inf`` for max-abs).
        error_if_nonfinite: raise ``RuntimeError`` if the norm is NaN/inf. Reading the
            norm costs one device synchronisation.
        foreach: use foreach kernels (``None``: where supported).
        process_group: reduce the norm over this group (pipeline stages).

    Returns:
        The total norm of the gradients before clipping, a 0-d fp32 tensor (fp64 for fp64
        gradients); ``tensor(0.)`` if no parameter has a gradient.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> norm = gg.clip_grad_norm_(model.parameters(), max_norm=1.0)
    """
    max_norm = check_threshold(max_norm, "max_norm")
    p = _norms.validate_norm_type(norm_type)
    grads = _norms.get_grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    total = _norms.total_norm(
        _norms.tensor_norms(grads, p, foreach=foreach), p, process_group=process_group
    )
    if error_if_nonfinite:
        _norms.raise_if_nonfinite(total, p)
    coef = torch.clamp(max_norm / (total + _NORM_EPS), max=1.0)
    scale_grads_(grads, coef, foreach=foreach)
    return total


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None
) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` in place.

    A drop-in for ``torch.nn.utils.clip_grad_value_`` (returns ``None`` like it), with the
    threshold validated. NaN entries stay NaN.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        clip_value: the largest allowed absolute value (finite, ``>= 0``).
        foreach: use foreach kernels (``None``: where supported).
    """
    clip_value = check_threshold(clip_value, "clip_value")
    grads = _norms.get_grads(parameters)
    if not grads:
        return
    local, _ = _norms._localize(grads)
    for (device, _), (group, _) in _norms._group_by_device_and_dtype(local).items():
        if _norms._foreach_ok(group, device, foreach):
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)


def _coef_from_norms(limit: Tensor | float, norms: Tensor) -> Tensor:
    """``min(1, limit / norm)`` without amplification: zero and NaN norms give 1 and NaN."""
    return torch.clamp(limit / (norms + _NORM_EPS), max=1.0)


@torch.no_grad()
def clip_grad_norm_per_tensor_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    foreach: bool | None = None,
) -> Tensor:
    """Clip each gradient tensor's own norm to ``max_norm`` (layer-wise clipping).

    ``g_i *= min(max_norm / (||g_i|| + 1e-6), 1)`` for each tensor ``i``.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        max_norm: the largest allowed norm of each tensor (finite, ``>= 0``).
        norm_type: the order p of the norm.
        foreach: use foreach kernels (``None``: where supported).

    Returns:
        The total norm of the gradients before clipping (free: it is the norm of the
        per-tensor norms).

    References:
        optax ``clip_by_global_norm`` applied per leaf; You et al. 2017 (LARS) motivate
        layer-wise treatment.
    """
    max_norm = check_threshold(max_norm, "max_norm")
    p = _norms.validate_norm_type(norm_type)
    grads = _norms.get_grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    per_tensor = _norms.tensor_norms(grads, p, foreach=foreach)
    scale_grads_(grads, _coef_from_norms(max_norm, per_tensor), foreach=foreach)
    return _norms.total_norm(per_tensor, p)


@torch.no_grad()
def clip_grad_block_rms_(
    parameters: TensorOrTensors, threshold: float, foreach: bool | None = None
) -> Tensor:
    """Clip each gradient tensor's root-mean-square to ``threshold`` (optax ``clip_by_block_rms``).

    ``g_i /= max(1, rms(g_i) / threshold)`` with ``rms(g) = ||g||_2 / sqrt(numel(g))``.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        threshold: the largest allowed RMS of each tensor (finite, ``> 0``).
        foreach: use foreach kernels (``None``: where supported).

    Returns:
        The total L2 norm of the gradients before clipping.

    References:
        optax ``optax.clip_by_block_rms``.
    """
    threshold = check_threshold(threshold, "threshold", positive=True)
    grads = _norms.get_grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    per_tensor = _norms.tensor_norms(grads, 2.0, foreach=foreach)
    # numel of a DTensor is the global size, as the RMS of the full tensor needs. The
    # scalars travel as kernel arguments: no host->device copy.
    rms = torch.stack(
        torch._foreach_mul(
            list(per_tensor.unbind(0)), [1.0 / math.sqrt(max(g.numel(), 1)) for g in grads]
        )
    )
    coef = 1.0 / torch.clamp(rms / threshold, min=1.0)
    scale_grads_(grads, coef, foreach=foreach)
    return _norms.total_norm(per_tensor, 2.0)


@torch.no_grad()
def clip_grad_agc_(
    parameters: TensorOrTensors,
    clipping: float = 0.01,
    eps: float = 1e-3,
) -> Tensor:
    """Adaptive gradient clipping, unit-wise (NFNets).

    For every unit ``i`` (a row along dim 0 of a Linear/Conv/Embedding weight; a whole
    vector or scalar), with ``W*_i = max(||W_i||, eps)``::

        G_i <- G_i * clipping * W*_i / ||G_i||   if ||G_i|| / W*_i > clipping
        G_i <- G_i                               otherwise

    so a gradient is never amplified. All unit norms of gradients and parameters are
    computed in a few batched kernels (not a per-parameter loop of temporaries) and the
    gradients are scaled with one foreach multiply per (device, dtype) group.

    The paper does not clip the final classifier layer; pass the parameters you want
    clipped (e.g. all but ``model.fc``).

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``. Their
            values are read (the threshold is relative to the parameter norm).
        clipping: the largest allowed ratio ``||G_i|| / ||W_i||`` (``> 0``; the paper uses
            0.01 for large batches, up to 0.16 for small ones).
        eps: the floor on parameter norms, so zero-initialised weights can move (``>= 0``).

    Returns:
        The total L2 norm of the gradients before clipping (free: the norm of the unit norms).

    References:
        Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale Image Recognition
        Without Normalization", Section 4.1, arXiv:2102.06171.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> norm = gg.clip_grad_agc_(model.parameters(), clipping=0.01)
    """
    clipping = check_threshold(clipping, "clipping", positive=True)
    eps = check_threshold(eps, "eps")
    params = [p for p in _norms.as_tensor_list(parameters) if p.grad is not None]
    grads = _norms.get_grads(params)
    if not grads:
        return torch.tensor(0.0)
    local_g, shard_g = _norms._localize(grads)
    local_p, _ = _norms._localize([p.detach() for p in params])
    totals = []
    for idx in _group_by_device(local_g).values():
        g = [local_g[i] for i in idx]
        w = [local_p[i] for i in idx]
        shards = [shard_g.get(i) for i in idx]
        g_local = _norms.unit_norms_flat(g)
        g_units = _complete_units(g_local, g, shards)
        w_units = _complete_units(_norms.unit_norms_flat(w), w, shards)
        max_norm = w_units.clamp_min(eps) * clipping
        coef = torch.where(g_units > max_norm, max_norm / g_units, 1.0)
        totals.append(_total_from_units(g_local, g, shards))
        _scale_units_(g, coef)
    device = local_g[0].device
    return torch.linalg.vector_norm(torch.cat([t.to(device) for t in totals]))


def _total_from_units(
    local_units: Tensor, local: list[Tensor], shards: list[_norms._ShardInfo | None]
) -> Tensor:
    """The L2 norm of all gradients from their local unit norms (1-element tensor)."""
    if not any(s is not None for s in shards):
        return torch.linalg.vector_norm(local_units).reshape(1)
    sizes = [_norms._num_units(t) for t in local]
    per_tensor = torch.stack([torch.linalg.vector_norm(u) for u in local_units.split(sizes)])
    full = _norms._reduce_shard_norms(
        per_tensor, {k: s for k, s in enumerate(shards) if s is not None}, 2.0
    )
    return torch.linalg.vector_norm(full).reshape(1)


def _complete_units(
    flat: Tensor, local: list[Tensor], shards: list[_norms._ShardInfo | None]
) -> Tensor:
    """Complete local unit norms of DTensor shards into norms of whole units.

    Units are rows along dim 0, so a DTensor sharded on dim 0 (FSDP2) holds whole units and
    needs nothing; vectors, or weights sharded along another dim, need their partial
    squared norms summed over the sharded mesh dims.
    """
    if not any(s is not None for s in shards):
        return flat
    pieces = list(flat.split([_norms._num_units(t) for t in local]))
    for k, (t, info) in enumerate(zip(local, shards, strict=True)):
        if info is None:
            continue
        dims = [
            d for d, td in zip(info.mesh_dims, info.tensor_dims, strict=True)
            if t.ndim < 2 or td != 0  # rows sharded along dim 0 are whole on each rank
        ]
        if not dims:
            continue
        sq = pieces[k] * pieces[k]
        for d in dims:
            _norms._all_reduce(sq, 2.0, info.mesh.get_group(d))
        pieces[k] = sq.sqrt()
    return torch.cat(pieces)


def _scale_units_(grads: list[Tensor], coef: Tensor) -> None:
    """Multiply each gradient unit by its coefficient; on CPU only tensors with a clip."""
    sizes = [_norms._num_units(g) for g in grads]
    if coef.device.type == "cpu":
        clipped = torch.segment_reduce(
            (coef < 1).to(torch.float32), "max", lengths=torch.tensor(sizes)
        ).bool().tolist()
        keep = [i for i, c in enumerate(clipped) if c]
        if not keep:
            return
        pieces = coef.split(sizes)
        sel = [grads[i] for i in keep]
        _foreach_mul_(sel, [pieces[i].view(_norms.unit_shape(grads[i])) for i in keep], None)
        return
    _foreach_mul_(grads, _norms.split_units(coef, grads), None)
