"""The norm engine: every norm gradguard uses is computed here.

Per-tensor norms are computed with one ``torch._foreach_norm`` call per (device, dtype)
group, accumulated in fp32 for fp16/bf16 tensors so that finite fp16 gradients never
give an infinite norm (bf16 shares fp32's range: only norms past 3.4e38 overflow), and
returned as one vector in the order of the input tensors. Total norms
are the norm of that vector, exactly as in :func:`torch.nn.utils.get_total_norm`.
Unit-wise norms (for AGC) are computed per group of equal shapes, a few kernels in all.

Distributed tensors are handled here, so no caller has to remember them:

* A ``DTensor`` gradient (FSDP2 ``fully_shard``) contributes the norm of the *full*
  gradient: local shard norms are raised to the p-th power, all-reduced in one collective
  per mesh, and the root is taken. The result is a plain tensor.
* ``process_group`` reduces a *total* norm over ranks that hold disjoint parameters
  (pipeline-parallel stages, manual sharding schemes).

Nothing in this module reads a tensor value on the host: every result stays on the device.

References:
    torch ``torch/nn/utils/clip_grad.py`` (grouping by device and dtype, foreach with a
    loop fallback).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TensorGroups",
    "TensorOrTensors",
    "as_tensor_list",
    "get_grads",
    "get_total_norm",
    "grad_norms",
    "tensor_norms",
    "total_norm",
    "unit_norms",
    "unit_shape",
    "validate_norm_type",
]

TensorOrTensors = Tensor | Iterable[Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Tensors with at least this many elements get their unit-wise norms one kernel each (the
# kernel dwarfs the Python overhead); smaller ones are stacked by shape and reduced
# together, at most this many elements per stack, so thousands of small tensors cost a
# handful of calls and the temporary stays small.
_UNIT_BATCH_MAX_NUMEL = 1 << 16
_UNIT_STACK_MAX_NUMEL = 1 << 24


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _as_list(tensors: TensorOrTensors, name: str) -> list[Any]:
    if isinstance(tensors, Tensor):
        return [tensors]
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(
            f"{name} must be a Tensor or an iterable of Tensors, got {type(tensors).__name__}"
        )
    return list(tensors)


def _raise_not_tensor(items: list[Any], name: str) -> None:
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{name}[{i}] must be a Tensor, got {type(t).__name__}; pass model.parameters() "
                "or a list of tensors"
            )


def as_tensor_list(tensors: TensorOrTensors, name: str = "parameters") -> list[Tensor]:
    """Turn a tensor, an iterable of tensors or ``model.parameters()`` into a list.

    Args:
        tensors: a Tensor, or an iterable of Tensors/Parameters (a generator is consumed).
        name: the argument name used in error messages.

    Returns:
        A new list of the tensors.

    Raises:
        TypeError: if ``tensors`` is not a tensor or an iterable of tensors.
    """
    out = _as_list(tensors, name)
    _raise_not_tensor(out, name)
    return out


def _check_floating(t: Tensor, what: str) -> None:
    if t.layout != torch.strided:
        raise TypeError(
            f"{what} has layout {t.layout}; gradguard supports dense (strided) gradients only. "
            "Use dense gradients (e.g. nn.Embedding(..., sparse=False))."
        )
    if not t.is_floating_point():
        raise TypeError(f"{what} has dtype {t.dtype}; gradients must be floating point")


def _check_keys(tensors: list[Tensor], keys: set[tuple], what: str) -> None:
    """Raise for the first tensor of a bad (layout, dtype), given the scanned keys."""
    for _, layout, dtype, _ in keys:
        if layout != torch.strided or not dtype.is_floating_point:
            i = next(i for i, t in enumerate(tensors) if (t.layout, t.dtype) == (layout, dtype))
            _check_floating(tensors[i], what.format(i))


def _validate(tensors: list[Tensor], what: str) -> None:
    # One pass over the tensors, then one check per distinct (layout, dtype).
    _check_keys(tensors, {(None, t.layout, t.dtype, None) for t in tensors}, what)


def get_grads(parameters: TensorOrTensors, name: str = "parameters") -> list[Tensor]:
    """The ``.grad`` of each parameter that has one, validated.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        name: the argument name used in error messages.

    Returns:
        The gradients, in parameter order, ``None`` gradients skipped.

    Raises:
        TypeError: on sparse or non-floating gradients.
    """
    params = _as_list(parameters, name)
    try:
        grads = [g for p in params if (g := p.grad) is not None]
    except AttributeError:  # not a tensor: say which (checked only here, off the hot path)
        _raise_not_tensor(params, name)
        raise
    if len(grads) == len(params):
        _validate(grads, name + "[{}].grad")
    else:  # name the parameter by its own index, not its index among the gradients
        for i, p in enumerate(params):
            if p.grad is not None:
                _check_floating(p.grad, f"{name}[{i}].grad")
    return grads


def grad_groups(parameters: TensorOrTensors, name: str = "parameters") -> TensorGroups:
    """The gradients of ``parameters`` (``None`` skipped), validated and prepared in one
    pass: what every clipping function starts from.

    Raises:
        TypeError: for a non-tensor, or a sparse or non-floating gradient, naming it.
    """
    params = _as_list(parameters, name)
    try:
        grads = [g for p in params if (g := p.grad) is not None]
    except AttributeError:
        _raise_not_tensor(params, name)
        raise
    if len(grads) == len(params):
        return TensorGroups(grads, what=name + "[{}].grad")
    for i, p in enumerate(params):  # name the parameter by its own index
        if p.grad is not None:
            _check_floating(p.grad, f"{name}[{i}].grad")
    return TensorGroups(grads, validate=False)


def validate_norm_type(norm_type: object, *, torch_compatible: bool = False) -> float:
    """Check a norm order.

    By default a real number > 0, or ``inf`` (what the Guard and AGC need). With
    ``torch_compatible`` every order ``torch.linalg.vector_norm`` accepts: also ``0`` (the
    number of non-zero entries), negative orders and ``-inf`` (the smallest absolute
    value), as torch's ``clip_grad_norm_`` and ``get_total_norm`` do.

    Args:
        norm_type: the order ``p`` of the p-norm. Strings are read with ``float()``, as
            torch does (``'inf'``, ``'-inf'``).
        torch_compatible: accept ``p <= 0`` and ``-inf`` as well.

    Returns:
        ``norm_type`` as a float.

    Raises:
        TypeError: if it is not a number (bools and tensors included: the order selects
            the kernel, so it must be known on the host).
        ValueError: if it is NaN; without ``torch_compatible``, also if it is not > 0.
    """
    p: float | None = None
    if isinstance(norm_type, str):
        try:
            p = float(norm_type)
        except ValueError:
            p = None
    elif not isinstance(norm_type, bool) and isinstance(norm_type, numbers.Real):
        p = float(norm_type)
    if p is None:
        raise TypeError(f"norm_type must be a number or 'inf', got {norm_type!r}")
    if math.isnan(p):
        raise ValueError(f"norm_type must not be NaN, got {norm_type!r}")
    if not torch_compatible and p <= 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}")
    return p


# --------------------------------------------------------------------------------------
# Grouping and foreach
# --------------------------------------------------------------------------------------

_Groups = dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]


def _group_by_device_and_dtype(tensors: list[Tensor]) -> _Groups:
    """Group tensors by (device, dtype), keeping their indices. Uses torch's C++ grouping."""
    try:
        from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

        grouped = _group_tensors_by_device_and_dtype([tensors], with_indices=True)
        return {key: (lists[0], idx) for key, (lists, idx) in grouped.items()}
    except (ImportError, TypeError, RuntimeError):  # pragma: no cover - older/odd torch
        groups: _Groups = {}
        for i, t in enumerate(tensors):
            tl, il = groups.setdefault((t.device, t.dtype), ([], []))
            tl.append(t)
            il.append(i)
        return groups


