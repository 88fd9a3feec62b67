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
from collections.abc import Sequence

import torch
from torch import Tensor

from gradguard import norms as _norms
from gradguard._validation import check_threshold
from gradguard.norms import TensorOrTensors

__all__ = [
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
    _norms.TensorGroups(grads).mul_(coef, foreach)


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
    if not isinstance(total_norm, torch.Tensor):
        raise TypeError(f"total_norm must be a Tensor (e.g. from get_total_norm), got "
                        f"{total_norm!r}")
    coef = torch.clamp(max_norm / (total_norm + _NORM_EPS), max=1.0)
    _norms.grad_groups(parameters).mul_(coef, foreach)
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
      finite fp16 gradients never give an ``inf`` norm (torch returns ``inf`` in fp16 once
      the norm passes 65,504, and then zeroes every gradient); bf16 overflows only past
      fp32's range.
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
    groups = _norms.grad_groups(parameters)
    if not groups.tensors:
        return torch.tensor(0.0)
    total = _norms.total_norm(groups.norms(p, foreach), p, process_group=process_group)
    if error_if_nonfinite:
        _norms.raise_if_nonfinite(total, p)
    groups.mul_(torch.clamp(max_norm / (total + _NORM_EPS), max=1.0), foreach)
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
    _norms.grad_groups(parameters).clamp_(clip_value, foreach)


def _coef_from_norms(limit: Tensor | float, norms: Tensor) -> Tensor:
    """``min(1, limit / (norm + 1e-6))``: never amplifies; a NaN norm gives NaN, like torch."""
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
        optax ``clip_by_global_norm`` applied per leaf; You, Gitman & Ginsburg 2017, "Large
        Batch Training of Convolutional Networks" (LARS) motivates layer-wise treatment.
    """
    max_norm = check_threshold(max_norm, "max_norm")
    p = _norms.validate_norm_type(norm_type)
    groups = _norms.grad_groups(parameters)
    if not groups.tensors:
        return torch.tensor(0.0)
    per_tensor = groups.norms(p, foreach)
    groups.mul_(_coef_from_norms(max_norm, per_tensor), foreach)
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
    groups = _norms.grad_groups(parameters)
    grads = groups.tensors
    if not grads:
        return torch.tensor(0.0)
    per_tensor = groups.norms(2.0, foreach)
    # numel of a DTensor is the global size, as the RMS of the full tensor needs. The
    # scalars travel as kernel arguments: no host->device copy.
    rms = torch.stack(
        torch._foreach_mul(
            list(per_tensor.unbind(0)), [1.0 / math.sqrt(max(g.numel(), 1)) for g in grads]
        )
    )
    groups.mul_(1.0 / torch.clamp(rms / threshold, min=1.0), foreach)
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

    so a gradient is never amplified. Unit norms of gradients and parameters are computed
    per group of equal shapes (a few kernels, not a per-parameter loop of temporaries) and
    the gradients are scaled with one foreach multiply per group.

    The paper does not clip the final classifier layer's weight; pass the parameters you
    want clipped (e.g. all but ``model.fc.weight``).

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
    every = _norms.as_tensor_list(parameters)
    grads = _norms.get_grads(every)
    if not grads:
        return torch.tensor(0.0)
    params = [p for p in every if p.grad is not None]
    g_groups = _norms.TensorGroups(grads, validate=False)  # get_grads validated
    g_groups.writable()
    g_local = g_groups.local
    w_local, _ = _norms._localize(params)  # read under no_grad: no detach needed
    units = AgcUnits(g_local, g_groups.shards)
    g_norms = units.norms(g_local)
    w_norms = units.norms(w_local)
    coefs = [
        torch.where(gn > wn.clamp_min(eps) * clipping, wn.clamp_min(eps) * clipping / gn, 1.0)
        for gn, wn in zip(g_norms, w_norms, strict=True)
    ]
    units.mul_(g_local, coefs)
    return units.total(g_norms, g_groups.device)


class AgcUnits:
    """Unit-wise norms and scaling of a fixed list of tensors, by groups of equal shapes.

    Units are rows along dim 0 (PyTorch layout). DTensor shards are completed into whole
    units where a unit is split across ranks (vectors, or weights sharded along a dim other
    than 0); FSDP2 shards rows along dim 0, so its matrices need no communication.

    Args:
        local: the tensors (local shards for DTensors).
        shards: which of them are DTensor shards, as from ``TensorGroups.shards``.
    """

    def __init__(self, local: Sequence[Tensor], shards: dict[int, _norms._ShardInfo]) -> None:
        self.groups = _norms.unit_groups(local)
        self.shards = shards
        self.ndims = [t.ndim for t in local]
        self.all_cpu = all(t.device.type == "cpu" for t in local)

    def norms(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Stacked unit norms per group (whole units, fp32 accumulation)."""
        norms = _norms.grouped_unit_norms(tensors, self.groups)
        if self.shards:
            norms = self._complete(norms, tensors)
        return norms

    def _complete(self, norms: list[Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for idx, n in zip(self.groups, norms, strict=True):
            rows = list(n.unbind(0))
            for k, i in enumerate(idx):
                info = self.shards.get(i)
                if info is None:
                    continue
                dims = [
                    d for d, td in zip(info.mesh_dims, info.tensor_dims, strict=True)
                    if tensors[i].ndim < 2 or td != 0  # rows split along dim 0 stay whole
                ]
                if dims:
                    sq = rows[k] * rows[k]
                    for d in dims:
                        _norms._all_reduce(sq, 2.0, info.mesh.get_group(d))
                    rows[k] = sq.sqrt()
            out.append(torch.stack(rows))
        return out

    def total(self, norms: list[Tensor], device: torch.device) -> Tensor:
        """The L2 norm of all tensors from their (whole) unit norms."""
        if not self.shards:
            sq = [n.square().sum().reshape(1).to(device) for n in norms]
            return torch.cat(sq).sum().sqrt()
        per_tensor: list[Tensor | None] = [None] * len(self.ndims)
        for idx, n in zip(self.groups, norms, strict=True):
            for i, rows in zip(idx, n.unbind(0), strict=True):
                per_tensor[i] = torch.linalg.vector_norm(rows).to(device)
        # A matrix sharded by rows holds a subset of its units on each rank: sum over ranks.
        row_sharded = {}
        for i, info in self.shards.items():
            dims = tuple(
                d for d, td in zip(info.mesh_dims, info.tensor_dims, strict=True) if td == 0
            )
            if self.ndims[i] >= 2 and dims:
                row_sharded[i] = _norms._ShardInfo(info.mesh, dims, (0,) * len(dims))
        full = _norms._reduce_shard_norms(torch.stack(per_tensor), row_sharded, 2.0)  # type: ignore[arg-type]
        return torch.linalg.vector_norm(full)

    def mul_(self, tensors: Sequence[Tensor], coefs: list[Tensor]) -> None:
        """Scale each unit by its coefficient; on CPU only the tensors with a clipped unit."""
        sel_t: list[Tensor] = []
        sel_c: list[Tensor] = []
        for idx, c in zip(self.groups, coefs, strict=True):
            rows = c.unbind(0)
            if self.all_cpu:
                clipped = (c < 1).reshape(len(idx), -1).any(dim=1).tolist()
                idx_rows = [(i, r) for i, r, k in zip(idx, rows, clipped, strict=True) if k]
            else:
                idx_rows = list(zip(idx, rows, strict=True))
            for i, r in idx_rows:
                sel_t.append(tensors[i])
                sel_c.append(r)
        if sel_t:
            _norms._mul_list_(sel_t, sel_c, None)
