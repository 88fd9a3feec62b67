"""Distributed training: one collective per Guard step, and the same decision on every rank.

Under data parallelism every rank must take the same decision at every step: the same clip
coefficient, the same skip, the same rollback. If they do not, the replicas drift apart, or
one rank waits forever in a collective the others never call (skipping a step on one rank
under DDP is the classic hang). The Guard therefore makes every decision from data that is
identical on all ranks, and gets that data with **one** ``all_reduce`` of a small packed
vector per step, whatever the policy:

``codes`` (one slot per rank)
    what this rank saw: its loss was non-finite (:data:`LOSS_NONFINITE`), its own gradient
    was non-finite *before* the cross-rank reduction (:data:`GRAD_NONFINITE`, from
    :func:`register_nonfinite_hook`), the gradients it holds were non-finite
    (:data:`LOCAL_NONFINITE`), it observed a loss, a GradScaler overflow. Only rank ``r``
    writes slot ``r``, so after the reduction every rank knows which ranks saw what.
``loss`` (one slot per rank)
    the rank's observed loss; the Guard records their mean (the loss of the global batch),
    so monitor records, events and the remedies driven by them agree on every rank.
per-tensor p-th powers of the local shard norms (one slot per sharded gradient)
    FSDP2 (``fully_shard``) gradients are ``DTensor`` shards; the norm of the full gradient
    is the p-th root of the sum of the shards' p-th powers. These used to be one
    all-reduce per mesh inside the norm engine; here they travel in the same vector.
extras, only when needed
    per-rank total p-th powers for ``Guard(process_group=...)`` (ranks holding disjoint
    parameters), AGC unit norms split across ranks, the parameter norm a policy asks for.

The vector is reduced with ``SUM`` (``MAX`` for the inf-norm); slots owned by one rank hold
the operation's identity on the others, so both operations deliver every slot exactly.
gloo's ``MAX`` drops NaN (``max(NaN, 3) = 3``), so under ``MAX`` values travel re-encoded in
the order finite < inf < NaN (inf as the largest finite float, NaN as ``+inf``) and are
decoded after: NaN still wins, as in torch. A rank whose mesh coordinate merely replicates
a shard (HSDP) contributes zero to the sums, so nothing is counted twice.

The skip decision is ``total is finite and no rank flagged non-finite gradients``, read on
the host *after* the collective: every rank reads the same value and takes the same branch,
and every rank has issued the same collectives, so nothing can hang.

**Which rank saw it first.** Under DDP the gradients are all-reduced inside ``backward()``
(NaN + x = NaN), so after it every rank holds the NaN and the gradients no longer say where
it came from; under FSDP2 the reduce-scatter sends it to the ranks that own the affected
elements. The origin is known from evidence taken *before* the reduction: the rank's loss
(``guard.observe_loss(loss)``: free), or its own gradient buckets, checked by the DDP comm
hook of :func:`register_nonfinite_hook` (one max-abs read of the gradients per step, on the
backward path). The event's ``rank`` is the lowest rank with such evidence; failing that,
the lowest rank whose gradients were non-finite when the Guard read them (the shard owner
under FSDP2; every rank under DDP, hence rank 0). "First" is within the step: ranks run a
step in parallel, so there is no earlier or later among them.

Limits, each costing extra collectives rather than a wrong answer: DTensors on a mesh that
does not span exactly the synchronised ranks, ``process_group`` together with DTensor
gradients (pipeline x FSDP), and AGC on tensors split along dim 0 *and* another dim (2-D
sharding) are reduced by the norm engine, one all-reduce per mesh dimension. ``Partial``
DTensor gradients are redistributed (a collective) by the norm engine before anything else.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from gradguard import norms as _norms

__all__ = [
    "GRAD_NONFINITE",
    "LOCAL_NONFINITE",
    "LOSS_NONFINITE",
    "LOSS_OBSERVED",
    "OVERFLOW",
    "CollectiveCounter",
    "GuardSync",
    "Measured",
    "is_distributed",
    "register_nonfinite_hook",
]

#: Bits of a rank's code in the packed vector.
LOSS_NONFINITE = 1  # the rank's loss (any observed since the last step) was NaN/inf
GRAD_NONFINITE = 2  # its own gradient was NaN/inf before the all-reduce (DDP comm hook)
LOCAL_NONFINITE = 4  # the gradients (shards) it held at the Guard step were NaN/inf
LOSS_OBSERVED = 8  # it called observe_loss since the last step
OVERFLOW = 16  # a fused optimizer's GradScaler flag said overflow

_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------
# Counting collectives
# --------------------------------------------------------------------------------------


class CollectiveCounter(TorchDispatchMode):
    """Count the collectives issued inside a ``with`` block.

    Every c10d collective (``dist.all_reduce``, ``barrier``, ...) and functional collective
    (DTensor redistribution) goes through the dispatcher, where this mode sees it, whoever
    calls it. ``wait_tensor`` is not counted.

    Example::

        with CollectiveCounter() as c:
            guard.step()
        assert c.count == 1, c.calls
    """

    def __init__(self) -> None:
        super().__init__()
        #: The collectives seen, in order (op names such as ``c10d.allreduce_.default``).
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace in _COLLECTIVE_NAMESPACES and "wait" not in str(func):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        """How many collectives were issued."""
        return len(self.calls)


# --------------------------------------------------------------------------------------
# The packed vector
# --------------------------------------------------------------------------------------


class _Packer:
    """Pieces of one vector, reduced by one ``all_reduce`` and read back by handles."""

    def __init__(self, *, op_max: bool, rank: int, world: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.op_max = op_max
        self.rank, self.world = rank, world
        self.dtype, self.device = dtype, device
        self.identity = -math.inf if op_max else 0.0
        self.parts: list[Tensor] = []
        self.size = 0
        self.result: Tensor | None = None

    def _add(self, t: Tensor) -> slice:
        t = t.reshape(-1).to(device=self.device, dtype=self.dtype)
        if self.op_max:  # gloo's MAX drops NaN: order finite < inf < NaN by re-encoding
            big = torch.finfo(self.dtype).max
            t = torch.where(torch.isnan(t), math.inf, torch.where(t == math.inf, big, t))
        s = slice(self.size, self.size + t.numel())
        self.parts.append(t)
        self.size += t.numel()
        return s

    def _get(self, s: slice) -> Tensor:
        assert self.result is not None, "read before the all-reduce"
        t = self.result.narrow(0, s.start, s.stop - s.start)  # (narrow: FakeTensor-safe)
        if self.op_max:
            big = torch.finfo(self.dtype).max
            t = torch.where(t == math.inf, math.nan, torch.where(t == big, math.inf, t))
        return t

    def reduce(self, values: Tensor) -> Callable[[], Tensor]:
        """Reduced with the vector's operation (sum of p-th powers, or max)."""
        s = self._add(values)
        return lambda: self._get(s)

    def per_rank(self, values: Tensor) -> Callable[[], Tensor]:
        """Every rank's ``values``, as a ``(world, n)`` tensor."""
        n = values.numel()
        block = torch.cat([
            torch.full((self.rank * n,), self.identity, dtype=self.dtype, device=self.device),
            values.reshape(-1).to(device=self.device, dtype=self.dtype),
            torch.full(((self.world - self.rank - 1) * n,), self.identity, dtype=self.dtype,
                       device=self.device),
        ])
        s = self._add(block)
        return lambda: self._get(s).reshape(self.world, n)

    def sum(self, value: Tensor) -> Callable[[], Tensor]:
        """The sum over ranks of a 0-d value, whatever the vector's operation."""
        if not self.op_max:
            get = self.reduce(value)
            return lambda: get().reshape(())
        get_block = self.per_rank(value)
        return lambda: get_block().sum()

    def run(self, group: Any) -> None:
        import torch.distributed as dist

        buf = torch.cat(self.parts)
        op = dist.ReduceOp.MAX if self.op_max else dist.ReduceOp.SUM
        dist.all_reduce(buf, op=op, group=group)  # THE collective of the step
        self.result = buf