def _foreach_ok(
    tensors: list[Tensor], device: torch.device, foreach: bool | None,
    types_ok: bool | None = None,
) -> bool:
    """Whether to use foreach kernels (torch's rule); ``types_ok``: the tensor types are
    already known to be supported (saves a pass over the tensors)."""
    from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

    if foreach is None:
        if types_ok is not None:
            return types_ok and _device_has_foreach_support(device)
        return _has_foreach_support(tensors, device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return bool(foreach)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype norms of ``dtype`` tensors are accumulated in (None: their own)."""
    return torch.float32 if dtype in _LOW_PRECISION else None


def _norm_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """fp32 for the norms of any mix of dtypes, fp64 as soon as one input is fp64."""
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


def _empty_norm(p: float) -> float:
    """The p-norm of an empty tensor, as the identity of the reduction over tensors."""
    return math.inf if p < 0 else 0.0


def _group_norms(
    group: list[Tensor], p: float, foreach: bool | None, device: torch.device, dtype: torch.dtype,
    types_ok: bool | None = None,
) -> list[Tensor]:
    if (math.isinf(p) or p < 0) and any(t.numel() == 0 for t in group):
        # max, min and sum |x|^p for p < 0 have no identity on an empty tensor, so torch
        # refuses these norms of empty tensors (an uneven FSDP2 split leaves some ranks
        # empty shards). An empty tensor must not change the total: its norm is 0 for
        # inf, and +inf for p < 0 (min(+inf, x) = x, (+inf)^p = 0).
        keep = [t for t in group if t.numel()]
        it = iter(_group_norms(keep, p, foreach, device, dtype, types_ok) if keep else [])
        fill = torch.full((), _empty_norm(p), device=device, dtype=_accum_dtype(dtype) or dtype)
        return [next(it) if t.numel() else fill for t in group]
    acc = _accum_dtype(dtype)
    if _foreach_ok(group, device, foreach, types_ok):
        if acc is None:
            return list(torch._foreach_norm(group, p))
        return list(torch._foreach_norm(group, p, dtype=acc))
    return [torch.linalg.vector_norm(t, p, dtype=acc) for t in group]


# --------------------------------------------------------------------------------------
# DTensor support (lazy: torch.distributed may be absent or not initialised)
# --------------------------------------------------------------------------------------


@functools.cache
def _dtensor_type() -> type | None:
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
class _ShardInfo:
    """Where a DTensor's local norms must be reduced: its mesh and the sharded mesh dims."""

    mesh: object
    mesh_dims: tuple[int, ...]
    tensor_dims: tuple[int, ...]  # the tensor dim sharded along each of ``mesh_dims``


def _localize(tensors: list[Tensor]) -> tuple[list[Tensor], dict[int, _ShardInfo]]:
    """Replace DTensors by their local shards; say which need a cross-rank reduction."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(issubclass(tp, dtensor) for tp in {type(t) for t in tensors}):
        return tensors, {}
    local: list[Tensor] = []
    shards: dict[int, _ShardInfo] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, dtensor):
            local.append(t)
            continue
        if any(pl.is_partial() for pl in t.placements):
            # A pending sum: the norm of the sum is not a function of the local norms.
            from torch.distributed.tensor import Replicate

            t = t.redistribute(
                t.device_mesh,
                [Replicate() if pl.is_partial() else pl for pl in t.placements],
            )
        dims = tuple(d for d, pl in enumerate(t.placements) if pl.is_shard())
        if dims:
            shards[i] = _ShardInfo(
                t.device_mesh, dims, tuple(t.placements[d].dim for d in dims)
            )
        local.append(t.to_local())
    return local, shards


# How norms of disjoint parts combine: ``root(reduce(power(parts)))``. For p = 0 the
# "norm" is a count of non-zero entries, which simply adds up; inf takes the max, -inf the
# min; every other p sums the p-th powers (negative p included: (+inf)^p = 0 adds nothing).


def _power(norms: Tensor, p: float) -> Tensor:
    if math.isinf(p) or p in (0.0, 1.0):
        return norms
    if p == 2.0:
        return norms * norms
    return norms.pow(p)


def _root(powers: Tensor, p: float) -> Tensor:
    if math.isinf(p) or p in (0.0, 1.0):
        return powers
    if p == 2.0:
        return powers.sqrt()
    return powers.pow(1.0 / p)


def _all_reduce(t: Tensor, p: float, group: object) -> None:
    import torch.distributed as dist

    ops = {math.inf: dist.ReduceOp.MAX, -math.inf: dist.ReduceOp.MIN}
    dist.all_reduce(t, op=ops.get(p, dist.ReduceOp.SUM), group=group)


def _reduce_shard_norms(norms: Tensor, shards: dict[int, _ShardInfo], p: float) -> Tensor:
    """Combine local shard norms into full-tensor norms: one collective per mesh dim group."""
    by_key: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    meshes: dict[tuple[int, tuple[int, ...]], _ShardInfo] = {}
    for i, info in shards.items():
        key = (id(info.mesh), info.mesh_dims)
        by_key.setdefault(key, []).append(i)
        meshes[key] = info
    entries = list(norms.unbind(0))
    for key, idx in by_key.items():
        info = meshes[key]
        # Python-int indexing and stack only: an index tensor would need a host->device copy.
        powers = _power(torch.stack([entries[i] for i in idx]), p)
        for d in info.mesh_dims:
            _all_reduce(powers, p, info.mesh.get_group(d))
        for i, v in zip(idx, _root(powers, p).unbind(0), strict=True):
            entries[i] = v
    return torch.stack(entries)


# --------------------------------------------------------------------------------------
# Prepared tensors
# --------------------------------------------------------------------------------------


class TensorGroups:
    """Tensors prepared once for norms and in-place updates.

    DTensors are replaced by their local shards (in-place updates of a shard update the
    DTensor), tensors are grouped by (device, dtype) once, and every operation is one
    foreach call per group. Build one per step (gradients may be new tensors each step).

    One pass over the tensors collects their (type, layout, dtype, device); validation,
    DTensor detection, foreach support and grouping are then decided per distinct key, so
    thousands of tensors cost little more than the kernels.

    Args:
        tensors: floating-point tensors (e.g. gradients).
        what: the name template for error messages, formatted with the index.
        validate: check layout and dtype (``False`` when the caller already did).

    Raises:
        TypeError: for a sparse or non-floating tensor, naming it.
    """

    def __init__(
        self, tensors: Sequence[Tensor], what: str = "tensors[{}]", validate: bool = True
    ) -> None:
        self.tensors = list(tensors)
        keys = {(type(t), t.layout, t.dtype, t.device) for t in self.tensors}
        if validate:
            _check_keys(self.tensors, keys, what)
        types = {k[0] for k in keys}
        dtensor = _dtensor_type()
        # Partial DTensors (a pending sum) are measured on a redistributed copy, which
        # in-place updates would not reach: they are refused there (see writable()).
        self.partial: list[int] = []
        if dtensor is not None and any(issubclass(tp, dtensor) for tp in types):
            self.partial = [i for i, t in enumerate(self.tensors) if isinstance(t, dtensor)
                            and any(pl.is_partial() for pl in t.placements)]
            self.local, self.shards = _localize(self.tensors)
            types = {type(t) for t in self.local}
            self.groups = _group_by_device_and_dtype(self.local)
        else:
            self.local, self.shards = self.tensors, {}
            pairs = {(dev, dt) for _, _, dt, dev in keys}
            if len(pairs) == 1:  # the common case: no grouping pass needed
                self.groups = {next(iter(pairs)): (self.local, list(range(len(self.local))))}
            else:
                self.groups = _group_by_device_and_dtype(self.local)
        from torch.utils._foreach_utils import _foreach_supported_types

        self._types_ok = all(tp in _foreach_supported_types for tp in types)
        self.device = self.local[0].device if self.local else torch.device("cpu")
        self.all_cpu = all(dev.type == "cpu" for dev, _ in self.groups)
        self.norm_dtype = _norm_dtype(dt for _, dt in self.groups)

    def __len__(self) -> int:
        return len(self.tensors)

    def _group_parts(self, p: float, foreach: bool | None) -> list[tuple[Tensor, list[int]]]:
        """Per (device, dtype) group, in the grouping's order: the stacked norms (on
        :attr:`device`, in :attr:`norm_dtype`) and the group's input indices."""
        parts = []
        for (dev, dtype), (group, idx) in self.groups.items():
            # One stack and one transfer per group.
            stacked = torch.stack(_group_norms(group, p, foreach, dev, dtype, self._types_ok))
            parts.append((stacked.to(device=self.device, dtype=self.norm_dtype), idx))
        return parts

    def norms(
        self, norm_type: float, foreach: bool | None = None, *, reduce: bool = True
    ) -> Tensor:
        """Per-tensor norms, in input order, on :attr:`device`.

        Args:
            norm_type: the order p.
            foreach: use foreach kernels (``None``: where supported).
            reduce: combine DTensor shards into full-tensor norms (collectives); ``False``
                gives the norms of the local shards, with no communication.
        """
        p = norm_type
        if not self.local:
            return torch.zeros(0)
        parts = self._group_parts(p, foreach)
        if len(parts) == 1:
            norms = parts[0][0]
        else:
            ordered: list[Tensor | None] = [None] * len(self.local)
            for stacked, idx in parts:  # views for reordering: no index tensor to copy
                for i, n in zip(idx, stacked.unbind(0), strict=True):
                    ordered[i] = n
            norms = torch.stack(ordered)  # type: ignore[arg-type]
        if self.shards and reduce:
            norms = _reduce_shard_norms(norms, self.shards, p)
        return norms

    def total_norm(
        self, norm_type: float, foreach: bool | None = None, *,
        process_group: object | None = None,
    ) -> Tensor:
        """The norm of all tensors viewed as one vector, computed as torch computes it.

        torch takes the p-norm of the per-tensor norms in the order of its (device, dtype)
        grouping, not in input order; with several groups the two orders round differently
        (p = 2 aside), so the same order is used here: the total is bitwise torch's.

        Args:
            norm_type: the order p.
            foreach: use foreach kernels (``None``: where supported).
            process_group: reduce the total over this group (see :func:`total_norm`).
        """
        p = norm_type
        if not self.local:
            return total_norm(torch.zeros(0), p, process_group=process_group)
        if self.shards:  # full-tensor norms need the input order for their reduction
            return total_norm(self.norms(p, foreach), p, process_group=process_group)
        parts = self._group_parts(p, foreach)
        vec = parts[0][0] if len(parts) == 1 else torch.cat([stacked for stacked, _ in parts])
        return total_norm(vec, p, process_group=process_group)

    def writable(self) -> None:
        """Raise unless in-place updates of :attr:`local` reach the tensors themselves."""
        if self.partial:
            raise TypeError(
                f"{len(self.partial)} gradient(s) are DTensors with a Partial placement (a "
                "pending cross-rank sum): their norm can be measured, but they cannot be "
                "clipped in place; redistribute them (e.g. to Shard or Replicate) first"
            )

    def mul_(self, coef: Tensor, foreach: bool | None = None) -> None:
        """Multiply in place by a coefficient ``<= 1``: a 0-d tensor or one per tensor.

        On CPU, tensors whose coefficient is not below 1 are left untouched (the multiply
        would be the identity and the check is free there); on accelerators every tensor is
        multiplied, branch-free, so that no device->host read is needed.
        """
        if not self.local:
            return
        self.writable()
        if coef.ndim == 0:
            if self.all_cpu and coef.device.type == "cpu" and bool(coef >= 1):
                return
            for (device, _), (group, _) in self.groups.items():
                c = coef.to(device)
                if _foreach_ok(group, device, foreach, self._types_ok):
                    torch._foreach_mul_(group, c)
                else:
                    for g in group:
                        g.mul_(c)
            return
        coefs = list(coef.unbind(0))
        if self.all_cpu and coef.device.type == "cpu":
            clip = torch.logical_not(coef >= 1).tolist()  # NaN coefficients multiply too
            keep = [i for i, c in enumerate(clip) if c]
            if not keep:
                return
            if len(keep) < len(self.local):
                _mul_list_([self.local[i] for i in keep], [coefs[i] for i in keep], foreach)
                return
        _mul_list_(self.local, coefs, foreach)

    def clamp_(self, value: float | Tensor, foreach: bool | None = None) -> None:
        """Clamp every entry to ``[-value, value]`` in place, with torch's kernels.

        ``value`` may be a 0-d tensor: it is used on the device (the foreach clamps take a
        tensor only as one bound per tensor; a scalar would be read on the host).
        """
        self.writable()
        for (device, dtype), (group, _) in self.groups.items():
            if isinstance(value, Tensor):
                hi: float | Tensor = value.to(device=device, dtype=dtype)
                lo: float | Tensor = -hi
            else:
                # Past the dtype's largest value every entry is inside the bounds; torch
                # raises instead ("value cannot be converted to type c10::Half without
                # overflow"). A tensor bound past the range becomes inf in the cast.
                hi = math.inf if value > torch.finfo(dtype).max else value
                lo = -hi
            if _foreach_ok(group, device, foreach, self._types_ok):
                if isinstance(hi, Tensor):
                    torch._foreach_clamp_min_(group, [lo] * len(group))
                    torch._foreach_clamp_max_(group, [hi] * len(group))
                else:
                    torch._foreach_clamp_min_(group, lo)
                    torch._foreach_clamp_max_(group, hi)
            else:
                for g in group:
                    g.clamp_(min=lo, max=hi)


