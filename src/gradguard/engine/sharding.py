"""Distributed tensors in the norm engine: DTensor shards and how norms of parts combine.

A ``DTensor`` gradient (FSDP2 ``fully_shard``) holds one shard per rank. Its norm is the
norm of the *full* tensor: the local shard norms are raised to the p-th power, reduced
over the mesh dims the tensor is sharded along, and the root is taken. This module finds
the shards (:func:`localize`), says where each must be reduced (:class:`ShardInfo`) and
reduces them (:func:`reduce_shard_norms`, one collective per mesh dim group). The Guard's
synchroniser (:mod:`gradguard.guard.sync`) packs the same reductions into its one
collective instead, and uses the same helpers.

How norms of disjoint parts combine, ``root(reduce(power(parts)))``: for p = 0 the "norm"
is a count of non-zero entries, which simply adds up; ``inf`` takes the max, ``-inf`` the
min; every other p sums the p-th powers (negative p included: ``(+inf)^p = 0`` adds
nothing).

Everything here is lazy about ``torch.distributed``: it may be absent or not initialised.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ShardInfo",
    "all_reduce_norm",
    "dtensor_type",
    "localize",
    "partial_indices",
    "power",
    "reduce_shard_norms",
    "root",
]


@functools.cache
def dtensor_type() -> type | None:
    """The ``DTensor`` class, or ``None`` where ``torch.distributed`` is unavailable."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


@dataclass(frozen=True)
class ShardInfo:
    """Where a DTensor's local norms must be reduced: its mesh and the sharded mesh dims.

    Attributes:
        mesh: the ``DeviceMesh``.
        mesh_dims: the mesh dims along which the tensor is sharded.
        tensor_dims: the tensor dim sharded along each of ``mesh_dims``.
    """

    mesh: object
    mesh_dims: tuple[int, ...]
    tensor_dims: tuple[int, ...]


def partial_indices(tensors: Sequence[Tensor]) -> list[int]:
    """Indices of the DTensors with a ``Partial`` placement (a pending cross-rank sum)."""
    dtensor = dtensor_type()
    if dtensor is None:
        return []
    return [i for i, t in enumerate(tensors)
            if isinstance(t, dtensor) and any(pl.is_partial() for pl in t.placements)]


def localize(tensors: list[Tensor]) -> tuple[list[Tensor], dict[int, ShardInfo]]:
    """Replace DTensors by their local shards; say which need a cross-rank reduction.

    ``Partial`` DTensors are redistributed first (a collective): the norm of a pending sum
    is not a function of the local norms.

    Args:
        tensors: plain tensors and DTensors.

    Returns:
        ``(local, shards)``: the tensors with every DTensor replaced by its local shard (an
        in-place update of a shard updates the DTensor, ``Partial`` ones aside), and the
        :class:`ShardInfo` of each sharded one, by index.
    """
    dtensor = dtensor_type()
    if dtensor is None or not any(issubclass(tp, dtensor) for tp in {type(t) for t in tensors}):
        return tensors, {}
    local: list[Tensor] = []
    shards: dict[int, ShardInfo] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, dtensor):
            local.append(t)
            continue
        if any(pl.is_partial() for pl in t.placements):
            from torch.distributed.tensor import Replicate

            t = t.redistribute(
                t.device_mesh,
                [Replicate() if pl.is_partial() else pl for pl in t.placements],
            )
        dims = tuple(d for d, pl in enumerate(t.placements) if pl.is_shard())
        if dims:
            shards[i] = ShardInfo(t.device_mesh, dims, tuple(t.placements[d].dim for d in dims))
        local.append(t.to_local())
    return local, shards


def power(norms: Tensor, p: float) -> Tensor:
    """``norms`` raised to the power that makes norms of disjoint parts add up."""
    if math.isinf(p) or p in (0.0, 1.0):
        return norms
    if p == 2.0:
        return norms * norms
    return norms.pow(p)


def root(powers: Tensor, p: float) -> Tensor:
    """The inverse of :func:`power`."""
    if math.isinf(p) or p in (0.0, 1.0):
        return powers
    if p == 2.0:
        return powers.sqrt()
    return powers.pow(1.0 / p)


def all_reduce_norm(t: Tensor, p: float, group: object) -> None:
    """All-reduce :func:`power` values in place: ``MAX`` for inf, ``MIN`` for -inf, else ``SUM``."""
    import torch.distributed as dist

    ops = {math.inf: dist.ReduceOp.MAX, -math.inf: dist.ReduceOp.MIN}
    dist.all_reduce(t, op=ops.get(p, dist.ReduceOp.SUM), group=group)


def reduce_shard_norms(norms: Tensor, shards: dict[int, ShardInfo], p: float) -> Tensor:
    """Combine local shard norms into full-tensor norms: one collective per mesh dim group.

    Args:
        norms: per-tensor norms of the local tensors (shards), in input order.
        shards: which entries are shards, and where they are reduced.
        p: the order of the norms.

    Returns:
        The norms with every shard entry replaced by its full tensor's norm.
    """
    by_key: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    meshes: dict[tuple[int, tuple[int, ...]], ShardInfo] = {}
    for i, info in shards.items():
        key = (id(info.mesh), info.mesh_dims)
        by_key.setdefault(key, []).append(i)
        meshes[key] = info
    entries = list(norms.unbind(0))
    for key, idx in by_key.items():
        info = meshes[key]
        # Python-int indexing and stack only: an index tensor would need a host->device copy.
        powers = power(torch.stack([entries[i] for i in idx]), p)
        for d in info.mesh_dims:
            all_reduce_norm(powers, p, info.mesh.get_group(d))
        for i, v in zip(idx, root(powers, p).unbind(0), strict=True):
            entries[i] = v
    return torch.stack(entries)
