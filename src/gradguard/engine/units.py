"""Unit-wise norms (adaptive gradient clipping): one norm per output unit of a tensor.

A *unit* is a row along dim 0 of a Linear/Conv/Embedding weight (PyTorch layout), or a
whole vector or scalar. Unit norms are computed per group of tensors of one (device,
dtype, shape), stacked, so thousands of small tensors cost a handful of kernels.
:class:`UnitNorms` keeps the grouping of one list of tensors and does everything a
unit-wise step needs: the norms (completed across ranks where a unit is split over DTensor
shards), the per-tensor and total norms derived from them, and the per-unit scaling.

References:
    Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization", Section 4.1, arXiv:2102.06171.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradguard.engine.norms import (
    DeviceTensorCache,
    TensorOrTensors,
    accum_dtype,
    as_tensor_list,
    check_tensors,
    group_norms,
    validate_norm_type,
)
from gradguard.engine.scaling import mul_list_
from gradguard.engine.sharding import ShardInfo, all_reduce_norm, reduce_shard_norms

__all__ = [
    "UnitNorms",
    "grouped_unit_norms",
    "num_units",
    "unit_groups",
    "unit_norms",
    "unit_shape",
]

# Tensors with at least this many elements get their unit-wise norms one kernel each (the
# kernel dwarfs the Python overhead); smaller ones are stacked by shape and reduced
# together, at most this many elements per stack, so thousands of small tensors cost a
# handful of calls and the temporary stays small.
UNIT_BATCH_MAX_NUMEL = 1 << 16
UNIT_STACK_MAX_NUMEL = 1 << 24


def unit_shape(t: Tensor) -> tuple[int, ...]:
    """The shape of ``t``'s unit-wise norms, broadcastable against ``t``.

    PyTorch layout: dim 0 is the output unit of Linear/Conv weights (and the row of an
    Embedding), so a ``(out, in, kh, kw)`` tensor has norms of shape ``(out, 1, 1, 1)``;
    vectors (biases, gains) and scalars are a single unit.
    """
    if t.ndim >= 2:
        return (t.shape[0],) + (1,) * (t.ndim - 1)
    return (1,) * t.ndim


def num_units(t: Tensor) -> int:
    """How many units ``t`` has: ``t.shape[0]`` for matrices and up, else 1."""
    return t.shape[0] if t.ndim >= 2 else 1


def unit_groups(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Partition tensor indices into groups whose unit norms are computed together.

    Tensors of one (device, dtype, shape) are stacked and reduced together, in chunks of
    at most ``UNIT_STACK_MAX_NUMEL`` elements; matrices of ``UNIT_BATCH_MAX_NUMEL``
    elements or more, and empty tensors, are alone. The partition depends on shapes only,
    so gradients and their parameters (same shapes) can share it.
    """
    by_key: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        # t.size() is several times cheaper than t.shape in a loop over thousands of tensors
        by_key.setdefault((t.device, t.dtype, t.size()), []).append(i)
    groups: list[list[int]] = []
    for (_, _, size), idx in by_key.items():
        numel = math.prod(size)
        if numel == 0 or (len(size) >= 2 and numel >= UNIT_BATCH_MAX_NUMEL):
            groups.extend([i] for i in idx)
            continue
        per_chunk = max(1, UNIT_STACK_MAX_NUMEL // numel)  # the stacked copy stays bounded
        groups.extend(idx[k:k + per_chunk] for k in range(0, len(idx), per_chunk))
    return groups


def grouped_unit_norms(
    tensors: Sequence[Tensor], groups: list[list[int]], norm_type: float = 2.0
) -> list[Tensor]:
    """Unit norms per group, stacked: group ``[i, j, ...]`` gives ``(k, *unit_shape(t_i))``.

    Accumulated in fp32 for fp16/bf16 (fp64 stays fp64). ``unbind(0)`` of a result gives
    per-tensor views that broadcast against the tensors.
    """
    p = norm_type
    out = []
    for idx in groups:
        first = tensors[idx[0]]
        acc = accum_dtype(first.dtype)
        if first.numel() == 0:
            norms = torch.zeros((1, *unit_shape(first)), device=first.device,
                                dtype=acc or first.dtype)
        elif first.ndim < 2:
            group = [tensors[i] for i in idx]
            norms = torch.stack(group_norms(group, p, None, first.device, first.dtype))
            norms = norms.reshape(len(idx), *((1,) * first.ndim))
        elif len(idx) == 1:
            dims = tuple(range(1, first.ndim))
            norms = torch.linalg.vector_norm(first, p, dim=dims, keepdim=True, dtype=acc)
            norms = norms.unsqueeze(0)
        else:
            stacked = torch.stack([tensors[i] for i in idx])
            dims = tuple(range(2, stacked.ndim))
            norms = torch.linalg.vector_norm(stacked, p, dim=dims, keepdim=True, dtype=acc)
        out.append(norms)
    return out


@torch.no_grad()
def unit_norms(tensors: TensorOrTensors, norm_type: float = 2.0) -> list[Tensor]:
    """Unit-wise norms of each tensor, shaped to broadcast against it (see :func:`unit_shape`).

    Args:
        tensors: a Tensor or an iterable of Tensors.
        norm_type: the order p.

    Returns:
        One tensor per input, of shape ``unit_shape(t)``, accumulated in fp32 for fp16/bf16.

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> gg.unit_norms(w)[0].flatten()
        tensor([5., 1.])
    """
    p = validate_norm_type(norm_type)
    tensors = as_tensor_list(tensors, "tensors")
    check_tensors(tensors, "tensors[{}]")
    groups = unit_groups(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    for idx, norms in zip(groups, grouped_unit_norms(tensors, groups, p), strict=True):
        for i, n in zip(idx, norms.unbind(0), strict=True):
            out[i] = n
    return out  # type: ignore[return-value]


class UnitNorms:
    """Unit-wise L2 norms and scaling of a fixed list of tensors, by groups of equal shapes.

    DTensor shards are completed into whole units where a unit is split across ranks
    (vectors, or weights sharded along a dim other than 0); FSDP2 shards rows along dim 0,
    so its matrices need no communication.

    Args:
        local: the tensors (local shards for DTensors).
        shards: which of them are DTensor shards, as from ``TensorGroups.shards``.

    Attributes:
        groups: the unit groups (see :func:`unit_groups`), lists of tensor indices.
        where: tensor index -> (group, position in the group).
    """

    def __init__(self, local: Sequence[Tensor], shards: dict[int, ShardInfo]) -> None:
        self.groups = unit_groups(local)
        self.shards = shards
        self.ndims = [t.ndim for t in local]
        self.all_cpu = all(t.device.type == "cpu" for t in local)
        self.where = [(0, 0)] * len(local)
        for gi, idx in enumerate(self.groups):
            for k, i in enumerate(idx):
                self.where[i] = (gi, k)

    def local_norms(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Stacked unit norms per group of the local tensors, with no communication."""
        return grouped_unit_norms(tensors, self.groups)

    def norms(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Stacked unit norms per group (whole units, fp32 accumulation)."""
        norms = self.local_norms(tensors)
        if self.shards:
            norms = self.complete(norms, tensors)
        return norms

    def split_dims(self, i: int, tensor_ndim: int) -> tuple[int, ...]:
        """The mesh dims over which tensor ``i``'s units are split (none for a plain tensor;
        rows of a matrix sharded along dim 0 stay whole)."""
        info = self.shards.get(i)
        if info is None:
            return ()
        return tuple(d for d, td in zip(info.mesh_dims, info.tensor_dims, strict=True)
                     if tensor_ndim < 2 or td != 0)

    def complete(self, norms: list[Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
        """Complete split units across ranks: one all-reduce per split tensor and mesh dim."""
        out = []
        for idx, n in zip(self.groups, norms, strict=True):
            rows = list(n.unbind(0))
            for k, i in enumerate(idx):
                dims = self.split_dims(i, tensors[i].ndim)
                if dims:
                    info = self.shards[i]
                    sq = rows[k] * rows[k]
                    for d in dims:
                        all_reduce_norm(sq, 2.0, info.mesh.get_group(d))
                    rows[k] = sq.sqrt()
            out.append(torch.stack(rows))
        return out

    def tensor_norms(self, norms: list[Tensor], cache: DeviceTensorCache | None = None
                     ) -> Tensor:
        """Per-tensor L2 norms, in tensor order, from per-group stacked unit norms (free:
        no second read of the tensors).

        Args:
            norms: stacked unit norms per group, as from :meth:`local_norms`.
            cache: where the reordering index lives on the device (a fresh host->device
                copy otherwise).
        """
        if not norms:
            return torch.zeros(0)
        parts = [torch.linalg.vector_norm(u.flatten(1), dim=1) for u in norms]
        dtype = functools.reduce(torch.promote_types, (x.dtype for x in parts))
        grouped = torch.cat([x.to(dtype) for x in parts])
        order = [i for idx in self.groups for i in idx]
        if order == list(range(len(order))):
            return grouped
        inverse = sorted(range(len(order)), key=order.__getitem__)
        if cache is None:
            index = torch.tensor(inverse, dtype=torch.int64, device=grouped.device)
        else:
            index = cache.index(inverse, grouped.device)
        return grouped.index_select(0, index)

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
                row_sharded[i] = ShardInfo(info.mesh, dims, (0,) * len(dims))
        full = reduce_shard_norms(torch.stack(per_tensor), row_sharded, 2.0)  # type: ignore[arg-type]
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
            mul_list_(sel_t, sel_c, None)