def _mul_list_(tensors: list[Tensor], coefs: list[Tensor], foreach: bool | None) -> None:
    """``tensors[i] *= coefs[i]`` (broadcasting), one foreach call per (device, dtype)."""
    for (device, _), (group, idx) in _group_by_device_and_dtype(tensors).items():
        c = [coefs[i].to(device) for i in idx]
        if _foreach_ok(group, device, foreach):
            torch._foreach_mul_(group, c)
        else:
            for g, ci in zip(group, c, strict=True):
                g.mul_(ci)


# --------------------------------------------------------------------------------------
# Per-tensor and total norms
# --------------------------------------------------------------------------------------


@torch.no_grad()
def tensor_norms(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    *,
    foreach: bool | None = None,
) -> Tensor:
    """The p-norm of each tensor, as one vector.

    Low-precision tensors are accumulated in fp32; DTensor shards are combined into the
    norm of the full tensor (one all-reduce per mesh), so the result is always a plain
    tensor.

    Args:
        tensors: a Tensor or an iterable of Tensors (e.g. gradients).
        norm_type: the order p, any order ``torch.linalg.vector_norm`` takes: ``inf``
            (max-abs), ``-inf`` (min-abs), ``0`` (number of non-zero entries), negative.
            An empty tensor's norm is 0, or ``+inf`` for p < 0 (it changes no total;
            torch raises for inf and p < 0).
        foreach: use ``torch._foreach_norm`` (``None``: where supported).

    Returns:
        A 1-D fp32 tensor (fp64 if any input is fp64) on the first tensor's device, one
        entry per input tensor in input order; empty if there are no tensors.

    Example:
        >>> import torch, gradguard as gg
        >>> gg.tensor_norms([torch.ones(4), torch.full((2,), 3.0)])
        tensor([2.0000, 4.2426])
    """
    p = validate_norm_type(norm_type, torch_compatible=True)
    return TensorGroups(as_tensor_list(tensors, "tensors")).norms(p, foreach)