# --------------------------------------------------------------------------------------
# What a Guard step gets back
# --------------------------------------------------------------------------------------


@dataclass
class Measured:
    """The statistics of one step after the collective: identical on every rank.

    Attributes:
        norms: per-tensor norms of the full gradients present this step (fp32).
        total: the total norm (fp32, 0-d).
        finite: 0-d bool: the total is finite and no rank flagged non-finite gradients.
        overflow: 0-d bool: some rank's fused-optimizer GradScaler reported an overflow
            (``None`` when no ``found_inf`` was given).
        loss: the mean of the losses the ranks observed (fp32, 0-d; NaN if none did).
        codes: per-rank codes (see the module constants), indexed by rank in the group.
        param_norm: the L2 norm of all guarded parameters, when the policy asked for it.
        unit, g_units, w_units: AGC only: the unit groups and the whole unit norms of the
            gradients and parameters.
    """

    norms: Tensor
    total: Tensor
    finite: Tensor
    overflow: Tensor | None
    loss: Tensor
    codes: Tensor
    param_norm: Tensor | None = None
    unit: Any = None
    g_units: list[Tensor] | None = None
    w_units: list[Tensor] | None = None
    _agc: _AgcPlan | None = None

    def agc_summary(self, coefs: list[Tensor], *, ones_if_nonfinite: bool = False
                    ) -> tuple[Tensor, Tensor]:
        """The smallest unit coefficient and the post-clip total norm, over all ranks.

        Args:
            coefs: the unit coefficients applied, one stacked tensor per unit group.
            ones_if_nonfinite: the coefficients were forced to 1 on non-finite steps
                (``Guard(nonfinite="ignore")``).

        Returns:
            ``(coef, post_norm)``, 0-d fp32 tensors, the same on every rank.
        """
        plan = self._agc
        assert plan is not None and self.g_units is not None
        coef, post_sq = plan.summary(self.g_units, coefs, skip_rows=True)
        if plan.get_rows_min is not None and plan.get_rows_post is not None:
            coef = torch.minimum(coef, plan.get_rows_min().amin().to(coef.dtype))
            post_sq = post_sq + plan.get_rows_post().to(post_sq.dtype)
        dev = self.total.device
        coef = coef.to(dev, torch.float32)
        post = post_sq.sqrt().to(dev, torch.float32)
        if ones_if_nonfinite:
            coef = torch.where(self.finite, coef, torch.ones_like(coef))
            post = torch.where(self.finite, post, self.total)
        return coef, post


