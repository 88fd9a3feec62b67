"""Stateless, in-place gradient clipping with no host synchronisation.

Every function takes a Tensor, an iterable of Tensors/Parameters or ``model.parameters()``,
skips parameters whose ``.grad`` is ``None``, gets its norms from the norm engine
(:mod:`gradguard.engine`: fp32 accumulation, foreach kernels, DTensor-aware), its
coefficients from :mod:`gradguard.engine.scaling` and scales gradients in place with
foreach kernels. Coefficients stay on the device; on accelerators gradients are always
multiplied by the clamped coefficient (a branch would need a device->host read). On CPU
the read is free, so the multiply is skipped for the tensors that are not clipped.
Thresholds are Python numbers (validated) or, as in torch, one-element tensors, which stay
on their device (torch reads them with ``float()``, a host sync).

References:
    Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
    networks" (global norm clipping). Brock, De, Smith & Simonyan 2021, "High-Performance
    Large-Scale Image Recognition Without Normalization" (adaptive gradient clipping).
    optax ``clip_by_block_rms``.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from gradguard._validation import check_clip_threshold, check_threshold
from gradguard.engine.norms import (
    LOW_PRECISION,
    TensorGroups,
    TensorOrTensors,
    as_tensor_list,
    get_grads,
    grad_groups,
    group_by_device_and_dtype,
    raise_if_nonfinite,
    total_norm,
    validate_norm_type,
)
from gradguard.engine.scaling import (
    agc_coefficients,
    clamp_,
    div_list_,
    mul_,
    on_device,
    torch_clip_coefficient,
)
from gradguard.engine.sharding import localize
from gradguard.engine.units import UnitNorms

__all__ = [
    "clip_grad_agc_",
    "clip_grad_block_rms_",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "scale_grads_",
]

Threshold = float | Tensor
"""A clipping threshold: a Python number, or a one-element tensor that stays on its device."""


def _warn_if_empty_generator(parameters: TensorOrTensors) -> TensorOrTensors:
    """torch's warning for an exhausted ``model.parameters()``; returns the parameters as
    a list when they came as a generator (so that the warning does not consume them)."""
    if not isinstance(parameters, types.GeneratorType):
        return parameters
    parameters = list(parameters)
    if not parameters:
        # stacklevel 4: this helper, clip_grad_norm_ and torch.no_grad's wrapper lie
        # between the warning and the caller's line (torch: 3, without the helper), so
        # the warning points at the caller's line, as torch's does.
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.",
            stacklevel=4,
        )
    return parameters


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
    mul_(TensorGroups(grads), coef, foreach)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: Threshold,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> Tensor:
    """Scale gradients given a pre-computed total norm (torch's ``clip_grads_with_norm_``).

    ``grad *= min(max_norm / (total_norm + 1e-6), 1)``, computed on the device, bitwise as
    torch computes it.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        max_norm: the largest allowed total norm: a number ``>= 0`` (``inf``: no clipping),
            or a one-element tensor, used on its device without a host read (and, like
            torch, without a check of its value).
        total_norm: the total norm of the gradients, e.g. from :func:`gradguard.get_total_norm`.
        foreach: use foreach kernels (``None``: where supported).

    Returns:
        The clamped coefficient that was applied (a 0-d tensor on ``total_norm``'s device;
        torch returns ``None``).
    """
    limit = check_clip_threshold(max_norm, "max_norm")
    if not isinstance(total_norm, torch.Tensor):
        raise TypeError(f"total_norm must be a Tensor (e.g. from get_total_norm), got "
                        f"{total_norm!r}")
    coef = torch_clip_coefficient(limit, total_norm)
    mul_(grad_groups(parameters), coef, foreach)
    return coef


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: Threshold,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: object | None = None,
) -> Tensor:
    """Clip the total gradient norm in place: a drop-in for ``torch.nn.utils.clip_grad_norm_``.

    Same signature, same rule (``grad *= min(max_norm / (norm + 1e-6), 1)``), the same
    return value (the total norm before clipping), every norm order torch accepts, and
    torch's warning for an empty generator. On fp32 and fp64 the results are bitwise
    torch's. Differences, all deliberate (the README's "Differences from torch"):

    * fp16/bf16 gradients are accumulated in fp32 and the norm is returned in fp32, so
      finite fp16 gradients never give an ``inf`` norm (torch returns ``inf`` in fp16 once
      the norm passes 65,504, and then zeroes every gradient); bf16 overflows only past
      fp32's range.
    * A tensor ``max_norm`` stays on its device (torch reads it with ``float()``, a host
      sync).
    * On CPU nothing is multiplied when nothing is clipped.
    * DTensor (FSDP2) gradients give the norm of the full gradient as a plain tensor.
    * ``process_group`` reduces the norm over ranks holding disjoint parameters.
    * A number ``max_norm`` is validated: negative or NaN values raise ``ValueError``.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        max_norm: the largest allowed total norm: a number ``>= 0`` (``inf``: no clipping),
            or a one-element tensor, used on its device without a host read (and, like
            torch, without a check of its value).
        norm_type: the order p of the norm: ``inf`` (max-abs), ``-inf`` (min-abs), ``0``,
            negative orders, as in torch.
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
    limit = check_clip_threshold(max_norm, "max_norm")
    p = validate_norm_type(norm_type, torch_compatible=True)
    groups = grad_groups(_warn_if_empty_generator(parameters))
    if not groups.tensors and process_group is None:  # a rank must still join the collective
        return torch.tensor(0.0)
    total = groups.total_norm(p, foreach, process_group=process_group)
    if error_if_nonfinite:
        raise_if_nonfinite(total, p)
    mul_(groups, torch_clip_coefficient(limit, total), foreach)
    return total


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: Threshold, foreach: bool | None = None
) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` in place.

    A drop-in for ``torch.nn.utils.clip_grad_value_`` (returns ``None`` like it, bitwise the
    same gradients), with a number threshold validated. NaN entries stay NaN. Unlike
    torch, an empty iterable is not an error.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        clip_value: the largest allowed absolute value: a number ``>= 0`` (``inf``: no
            clipping), or a one-element tensor, used on its device without a host read
            (and, like torch, without a check of its value).
        foreach: use foreach kernels (``None``: where supported).
    """
    limit = check_clip_threshold(clip_value, "clip_value")
    clamp_(grad_groups(parameters), limit, foreach)


@torch.no_grad()
def clip_grad_norm_per_tensor_(
    parameters: TensorOrTensors,
    max_norm: Threshold,
    norm_type: float = 2.0,
    foreach: bool | None = None,
) -> Tensor:
    """Clip each gradient tensor's own norm to ``max_norm`` (layer-wise clipping).

    ``g_i *= min(max_norm / (||g_i|| + 1e-6), 1)`` for each tensor ``i``.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        max_norm: the largest allowed norm of each tensor: a number ``>= 0`` (``inf``: no
            clipping) or a one-element tensor, used on its device (value unchecked).
        norm_type: the order p of the norm (every order torch accepts).
        foreach: use foreach kernels (``None``: where supported).

    Returns:
        The total norm of the gradients before clipping (free: it is the norm of the
        per-tensor norms).

    References:
        optax ``clip_by_global_norm`` applied per leaf; You, Gitman & Ginsburg 2017, "Large
        Batch Training of Convolutional Networks" (LARS) motivates layer-wise treatment.
    """
    limit = check_clip_threshold(max_norm, "max_norm")
    p = validate_norm_type(norm_type, torch_compatible=True)
    groups = grad_groups(parameters)
    if not groups.tensors:
        return torch.tensor(0.0)
    per_tensor = groups.norms(p, foreach)
    mul_(groups, torch_clip_coefficient(limit, per_tensor), foreach)
    return total_norm(per_tensor, p)


@torch.no_grad()
def clip_grad_block_rms_(
    parameters: TensorOrTensors, threshold: Threshold, foreach: bool | None = None
) -> Tensor:
    """Clip each gradient tensor's root-mean-square to ``threshold`` (optax ``clip_by_block_rms``).

    Exactly optax's arithmetic: ``g_i <- g_i / max(1, rms(g_i) / threshold)`` with
    ``rms(g) = sqrt(mean(g * g))``, a division (not a multiply by the reciprocal), so fp32
    and fp64 results are bitwise those of the same formula written in torch. Two
    deliberate exceptions take the RMS from the norm engine, ``||g||_2 / sqrt(numel(g))``
    (equal up to rounding): fp16/bf16 gradients, whose squares optax computes in their own
    precision (an fp16 entry above 256 overflows, and the whole tensor is zeroed), are
    accumulated in fp32; DTensor gradients get the RMS of the full tensor.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        threshold: the largest allowed RMS of each tensor: a number ``> 0`` (``inf``: no
            clipping), or a one-element tensor, used on its device (value unchecked).
        foreach: use foreach kernels (``None``: where supported).

    Returns:
        The total L2 norm of the gradients before clipping (from the same sums of squares,
        so equal to :func:`gradguard.get_total_norm` up to rounding).

    References:
        optax ``optax.clip_by_block_rms`` (``optax/transforms/_clipping.py``).
    """
    limit = check_clip_threshold(threshold, "threshold", positive=True)
    groups = grad_groups(parameters)
    if not groups.tensors:
        return torch.tensor(0.0)
    groups.writable()
    local = groups.local
    denoms: list[Tensor | None] = [None] * len(local)
    squares: list[Tensor] = []  # sums of squares, one vector per bucket, for the total

    def bucket(idx: list[int], rms: Tensor) -> None:
        lim = on_device(limit, rms) if isinstance(limit, Tensor) else limit
        for i, d in zip(idx, torch.clamp(rms / lim, min=1.0).unbind(0), strict=True):
            denoms[i] = d

    engine = [i for i, t in enumerate(local)
              if i in groups.shards or t.dtype in LOW_PRECISION]
    if engine:
        sub = [groups.tensors[i] for i in engine]
        norms = TensorGroups(sub, validate=False).norms(2.0, foreach)
        # numel of a DTensor is the global size, as the RMS of the full tensor needs. The
        # scalars travel as kernel arguments: no host->device copy.
        inv_sqrt_n = [1.0 / math.sqrt(max(t.numel(), 1)) for t in sub]
        bucket(engine, torch.stack(torch._foreach_mul(list(norms.unbind(0)), inv_sqrt_n)))
        squares.append(norms * norms)
    exact = [i for i in range(len(local)) if denoms[i] is None]
    buckets = group_by_device_and_dtype([local[i] for i in exact])
    for (_, _), (group, pos) in buckets.items():
        # optax: jnp.mean(abs_sq(u)); one temporary the size of the largest gradient
        means = torch.stack([torch.mean(g * g) if g.numel() else g.new_zeros(()) for g in group])
        bucket([exact[k] for k in pos], means.sqrt())
        squares.append(torch.stack(
            torch._foreach_mul(list(means.unbind(0)), [float(g.numel()) for g in group])))
    div_list_(local, denoms, foreach)  # type: ignore[arg-type]
    total_sq = torch.cat([sq.to(device=groups.device, dtype=groups.norm_dtype) for sq in squares])
    return total_sq.sum().sqrt()


@torch.no_grad()
def clip_grad_agc_(
    parameters: TensorOrTensors,
    clipping: Threshold = 0.01,
    eps: float = 1e-3,
) -> Tensor:
    """Adaptive gradient clipping, unit-wise (NFNets).

    For every unit ``i`` (a row along dim 0 of a Linear/Conv/Embedding weight; a whole
    vector or scalar), with ``W*_i = max(||W_i||, eps)``::

        G_i <- G_i * clipping * W*_i / ||G_i||   if ||G_i|| / W*_i > clipping
        G_i <- G_i                               otherwise

    so a gradient is never amplified. Unit norms of gradients and parameters are computed
    per group of equal shapes (a few kernels, not a per-parameter loop of temporaries) and
    the gradients are scaled with one foreach multiply per group.

    The paper does not clip the final classifier layer's weight; pass the parameters you
    want clipped (e.g. all but ``model.fc.weight``).

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``. Their
            values are read (the threshold is relative to the parameter norm).
        clipping: the largest allowed ratio ``||G_i|| / ||W_i||`` (``> 0``; the paper uses
            0.01 for large batches, up to 0.16 for small ones), or a one-element tensor,
            used on its device (value unchecked).
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
    limit = check_clip_threshold(clipping, "clipping", positive=True)
    eps = check_threshold(eps, "eps")
    every = as_tensor_list(parameters)
    grads = get_grads(every)
    if not grads:
        return torch.tensor(0.0)
    params = [p for p in every if p.grad is not None]
    g_groups = TensorGroups(grads, validate=False)  # get_grads validated
    g_groups.writable()
    g_local = g_groups.local
    w_local, _ = localize(params)  # read under no_grad: no detach needed
    units = UnitNorms(g_local, g_groups.shards)
    g_norms = units.norms(g_local)
    coefs = agc_coefficients(g_norms, units.norms(w_local), limit, eps)
    units.mul_(g_local, coefs)
    return units.total(g_norms, g_groups.device)