@torch.no_grad()
def total_norm(
    norms: Tensor, norm_type: float = 2.0, *, process_group: object | None = None
) -> Tensor:
    """The norm of all tensors viewed as one vector, from their per-tensor norms.

    Args:
        norms: per-tensor norms, as returned by :func:`tensor_norms`.
        norm_type: the order p used for ``norms``.
        process_group: if given, the total is also reduced over this group, for ranks that
            hold disjoint parameters (pipeline stages): the result is the norm over all of
            them, identical on every rank.

    Returns:
        A 0-d tensor on ``norms``' device.
    """
    p = validate_norm_type(norm_type, torch_compatible=True)
    if norms.numel() == 0:
        total = torch.zeros((), dtype=norms.dtype, device=norms.device)
    else:
        total = torch.linalg.vector_norm(norms, p)
    if process_group is not None:
        powers = _power(total, p).reshape(1).contiguous()
        _all_reduce(powers, p, process_group)
        total = _root(powers, p).reshape(())
    return total


def grad_norms(
    parameters: TensorOrTensors,
    norm_type: float = 2.0,
    *,
    foreach: bool | None = None,
) -> tuple[list[Tensor], Tensor]:
    """The gradients of ``parameters`` and their per-tensor norms.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``model.parameters()``.
        norm_type: the order p.
        foreach: use the foreach kernels (``None``: where supported).

    Returns:
        ``(grads, norms)``: the non-``None`` gradients and a vector of their norms.
    """
    p = validate_norm_type(norm_type, torch_compatible=True)
    grads = get_grads(parameters)
    with torch.no_grad():
        return grads, TensorGroups(grads).norms(p, foreach)


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: object | None = None,
) -> Tensor:
    """The norm of ``tensors`` viewed as one vector (like ``torch.nn.utils.get_total_norm``).

    Unlike torch, fp16/bf16 tensors are accumulated in fp32, so a finite fp16 input never
    gives an infinite norm (a bf16 one only past fp32's range, 3.4e38); DTensors give the
    norm of the full tensor as a plain tensor.

    Args:
        tensors: a Tensor or an iterable of Tensors (e.g. ``[p.grad for p in ...]``).
        norm_type: the order p, any order torch takes (see :func:`tensor_norms`). As in
            torch, the total is the p-norm of the per-tensor norms; for p = 0 that is the
            number of tensors with a non-zero entry.
        error_if_nonfinite: raise if the norm is NaN or infinite. This reads the norm on
            the host: one device synchronisation.
        foreach: use the foreach kernels (``None``: where supported).
        process_group: reduce the total over this group (disjoint parameters per rank).

    Returns:
        A 0-d fp32 tensor (fp64 for fp64 inputs); ``tensor(0.)`` for no tensors.

    Raises:
        RuntimeError: if ``error_if_nonfinite`` and the norm is not finite.
    """
    p = validate_norm_type(norm_type, torch_compatible=True)
    groups = TensorGroups(as_tensor_list(tensors, "tensors"))
    total = groups.total_norm(p, foreach, process_group=process_group)
    if error_if_nonfinite:
        raise_if_nonfinite(total, norm_type)
    return total


