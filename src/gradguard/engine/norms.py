"""Per-tensor and total norms: every norm gradguard uses is measured here.

Per-tensor norms are computed with one ``torch._foreach_norm`` call per (device, dtype)
group, accumulated in fp32 for fp16/bf16 tensors so that finite fp16 gradients never
give an infinite norm (bf16 shares fp32's range: only norms past 3.4e38 overflow), and
returned as one vector in the order of the input tensors. Total norms
are the norm of that vector, exactly as in :func:`torch.nn.utils.get_total_norm`.
Unit-wise norms (for AGC) live in :mod:`gradguard.engine.units`, in-place scaling in
:mod:`gradguard.engine.scaling`.

Distributed tensors are handled here, so no caller has to remember them:

* A ``DTensor`` gradient (FSDP2 ``fully_shard``) contributes the norm of the *full*
  gradient (:mod:`gradguard.engine.sharding`: local shard norms raised to the p-th power,
  all-reduced in one collective per mesh, the root taken). The result is a plain tensor.
* ``process_group`` reduces a *total* norm over ranks that hold disjoint parameters
  (pipeline-parallel stages, manual sharding schemes).

Nothing in this module reads a tensor value on the host: every result stays on the device.

References:
    torch ``torch/nn/utils/clip_grad.py`` (grouping by device and dtype, foreach with a
    loop fallback).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.engine.sharding import (
    ShardInfo,
    all_reduce_norm,
    dtensor_type,
    localize,
    partial_indices,
    power,
    reduce_shard_norms,
    root,
)

__all__ = [
    "LOW_PRECISION",
    "DeviceTensorCache",
    "TensorGroups",
    "TensorOrTensors",
    "accum_dtype",
    "as_tensor_list",
    "check_floating",
    "foreach_ok",
    "get_grads",
    "get_total_norm",
    "grad_groups",
    "grad_norms",
    "group_by_device_and_dtype",
    "group_norms",
    "raise_if_nonfinite",
    "tensor_norms",
    "total_norm",
    "validate_norm_type",
]

TensorOrTensors = Tensor | Iterable[Tensor]

#: Dtypes whose norms are accumulated in fp32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def check_floating(t: Tensor, what: str) -> None:
    """Raise ``TypeError`` naming ``what`` unless ``t`` is a dense floating-point tensor."""
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
            check_floating(tensors[i], what.format(i))


def check_tensors(tensors: list[Tensor], what: str) -> None:
    """Raise ``TypeError`` for the first sparse or non-floating tensor, naming it with
    ``what.format(index)``; one pass, then one check per distinct (layout, dtype)."""
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
        check_tensors(grads, name + "[{}].grad")
    else:  # name the parameter by its own index, not its index among the gradients
        for i, p in enumerate(params):
            if p.grad is not None:
                check_floating(p.grad, f"{name}[{i}].grad")
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
            check_floating(p.grad, f"{name}[{i}].grad")
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

Groups = dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]
"""Tensors by (device, dtype): ``{(device, dtype): (tensors, their input indices)}``."""


def group_by_device_and_dtype(tensors: list[Tensor]) -> Groups:
    """Group tensors by (device, dtype), keeping their indices. Uses torch's C++ grouping."""
    try:
        from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

        grouped = _group_tensors_by_device_and_dtype([tensors], with_indices=True)
        return {key: (lists[0], idx) for key, (lists, idx) in grouped.items()}
    except (ImportError, TypeError, RuntimeError):  # pragma: no cover - older/odd torch
        groups: Groups = {}
        for i, t in enumerate(tensors):
            tl, il = groups.setdefault((t.device, t.dtype), ([], []))
            tl.append(t)
            il.append(i)
        return groups


def foreach_ok(
    tensors: list[Tensor], device: torch.device, foreach: bool | None,
    types_ok: bool | None = None,
) -> bool:
    """Whether to use foreach kernels (torch's rule); ``types_ok``: the tensor types are
    already known to be supported (saves a pass over the tensors).

    Raises:
        RuntimeError: for ``foreach=True`` on a device without foreach kernels (torch's).
    """
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