class _AgcPlan:
    """How the unit norms of a step are completed and summarised across ranks."""

    def __init__(self, groups: list[list[int]], n: int,
                 tensor_fn: Callable[[tuple, list], Tensor]) -> None:
        self.groups = groups
        self._tensor = tensor_fn  # cached masks: no host->device copy per step
        self.where = [(0, 0)] * n  # tensor index -> (group, position)
        for gi, idx in enumerate(groups):
            for k, i in enumerate(idx):
                self.where[i] = (gi, k)
        self.rows: list[int] = []  # tensors whose units are whole, spread over ranks
        self.rows_contrib: list[bool] = []
        self.get_rows_min: Callable[[], Tensor] | None = None
        self.get_rows_post: Callable[[], Tensor] | None = None

    def summary(
        self, units: list[Tensor], coefs: list[Tensor], *, skip_rows: bool,
        only: set[int] | None = None, contrib: set[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Min coefficient and sum of squared clipped unit norms over a subset of tensors.

        ``skip_rows``: over every tensor but the row-spread ones; ``only``: over those
        tensors, with ``contrib`` the ones counted in the sum.
        """
        rows = set(self.rows)
        cmin: list[Tensor] = []
        sq: list[Tensor] = []
        for idx, n, c in zip(self.groups, units, coefs, strict=True):
            if skip_rows:
                keep = [i not in rows for i in idx]
                add = keep
            else:
                assert only is not None and contrib is not None
                keep = [i in only for i in idx]
                add = [i in contrib for i in idx]
            if not any(keep) or c.numel() == 0:
                continue
            per_min = c.reshape(len(idx), -1).amin(dim=1)
            per_sq = (n * c).reshape(len(idx), -1).square().sum(dim=1)
            if all(keep):
                cmin.append(per_min.amin())
            else:
                mask = self._tensor(("mask", tuple(keep)), keep).to(c.device)
                cmin.append(torch.where(mask, per_min, math.inf).amin())
            if all(add):
                sq.append(per_sq.sum())
            elif any(add):
                mask = self._tensor(("mask", tuple(add)), add).to(c.device)
                sq.append(torch.where(mask, per_sq, 0.0).sum())
        dev = units[0].device if units else torch.device("cpu")
        one = torch.ones((), device=dev)
        coef = torch.stack([x.float() for x in cmin]).amin() if cmin else one
        post_sq = torch.stack([x.double() for x in sq]).sum() if sq else one.double() * 0
        return coef, post_sq


# --------------------------------------------------------------------------------------
# The Guard's distributed half
# --------------------------------------------------------------------------------------


class GuardSync:
    """Everything distributed a :class:`~gradguard.guard.Guard` needs (built by the Guard).

    Args:
        group: the ranks that take the same decisions (usually the world group).
        norm_type: the Guard's norm order.
        device: the Guard's device.
        process_group: ranks holding disjoint parameters whose total norm is one (pipeline
            stages), as ``Guard(process_group=...)``; ``None`` for data parallelism.
    """

    def __init__(self, group: Any, *, norm_type: float, device: torch.device,
                 process_group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.global_ranks: list[int] = list(dist.get_process_group_ranks(group))
        self.norm_type = norm_type
        self.op_max = math.isinf(norm_type)
        self.device = torch.device(device)
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.process_group = process_group
        self._members: list[int] | None = None
        if process_group is not None:
            position = {g: r for r, g in enumerate(self.global_ranks)}
            members = list(dist.get_process_group_ranks(process_group))
            outside = [g for g in members if g not in position]
            if outside:
                raise ValueError(
                    f"process_group holds ranks {outside} outside sync_group "
                    f"{self.global_ranks}; sync_group must contain it"
                )
            self._members = sorted(position[g] for g in members)
        self._meshes: dict[int, tuple[Any, bool, tuple[int, ...]]] = {}
        self._cache: dict[Any, Tensor] = {}
        self._loss_bad: Tensor | None = None
        self._grad_bad: Tensor | None = None

    @classmethod
    def create(cls, sync_group: Any, *, norm_type: float, device: torch.device,
               process_group: Any = None) -> GuardSync | None:
        """The Guard's synchroniser, or ``None`` when there is nothing to synchronise.

        Args:
            sync_group: ``None`` (the world group, when ``torch.distributed`` is
                initialised with more than one rank), a process group, or ``False``.
        """
        if sync_group is False:
            return None
        if sync_group is True:
            raise TypeError("sync_group must be None, False or a process group, got True")
        if not is_distributed():
            if sync_group is not None:
                raise ValueError(
                    "sync_group was given but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group() before building the Guard"
                )
            return None
        import torch.distributed as dist

        group = dist.group.WORLD if sync_group is None else sync_group
        if dist.get_rank(group) < 0:
            raise ValueError("sync_group does not contain this rank")
        if dist.get_world_size(group) <= 1:
            return None
        return cls(group, norm_type=norm_type, device=device, process_group=process_group)

    # -- evidence gathered before the step ------------------------------------------------

    def observe_loss(self, loss: Tensor) -> None:
        """Remember whether a loss of this step was non-finite (over micro-batches)."""
        bad = torch.logical_not(torch.isfinite(loss))
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def flag_gradients(self, grads: Tensor) -> None:
        """Remember whether this rank's own gradients (a DDP bucket) were non-finite."""
        with torch.no_grad():
            bad = torch.logical_not(torch.isfinite(torch.linalg.vector_norm(grads, math.inf)))
        bad = bad.to(self.device)
        self._grad_bad = bad if self._grad_bad is None else self._grad_bad | bad

    def discard(self) -> None:
        """Forget the evidence of a step the Guard skipped without measuring."""
        self._loss_bad = self._grad_bad = None

    def discard_gradient_evidence(self) -> None:
        """Forget gradient evidence from backward passes before this one."""
        self._grad_bad = None

    # -- helpers ---------------------------------------------------------------------------

    def _tensor(self, key: tuple, values: list, dtype: torch.dtype | None = None) -> Tensor:
        """A cached small tensor on the device (one host->device copy per layout)."""
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 256:
                self._cache.clear()
            hit = self._cache[key] = torch.tensor(values, dtype=dtype, device=self.device)
        return hit

    def _mesh(self, mesh: Any) -> tuple[bool, tuple[int, ...]]:
        """Whether a mesh's shards can travel in the packed vector, and our coordinate."""
        hit = self._meshes.get(id(mesh))
        if hit is None or hit[0] is not mesh:
            ranks = mesh.mesh.flatten().tolist()
            ok = (self.process_group is None and len(ranks) == len(set(ranks))
                  and set(ranks) == set(self.global_ranks))
            hit = (mesh, ok, tuple(mesh.get_coordinate() or ()))
            self._meshes[id(mesh)] = hit
        return hit[1], hit[2]

    def _contributes(self, info: _norms._ShardInfo, dims: Sequence[int]) -> bool:
        """Whether this rank adds its value to a sum over ``dims`` of ``info``'s mesh.

        Ranks that differ only along the other mesh dims hold the same value (replicas):
        only the one at coordinate 0 along them contributes.
        """
        _, coord = self._mesh(info.mesh)
        return all(c == 0 for d, c in enumerate(coord) if d not in dims)

    def _local_norms(self, groups: _norms.TensorGroups, p: float) -> Tensor:
        """Per-tensor norms of the local tensors (shards), with no communication."""
        return groups.norms(p, reduce=False)

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def measure(
        self,
        groups: _norms.TensorGroups,
        params: Sequence[Tensor],
        *,
        policy: Any,
        loss: Tensor | None,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        repair: bool = False,
        all_params: Sequence[Tensor] | None = None,
    ) -> Measured:
        """Local statistics -> one all-reduce -> the step's statistics, equal on all ranks.

        Args:
            groups: the gradients present this step, prepared.
            params: their parameters (AGC reads them).
            policy: the threshold policy (AGC: unit-wise statistics are gathered).
            loss: this rank's observed loss, or ``None``.
            grad_scale: the GradScaler scale of a fused optimizer (norms are unscaled).
            found_inf: the GradScaler overflow flag of a fused optimizer.
            repair: ``Guard(nonfinite="zero")``: replace NaN/inf entries by 0 before the
                norms are taken (the flags still say they were there).
            all_params: every guarded parameter, when the policy wants their norm.

        Returns:
            The :class:`Measured` statistics.
        """
        p = self.norm_type
        unitwise = policy is not None and getattr(policy, "unitwise", False)
        shards = groups.shards
        pk = _Packer(op_max=self.op_max, rank=self.rank, world=self.world, dtype=self.dtype,
                     device=self.device)

        # ---- local statistics (no communication) -----------------------------------------
        unit = g_rows = w_rows = None
        if unitwise:
            unit, g_rows, w_rows, local = self._local_units(groups, params)
        else:
            local = self._local_norms(groups, p)
        bad = torch.logical_not(torch.isfinite(local).all())
        if repair and (not groups.all_cpu or bool(bad)):  # CPU: the check is free
            for g in groups.local:
                g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            if unitwise:
                unit, g_rows, _, local = self._local_units(groups, params, w_rows=w_rows)
            else:
                local = self._local_norms(groups, p)
        if grad_scale is not None:
            local = local * (1.0 / grad_scale.to(local.device, local.dtype)).reshape(())

        # ---- what cannot travel in the vector (extra collectives, same on all ranks) ----
        fallback = {i: info for i, info in shards.items() if not self._mesh(info.mesh)[0]}
        if fallback:
            local = _norms._reduce_shard_norms(local, fallback, p)

        # ---- pack ----------------------------------------------------------------------------
        dev = self.device
        code = bad.to(dev, self.dtype) * LOCAL_NONFINITE
        if self._loss_bad is not None:
            code = code + self._loss_bad.to(dev, self.dtype) * LOSS_NONFINITE
        if self._grad_bad is not None:
            code = code + self._grad_bad.to(dev, self.dtype) * GRAD_NONFINITE
        if found_inf is not None:
            code = code + (found_inf.reshape(()).to(dev) != 0).to(self.dtype) * OVERFLOW
        if loss is not None:
            loss = loss.detach().reshape(()).to(dev, self.dtype)
            code = code + LOSS_OBSERVED
        self._loss_bad = self._grad_bad = None
        get_codes = pk.per_rank(code)
        get_loss = pk.per_rank(loss if loss is not None else torch.zeros((), device=dev))

        packed = sorted(i for i in shards if i not in fallback)
        get_shards = None
        if packed:
            index = self._tensor(("index", tuple(packed)), packed, torch.int64)
            powers = _norms._power(local.index_select(0, index).to(self.dtype), p)
            contrib = [self._contributes(shards[i], shards[i].mesh_dims) for i in packed]
            if not self.op_max and not all(contrib):
                powers = torch.where(self._tensor(("mask", tuple(contrib)), contrib), powers, 0.0)
            get_shards = pk.reduce(powers)
        get_total = None
        if self._members is not None:
            local_total = torch.linalg.vector_norm(local, p)
            get_total = pk.per_rank(_norms._power(local_total.to(self.dtype), p))
        completion = None
        if unitwise:
            assert unit is not None and g_rows is not None and w_rows is not None
            completion = self._pack_units(pk, unit, groups, g_rows, w_rows, policy)
        param_norm_fn = None
        if all_params is not None:
            param_norm_fn = self._pack_param_norm(pk, all_params)

        pk.run(self.group)

        # ---- unpack: the same values on every rank ---------------------------------------
        codes = get_codes().select(1, 0)
        full = local
        if get_shards is not None:
            full = local.index_copy(0, index, _norms._root(get_shards(), p).to(local.dtype))
        norms = full.to(dev, torch.float32)
        if get_total is not None:
            blocks = get_total().select(1, 0).index_select(
                0, self._tensor(("members",), self._members, torch.int64))
            reduced = blocks.amax() if self.op_max else blocks.sum()
            total = _norms._root(reduced, p).to(torch.float32)
        else:
            total = torch.linalg.vector_norm(norms, p)
        ci = codes.to(torch.int64)
        flagged = (torch.bitwise_and(ci, GRAD_NONFINITE | LOCAL_NONFINITE) != 0).any()
        finite = torch.isfinite(total) & torch.logical_not(flagged)
        overflow = None
        if found_inf is not None:
            overflow = (torch.bitwise_and(ci, OVERFLOW) != 0).any()
        seen = torch.bitwise_and(ci, LOSS_OBSERVED) != 0
        losses = get_loss().select(1, 0)
        mean_loss = (torch.where(seen, losses, 0.0).sum() / seen.sum()).to(torch.float32)

        measured = Measured(norms=norms, total=total, finite=finite, overflow=overflow,
                            loss=mean_loss, codes=codes,
                            param_norm=None if param_norm_fn is None else param_norm_fn())
        if unitwise:
            assert completion is not None and g_rows is not None and w_rows is not None
            g_units, w_units = completion.complete(g_rows, w_rows)
            measured.unit, measured.g_units, measured.w_units = unit, g_units, w_units
            measured._agc = completion.agc
        return measured

    # -- AGC ------------------------------------------------------------------------------

    def _local_units(
        self, groups: _norms.TensorGroups, params: Sequence[Tensor],
        w_rows: list[list[Tensor]] | None = None,
    ) -> tuple[Any, list[list[Tensor]], list[list[Tensor]], Tensor]:
        """Local unit norms (grads, params) and per-tensor local norms from them."""
        from gradguard.clip import AgcUnits

        unit = AgcUnits(groups.local, groups.shards)
        g_loc = _norms.grouped_unit_norms(groups.local, unit.groups)
        if w_rows is None:
            w_local, _ = _norms._localize(list(params))
            w_rows = [list(n.unbind(0)) for n in _norms.grouped_unit_norms(w_local, unit.groups)]
        local = self._agc_tensor_norms(unit.groups, g_loc, len(groups.local))
        return unit, [list(n.unbind(0)) for n in g_loc], w_rows, local

    def _agc_tensor_norms(self, groups: list[list[int]], units: list[Tensor], n: int) -> Tensor:
        """Per-tensor L2 norms, in tensor order, from per-group stacked unit norms."""
        if not units:
            return torch.zeros(0, device=self.device)
        parts = [torch.linalg.vector_norm(u.flatten(1), dim=1) for u in units]
        dtype = functools.reduce(torch.promote_types, (x.dtype for x in parts))
        grouped = torch.cat([x.to(dtype) for x in parts])
        order = [i for idx in groups for i in idx]
        if order == list(range(n)):
            return grouped
        inverse = sorted(range(len(order)), key=order.__getitem__)
        index = self._tensor(("index", tuple(inverse)), inverse, torch.int64)
        return grouped.index_select(0, index.to(grouped.device))

    def _pack_units(
        self, pk: _Packer, unit: Any, groups: _norms.TensorGroups,
        g_rows: list[list[Tensor]], w_rows: list[list[Tensor]], policy: Any,
    ) -> _UnitCompletion:
        """Complete split units (in the vector, or by the engine) and pack row summaries."""
        plan = _AgcPlan(unit.groups, len(groups.local), self._tensor)
        completion = _UnitCompletion(plan)
        split: list[int] = []
        for i, info in groups.shards.items():
            nd = groups.local[i].ndim
            pairs = list(zip(info.mesh_dims, info.tensor_dims, strict=True))
            across = tuple(d for d, td in pairs if nd < 2 or td != 0)  # units split over
            along = tuple(d for d, td in pairs if nd >= 2 and td == 0)  # units spread over
            packable = self._mesh(info.mesh)[0]
            if across:
                if packable and not along:
                    split.append(i)
                else:  # the engine completes them: one all-reduce per mesh dim
                    gi, k = plan.where[i]
                    for rows in (g_rows, w_rows):
                        sq = rows[gi][k] * rows[gi][k]
                        for d in across:
                            _norms._all_reduce(sq, 2.0, info.mesh.get_group(d))
                        rows[gi][k] = sq.sqrt()
            if along and packable:
                plan.rows.append(i)
                plan.rows_contrib.append(self._contributes(info, along))
        if split:
            contrib = [self._contributes(groups.shards[i], groups.shards[i].mesh_dims)
                       for i in split]
            pieces = []
            for rows in (g_rows, w_rows):
                for i, c in zip(split, contrib, strict=True):
                    gi, k = plan.where[i]
                    sq = rows[gi][k].reshape(-1).square().to(self.dtype)
                    pieces.append(sq if c else torch.zeros_like(sq))
            completion.split = split
            completion.get = pk.reduce(torch.cat(pieces))
        if plan.rows:
            # Whole units spread over ranks: their coefficients are known now; their
            # summaries (min coefficient, clipped squared norm) ride in the vector.
            g_units = [torch.stack(r) for r in g_rows]
            w_units = [torch.stack(r) for r in w_rows]
            coefs = policy.unit_coefficients(g_units, w_units)
            contrib_set = {i for i, c in zip(plan.rows, plan.rows_contrib, strict=True) if c}
            cmin, post_sq = plan.summary(g_units, coefs, skip_rows=False, only=set(plan.rows),
                                         contrib=contrib_set)
            plan.get_rows_min = pk.per_rank(cmin)
            plan.get_rows_post = pk.sum(post_sq)
        return completion

    def _pack_param_norm(self, pk: _Packer, params: Sequence[Tensor]) -> Callable[[], Tensor]:
        """Pack what the L2 norm of all parameters needs; return its getter."""
        pg = _norms.TensorGroups(list(params))
        local = self._local_norms(pg, 2.0)
        fallback = {i: info for i, info in pg.shards.items() if not self._mesh(info.mesh)[0]}
        if fallback:
            local = _norms._reduce_shard_norms(local, fallback, 2.0)
        sharded = {i for i in pg.shards if i not in fallback}
        rep = [i for i in range(len(local)) if i not in sharded]
        contrib = [i for i in sorted(sharded)
                   if self._contributes(pg.shards[i], pg.shards[i].mesh_dims)]
        sq = local.to(self.dtype).square()

        def part(idx: list[int]) -> Tensor:
            if not idx:
                return torch.zeros((), dtype=self.dtype, device=self.device)
            return sq.index_select(0, self._tensor(("index", tuple(idx)), idx, torch.int64)).sum()

        get = pk.sum(part(contrib))
        if self._members is None:
            local_sq = part(rep)
            return lambda: (local_sq + get()).sqrt()
        # Ranks holding disjoint parameters (process_group=): their plain parameters add
        # up over the members, in the same collective, so every rank sees one norm.
        get_rep = pk.per_rank(part(rep))
        members = self._tensor(("members",), self._members, torch.int64)
        return lambda: (get_rep().select(1, 0).index_select(0, members).sum() + get()).sqrt()

    # -- events -------------------------------------------------------------------------------

    def origin(self, codes: Tensor) -> dict[str, Any]:
        """Which ranks saw a non-finite step, and the first of them (a host read).

        Returns:
            ``first_rank`` (global rank, or ``None``), ``evidence`` (``"loss"``,
            ``"gradient"``, ``"local"`` or ``"unknown"``) and the lists ``loss_ranks``,
            ``gradient_ranks``, ``local_ranks`` (global ranks).
        """
        values = [int(v) for v in codes.tolist()]
        ranks = self.global_ranks

        def having(bit: int) -> list[int]:
            return [ranks[r] for r, v in enumerate(values) if v & bit]

        loss, grad, local = having(LOSS_NONFINITE), having(GRAD_NONFINITE), having(
            LOCAL_NONFINITE)
        if loss or grad:
            first = min(loss + grad)
            evidence = "loss" if first in loss else "gradient"
        elif local:
            first, evidence = min(local), "local"
        else:
            first, evidence = None, "unknown"
        return {"first_rank": first, "evidence": evidence, "loss_ranks": loss,
                "gradient_ranks": grad, "local_ranks": local, "world_size": self.world}


class _UnitCompletion:
    """Completes split units after the collective; carries the AGC plan along."""

    def __init__(self, plan: _AgcPlan) -> None:
        self.agc = plan
        self.split: list[int] = []
        self.get: Callable[[], Tensor] | None = None

    def complete(
        self, g_rows: list[list[Tensor]], w_rows: list[list[Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        plan = self.agc
        if self.split:
            assert self.get is not None
            flat = self.get()
            offset = 0
            for rows in (g_rows, w_rows):
                for i in self.split:
                    gi, k = plan.where[i]
                    r = rows[gi][k]
                    n = r.numel()
                    part = flat.narrow(0, offset, n)
                    rows[gi][k] = part.sqrt().reshape(r.shape).to(r.dtype)
                    offset += n
        return [torch.stack(r) for r in g_rows], [torch.stack(r) for r in w_rows]


# --------------------------------------------------------------------------------------
# DDP: flag the rank whose own gradients are non-finite, before they are averaged
# --------------------------------------------------------------------------------------


def register_nonfinite_hook(
    ddp_model: Any, guard: Any, hook: Callable | None = None, state: Any = None
) -> None:
    """Let the Guard know which rank's own gradients were NaN/inf, under DDP.

    DDP averages gradients inside ``backward()``, after which a NaN from one rank is on
    every rank. This registers a DDP comm hook that checks each bucket of this rank's
    gradients before it is all-reduced (one max-abs read of the gradients per step, no
    host sync) and then runs ``hook`` (default: DDP's own all-reduce). The Guard's
    ``nonfinite`` events then name that rank (``evidence="gradient"``). Without it, the
    origin comes from the losses given to ``guard.observe_loss``.

    Under ``no_sync()`` gradient accumulation the hook runs once, on the synchronising
    backward, and sees the accumulated gradients.

    Args:
        ddp_model: a ``DistributedDataParallel`` module (no comm hook registered yet).
        guard: the :class:`~gradguard.guard.Guard` of this run.
        hook: an existing comm hook to wrap (e.g. fp16 compression), ``None`` for DDP's
            default all-reduce.
        state: ``hook``'s state (default: the DDP process group).

    Raises:
        TypeError: if ``ddp_model`` is not DDP.
        ValueError: if the Guard does not synchronise across ranks.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"ddp_model must be a DistributedDataParallel module, got {type(ddp_model).__name__}"
        )
    sync = getattr(guard, "_sync", None)
    if sync is None:
        raise ValueError(
            "the Guard does not synchronise across ranks (torch.distributed not initialised "
            "when it was built, a single rank, or sync_group=False)"
        )
    if hook is None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.allreduce_hook
        state = ddp_model.process_group if state is None else state

    backward_done = [True]

    def checked(hook_state, bucket):  # type: ignore[no-untyped-def]
        # (no annotations: DDP checks them, and here they would be strings)
        if backward_done[0]:  # a new backward pass: evidence of earlier ones is stale
            sync.discard_gradient_evidence()  # (a GradScaler may have skipped that step)
            backward_done[0] = False
        sync.flag_gradients(bucket.buffer())
        if bucket.is_last():
            backward_done[0] = True
        return hook(hook_state, bucket)

    ddp_model.register_comm_hook(state, checked)