def raise_if_nonfinite(total: Tensor, norm_type: float) -> None:
    """Raise torch's error for a non-finite total norm (a host read: one sync)."""
    if not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the "
            "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )


# --------------------------------------------------------------------------------------
# Unit-wise norms (AGC)
# --------------------------------------------------------------------------------------


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
    at most ``_UNIT_STACK_MAX_NUMEL`` elements; matrices of ``_UNIT_BATCH_MAX_NUMEL``
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
        if numel == 0 or (len(size) >= 2 and numel >= _UNIT_BATCH_MAX_NUMEL):
            groups.extend([i] for i in idx)
            continue
        per_chunk = max(1, _UNIT_STACK_MAX_NUMEL // numel)  # the stacked copy stays bounded
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
        acc = _accum_dtype(first.dtype)
        if first.numel() == 0:
            norms = torch.zeros((1, *unit_shape(first)), device=first.device,
                                dtype=acc or first.dtype)
        elif first.ndim < 2:
            group = [tensors[i] for i in idx]
            norms = torch.stack(_group_norms(group, p, None, first.device, first.dtype))
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
    _validate(tensors, "tensors[{}]")
    groups = unit_groups(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    for idx, norms in zip(groups, grouped_unit_norms(tensors, groups, p), strict=True):
        for i, n in zip(idx, norms.unbind(0), strict=True):
            out[i] = n
    return out  # type: ignore[return-value]