def accum_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype norms of ``dtype`` tensors are accumulated in (None: their own)."""
    return torch.float32 if dtype in LOW_PRECISION else None


def _norm_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """fp32 for the norms of any mix of dtypes, fp64 as soon as one input is fp64."""
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


def _empty_norm(p: float) -> float:
    """The p-norm of an empty tensor, as the identity of the reduction over tensors."""
    return math.inf if p < 0 else 0.0


def group_norms(
    group: list[Tensor], p: float, foreach: bool | None, device: torch.device, dtype: torch.dtype,
    types_ok: bool | None = None,
) -> list[Tensor]:
    """The p-norm of each tensor of one (device, dtype) group: one foreach call, fp32
    accumulation for fp16/bf16, and a norm for empty tensors where torch has none."""
    if (math.isinf(p) or p < 0) and any(t.numel() == 0 for t in group):
        # max, min and sum |x|^p for p < 0 have no identity on an empty tensor, so torch
        # refuses these norms of empty tensors (an uneven FSDP2 split leaves some ranks
        # empty shards). An empty tensor must not change the total: its norm is 0 for
        # inf, and +inf for p < 0 (min(+inf, x) = x, (+inf)^p = 0).
        keep = [t for t in group if t.numel()]
        it = iter(group_norms(keep, p, foreach, device, dtype, types_ok) if keep else [])
        fill = torch.full((), _empty_norm(p), device=device, dtype=accum_dtype(dtype) or dtype)
        return [next(it) if t.numel() else fill for t in group]
    acc = accum_dtype(dtype)
    if foreach_ok(group, device, foreach, types_ok):
        if acc is None:
            return list(torch._foreach_norm(group, p))
        return list(torch._foreach_norm(group, p, dtype=acc))
    return [torch.linalg.vector_norm(t, p, dtype=acc) for t in group]


# --------------------------------------------------------------------------------------
# Prepared tensors
# --------------------------------------------------------------------------------------


class TensorGroups:
    """Tensors prepared once for norms and in-place updates.

    DTensors are replaced by their local shards (in-place updates of a shard update the
    DTensor), tensors are grouped by (device, dtype) once, and every operation is one
    foreach call per group (the in-place ones are in :mod:`gradguard.engine.scaling`).
    Build one per step (gradients may be new tensors each step).

    One pass over the tensors collects their (type, layout, dtype, device); validation,
    DTensor detection, foreach support and grouping are then decided per distinct key, so
    thousands of tensors cost little more than the kernels.

    Args:
        tensors: floating-point tensors (e.g. gradients).
        what: the name template for error messages, formatted with the index.
        validate: check layout and dtype (``False`` when the caller already did).

    Attributes:
        tensors: the tensors as given.
        local: the tensors with DTensors replaced by their local shards.
        shards: :class:`~gradguard.engine.sharding.ShardInfo` of the sharded ones, by index.
        partial: indices of ``Partial`` DTensors (measured, but not writable in place).
        groups: ``local`` by (device, dtype), with input indices.
        types_ok: every tensor type is supported by the foreach kernels.
        device: the device of the results (the first tensor's).
        all_cpu: every tensor is on the CPU (host reads of results are free).
        norm_dtype: the dtype of the norms (fp32, fp64 if any tensor is fp64).

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
        dtensor = dtensor_type()
        # Partial DTensors (a pending sum) are measured on a redistributed copy, which
        # in-place updates would not reach: they are refused there (see writable()).
        self.partial: list[int] = []
        self.shards: dict[int, ShardInfo]
        if dtensor is not None and any(issubclass(tp, dtensor) for tp in types):
            self.partial = partial_indices(self.tensors)
            self.local, self.shards = localize(self.tensors)
            types = {type(t) for t in self.local}
            self.groups = group_by_device_and_dtype(self.local)
        else:
            self.local, self.shards = self.tensors, {}
            pairs = {(dev, dt) for _, _, dt, dev in keys}
            if len(pairs) == 1:  # the common case: no grouping pass needed
                self.groups = {next(iter(pairs)): (self.local, list(range(len(self.local))))}
            else:
                self.groups = group_by_device_and_dtype(self.local)
        from torch.utils._foreach_utils import _foreach_supported_types

        self.types_ok = all(tp in _foreach_supported_types for tp in types)
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
            stacked = torch.stack(group_norms(group, p, foreach, dev, dtype, self.types_ok))
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
            norms = reduce_shard_norms(norms, self.shards, p)
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
        powers = power(total, p).reshape(1).contiguous()
        all_reduce_norm(powers, p, process_group)
        total = root(powers, p).reshape(())
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


class DeviceTensorCache:
    """Small constant tensors (index vectors, masks) on the device, made once per layout.

    A per-step ``torch.tensor(indices, device=...)`` is a host->device copy every step;
    the layouts a Guard sees (which gradients are present, which tensors are shards) are
    few, so each is copied once and reused.

    Args:
        limit: the number of cached tensors beyond which the cache starts over.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._cache: dict[tuple, Tensor] = {}

    def get(self, key: tuple, values: list, device: torch.device,
            dtype: torch.dtype | None = None) -> Tensor:
        """``torch.tensor(values, dtype=dtype, device=device)``, cached under ``key``."""
        full_key = (key, device, dtype)
        hit = self._cache.get(full_key)
        if hit is None:
            if len(self._cache) > self.limit:
                self._cache.clear()
            hit = self._cache[full_key] = torch.tensor(values, dtype=dtype, device=device)
        return hit

    def index(self, indices: list[int], device: torch.device) -> Tensor:
        """An int64 index tensor for ``indices`` on ``device``."""
        return self.get(("index", tuple(indices)), indices, device, torch.int64)
