"""The Guard's measurement across ranks: one collective per step, the same decision on every
rank, and a single process as a world of size 1.

Under data parallelism every rank must take the same decision at every step: the same clip
coefficient, the same skip, the same rollback. If they do not, the replicas drift apart, or
one rank waits forever in a collective the others never call (skipping a step on one rank
under DDP is the classic hang). :class:`GuardSync` therefore gives the Guard every
statistic of a step from data that is identical on all ranks, with **one** ``all_reduce``
of a small packed vector per step, whatever the policy:

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
    is the p-th root of the sum of the shards' p-th powers.
extras, only when needed
    per-rank total p-th powers for ``Guard(process_group=...)`` (ranks holding disjoint
    parameters), unit norms split across ranks and summaries of units spread over ranks
    (policies of granularity ``"unit"``, AGC), the parameter norm a policy asks for.

The vector is reduced with ``SUM`` (``MAX`` for the inf-norm); slots owned by one rank hold
the operation's identity on the others, so both operations deliver every slot exactly.
gloo's ``MAX`` drops NaN (``max(NaN, 3) = 3``), so under ``MAX`` values travel re-encoded in
the order finite < inf < NaN (inf as the largest finite float, NaN as ``+inf``) and are
decoded after: NaN still wins, as in torch. A rank whose mesh coordinate merely replicates
a shard (HSDP) contributes zero to the sums, so nothing is counted twice.

**A world of size 1.** Without ``torch.distributed`` (or with ``sync_group=False``) the
same :meth:`GuardSync.measure` runs with no vector and no collective: the local statistics
are the step's statistics, and the norm engine completes any DTensor shards itself (one
all-reduce per mesh, as :func:`gradguard.get_total_norm` does). Plain, DDP and FSDP2 runs
share this one measurement.

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
gradients (pipeline x FSDP), and unit-wise clipping of tensors split along dim 0 *and*
another dim (2-D sharding) are reduced by the norm engine, one all-reduce per mesh
dimension. ``Partial`` DTensor gradients are redistributed (a collective) by the norm engine
before anything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.engine.norms import DeviceTensorCache, TensorGroups, total_norm
from gradguard.engine.scaling import zero_nonfinite_
from gradguard.engine.sharding import (
    ShardInfo,
    all_reduce_norm,
    localize,
    power,
    reduce_shard_norms,
    root,
)
from gradguard.engine.units import UnitNorms
from gradguard.guard.step import StepStats
from gradguard.policies.base import StepNorms, ThresholdPolicy

__all__ = [
    "GRAD_NONFINITE",
    "LOCAL_NONFINITE",
    "LOSS_NONFINITE",
    "LOSS_OBSERVED",
    "OVERFLOW",
    "GuardSync",
    "Packer",
    "UnitPlan",
    "is_distributed",
    "register_nonfinite_hook",
]

#: Bits of a rank's code in the packed vector.
LOSS_NONFINITE = 1  # the rank's loss (any observed since the last step) was NaN/inf
GRAD_NONFINITE = 2  # its own gradient was NaN/inf before the all-reduce (DDP comm hook)
LOCAL_NONFINITE = 4  # the gradients (shards) it held at the Guard step were NaN/inf
LOSS_OBSERVED = 8  # it called observe_loss since the last step
OVERFLOW = 16  # a fused optimizer's GradScaler flag said overflow


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------
# The packed vector
# --------------------------------------------------------------------------------------


class Packer:
    """Pieces of one vector, reduced by one ``all_reduce`` and read back by handles.

    Args:
        op_max: reduce with ``MAX`` (the inf-norm) instead of ``SUM``.
        rank: this rank's position in the group.
        world: the group's size.
        dtype: the vector's dtype.
        device: the vector's device.
    """

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
        """The all-reduce of the vector: THE collective of the step."""
        import torch.distributed as dist

        buf = torch.cat(self.parts)
        op = dist.ReduceOp.MAX if self.op_max else dist.ReduceOp.SUM
        dist.all_reduce(buf, op=op, group=group)
        self.result = buf


# --------------------------------------------------------------------------------------
# Unit-wise statistics across ranks
# --------------------------------------------------------------------------------------


class UnitPlan:
    """How the unit norms of a step are completed and summarised across ranks.

    Units *split* over ranks (vectors, weights sharded along a dim other than 0) are
    completed from squared partial norms in the packed vector. Whole units *spread* over
    ranks (``rows``: weights sharded along dim 0) get their coefficients before the
    collective; their summaries (smallest coefficient, clipped squared norm) ride in it.

    Args:
        units: the unit grouping of the local gradients.
        cache: where small index and mask tensors live on the device.
        device: that device.
    """

    def __init__(self, units: UnitNorms, cache: DeviceTensorCache, device: torch.device
                 ) -> None:
        self.groups = units.groups
        self.where = units.where
        self.cache, self.device = cache, device
        self.rows: list[int] = []  # tensors whose units are whole, spread over ranks
        self.rows_contrib: list[bool] = []
        self.get_rows_min: Callable[[], Tensor] | None = None
        self.get_rows_post: Callable[[], Tensor] | None = None
        self.split: list[int] = []  # tensors whose units are completed in the vector
        self.get_split: Callable[[], Tensor] | None = None

    def _mask(self, values: list[bool], like: Tensor) -> Tensor:
        return self.cache.get(("mask", tuple(values)), values, self.device).to(like.device)

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
                cmin.append(torch.where(self._mask(keep, c), per_min, math.inf).amin())
            if all(add):
                sq.append(per_sq.sum())
            elif any(add):
                sq.append(torch.where(self._mask(add, c), per_sq, 0.0).sum())
        dev = units[0].device if units else torch.device("cpu")
        one = torch.ones((), device=dev)
        coef = torch.stack([x.float() for x in cmin]).amin() if cmin else one
        post_sq = torch.stack([x.double() for x in sq]).sum() if sq else one.double() * 0
        return coef, post_sq

    def complete(
        self, g_rows: list[list[Tensor]], w_rows: list[list[Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """After the collective: whole unit norms of the split tensors; stacked per group."""
        if self.split:
            assert self.get_split is not None
            flat = self.get_split()
            offset = 0
            for rows in (g_rows, w_rows):
                for i in self.split:
                    gi, k = self.where[i]
                    r = rows[gi][k]
                    n = r.numel()
                    part = flat.narrow(0, offset, n)
                    rows[gi][k] = part.sqrt().reshape(r.shape).to(r.dtype)
                    offset += n
        return [torch.stack(r) for r in g_rows], [torch.stack(r) for r in w_rows]


# --------------------------------------------------------------------------------------
# The Guard's synchroniser
# --------------------------------------------------------------------------------------


class GuardSync:
    """Everything a :class:`~gradguard.guard.Guard` needs to measure a step, on one rank or
    many (built by the Guard; see the module docstring).

    Args:
        group: the ranks that take the same decisions (usually the world group); ``None``
            for a world of size 1.
        norm_type: the Guard's norm order.
        device: the Guard's device.
        process_group: ranks holding disjoint parameters whose total norm is one (pipeline
            stages), as ``Guard(process_group=...)``; ``None`` for data parallelism.

    Attributes:
        rank, world: this rank's position in ``group`` and the group's size (0 and 1 for
            a world of size 1).
        global_ranks: the global ranks of the group.
        cache: small constant tensors on the device (indices, masks), made once.
    """

    def __init__(self, group: Any, *, norm_type: float, device: torch.device,
                 process_group: Any = None) -> None:
        self.group = group
        self.norm_type = norm_type
        self.op_max = math.isinf(norm_type)
        self.device = torch.device(device)
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.process_group = process_group
        self.cache = DeviceTensorCache()
        self._members: list[int] | None = None
        self._meshes: dict[int, tuple[Any, bool, tuple[int, ...]]] = {}
        self._loss_bad: Tensor | None = None
        self._grad_bad: Tensor | None = None
        if group is None:
            self.rank, self.world, self.global_ranks = 0, 1, [_global_rank()]
            return
        import torch.distributed as dist

        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.global_ranks = list(dist.get_process_group_ranks(group))
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

    @classmethod
    def create(cls, sync_group: Any, *, norm_type: float, device: torch.device,
               process_group: Any = None) -> GuardSync:
        """The Guard's synchroniser; a world of size 1 when there is nothing to synchronise.

        Args:
            sync_group: ``None`` (the world group, when ``torch.distributed`` is
                initialised with more than one rank), a process group, or ``False``.

        Raises:
            TypeError: for ``sync_group=True``.
            ValueError: for a group without torch.distributed, or one without this rank.
        """
        alone = cls(None, norm_type=norm_type, device=device, process_group=process_group)
        if sync_group is False:
            return alone
        if sync_group is True:
            raise TypeError("sync_group must be None, False or a process group, got True")
        if not is_distributed():
            if sync_group is not None:
                raise ValueError(
                    "sync_group was given but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group() before building the Guard"
                )
            return alone
        import torch.distributed as dist

        group = dist.group.WORLD if sync_group is None else sync_group
        if dist.get_rank(group) < 0:
            raise ValueError("sync_group does not contain this rank")
        if dist.get_world_size(group) <= 1:
            return alone
        return cls(group, norm_type=norm_type, device=device, process_group=process_group)

    # -- evidence gathered before the step ------------------------------------------------

    def observe_loss(self, loss: Tensor) -> None:
        """Remember whether a loss of this step was non-finite (over micro-batches)."""
        if self.world == 1:  # no other rank to name this one to
            return
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

    def _index(self, indices: list[int]) -> Tensor:
        return self.cache.index(indices, self.device)

    def _mesh(self, mesh: Any) -> tuple[bool, tuple[int, ...]]:
        """Whether a mesh's shards can travel in the packed vector, and our coordinate."""
        if self.world == 1:
            return False, ()
        hit = self._meshes.get(id(mesh))
        if hit is None or hit[0] is not mesh:
            ranks = mesh.mesh.flatten().tolist()
            ok = (self.process_group is None and len(ranks) == len(set(ranks))
                  and set(ranks) == set(self.global_ranks))
            hit = (mesh, ok, tuple(mesh.get_coordinate() or ()))
            self._meshes[id(mesh)] = hit
        return hit[1], hit[2]

    def _contributes(self, info: ShardInfo, dims: Sequence[int]) -> bool:
        """Whether this rank adds its value to a sum over ``dims`` of ``info``'s mesh.

        Ranks that differ only along the other mesh dims hold the same value (replicas):
        only the one at coordinate 0 along them contributes.
        """
        _, coord = self._mesh(info.mesh)
        return all(c == 0 for d, c in enumerate(coord) if d not in dims)

    def _local(self, groups: TensorGroups, units: UnitNorms | None
               ) -> tuple[Tensor, list[Tensor] | None]:
        """Per-tensor norms of the local tensors (shards) and, for unit-wise policies, the
        gradients' stacked unit norms per group (from which the per-tensor norms come,
        free): no communication."""
        if units is None:
            return groups.norms(self.norm_type, reduce=False), None
        g_units = units.local_norms(groups.local)
        return units.tensor_norms(g_units, self.cache), g_units

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def measure(
        self,
        groups: TensorGroups,
        params: Sequence[Tensor],
        *,
        policy: ThresholdPolicy | None,
        loss: Tensor | None,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        repair: bool = False,
        all_params: Sequence[Tensor] | None = None,
    ) -> StepStats:
        """The statistics of the step, the same on every rank: local statistics, then (with
        several ranks) one all-reduce.

        Args:
            groups: the gradients present this step, prepared.
            params: their parameters (unit-wise policies read them).
            policy: the threshold policy (``"unit"`` granularity: unit norms are measured).
            loss: this rank's observed loss, or ``None``.
            grad_scale: the GradScaler scale of a fused optimizer (norms are unscaled).
            found_inf: the GradScaler overflow flag of a fused optimizer.
            repair: ``Guard(nonfinite="zero")``: replace NaN/inf entries by 0 (the flags
                still say they were there).
            all_params: every guarded parameter, when the policy wants their norm.

        Returns:
            :class:`~gradguard.guard.step.StepStats` of the present gradients (``norms``
            in their order), before any decision.
        """
        units = None
        if policy is not None and policy.granularity == "unit":
            units = UnitNorms(groups.local, groups.shards)
        if self.world == 1:
            return self._measure_alone(groups, params, units, loss=loss,
                                       grad_scale=grad_scale, found_inf=found_inf,
                                       repair=repair, all_params=all_params)
        return self._measure_together(groups, params, units, policy=policy, loss=loss,
                                      grad_scale=grad_scale, found_inf=found_inf,
                                      repair=repair, all_params=all_params)

    def _measure_alone(
        self, groups: TensorGroups, params: Sequence[Tensor], units: UnitNorms | None, *,
        loss: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None,
        repair: bool, all_params: Sequence[Tensor] | None,
    ) -> StepStats:
        """A world of size 1: the local statistics are the step's (DTensor shards are
        completed by the norm engine); no vector, no collective of the Guard's own."""
        stats = self._alone_norms(groups, params, units, grad_scale)
        stats.loss = loss
        finite = stats.grads_finite = stats.finite
        if found_inf is not None:
            stats.overflow = found_inf.reshape(()).to(self.device) != 0
        if repair and not (groups.all_cpu and bool(finite)):  # CPU: the check is free
            # Repaired after the (engine-reduced) check, so that every rank of an FSDP2
            # run without sync_group repairs, and re-measures, alike.
            zero_nonfinite_(groups)
            repaired = self._alone_norms(groups, params, units, grad_scale,
                                         w_units=stats.param_unit_norms)
            stats.norms, stats.total = repaired.norms, repaired.total
            stats.unit_norms = repaired.unit_norms
        if all_params is not None:
            stats.param_norm = torch.linalg.vector_norm(TensorGroups(all_params).norms(2.0))
        return stats

    def _alone_norms(
        self, groups: TensorGroups, params: Sequence[Tensor], units: UnitNorms | None,
        grad_scale: Tensor | None, w_units: list[Tensor] | None = None,
    ) -> StepStats:
        """The local statistics of a world of size 1, shards completed by the engine."""
        p = self.norm_type
        local, g_units = self._local(groups, units)
        if groups.shards:  # shard norms -> full-tensor norms: the engine's collectives
            local = reduce_shard_norms(local, groups.shards, p)
        norms = local.to(device=self.device, dtype=torch.float32)
        if grad_scale is not None:  # fused optimizer under GradScaler: grads are scaled
            norms = norms * (1.0 / grad_scale.to(self.device, torch.float32)).reshape(())
        total = total_norm(norms, p, process_group=self.process_group)
        stats = StepStats(norms=norms, total=total, finite=torch.isfinite(total))
        if units is not None:
            assert g_units is not None
            stats.units = units
            stats.unit_norms = units.complete(g_units, groups.local) if groups.shards else g_units
            if w_units is None:  # read under no_grad: no detach needed
                w_units = units.norms(localize(list(params))[0])
            stats.param_unit_norms = w_units
        return stats

    def _measure_together(
        self, groups: TensorGroups, params: Sequence[Tensor], units: UnitNorms | None, *,
        policy: ThresholdPolicy | None, loss: Tensor | None, grad_scale: Tensor | None,
        found_inf: Tensor | None, repair: bool, all_params: Sequence[Tensor] | None,
    ) -> StepStats:
        """Several ranks: local statistics -> one all-reduce -> the same values on all."""
        p = self.norm_type
        shards = groups.shards
        pk = Packer(op_max=self.op_max, rank=self.rank, world=self.world, dtype=self.dtype,
                    device=self.device)

        # ---- local statistics (no communication) -----------------------------------------
        local, g_units = self._local(groups, units)
        bad = torch.logical_not(torch.isfinite(local).all())
        if repair and (not groups.all_cpu or bool(bad)):  # CPU: the check is free
            zero_nonfinite_(groups)
            local, g_units = self._local(groups, units)
        g_rows = w_rows = None
        if units is not None:  # rows: completed one by one across ranks below
            assert g_units is not None
            w_local, _ = localize(list(params))  # read under no_grad: no detach needed
            g_rows = [list(n.unbind(0)) for n in g_units]
            w_rows = [list(n.unbind(0)) for n in units.local_norms(w_local)]
        if grad_scale is not None:
            local = local * (1.0 / grad_scale.to(local.device, local.dtype)).reshape(())

        # ---- what cannot travel in the vector (extra collectives, same on all ranks) ----
        fallback = {i: info for i, info in shards.items() if not self._mesh(info.mesh)[0]}
        if fallback:
            local = reduce_shard_norms(local, fallback, p)

        # ---- pack ----------------------------------------------------------------------------
        get_codes, get_loss = self._pack_evidence(pk, bad, loss, found_inf)
        packed = sorted(i for i in shards if i not in fallback)
        index = self._index(packed) if packed else None
        get_shards = None
        if packed:
            powers = power(local.index_select(0, index).to(self.dtype), p)
            contrib = [self._contributes(shards[i], shards[i].mesh_dims) for i in packed]
            if not self.op_max and not all(contrib):
                mask = self.cache.get(("mask", tuple(contrib)), contrib, self.device)
                powers = torch.where(mask, powers, 0.0)
            get_shards = pk.reduce(powers)
        get_total = None
        if self._members is not None:
            local_total = torch.linalg.vector_norm(local, p)
            get_total = pk.per_rank(power(local_total.to(self.dtype), p))
        plan = None
        if units is not None:
            assert g_rows is not None and w_rows is not None
            plan = self._pack_units(pk, units, groups, g_rows, w_rows, policy)
        get_param_norm = None if all_params is None else self._pack_param_norm(pk, all_params)

        pk.run(self.group)  # THE collective of the step

        # ---- unpack: the same values on every rank ---------------------------------------
        stats = self._unpack(local, get_shards, index, get_total, get_codes, get_loss,
                             found_inf is not None)
        if get_param_norm is not None:
            stats.param_norm = get_param_norm()
        if plan is not None:
            assert g_rows is not None and w_rows is not None
            stats.units, stats.unit_plan = units, plan
            stats.unit_norms, stats.param_unit_norms = plan.complete(g_rows, w_rows)
        return stats

    def _pack_evidence(self, pk: Packer, bad: Tensor, loss: Tensor | None,
                       found_inf: Tensor | None) -> tuple[Callable[[], Tensor], ...]:
        """This rank's code and loss, one slot each per rank."""
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
        return get_codes, get_loss

    def _unpack(self, local: Tensor, get_shards: Callable[[], Tensor] | None,
                index: Tensor | None, get_total: Callable[[], Tensor] | None,
                get_codes: Callable[[], Tensor], get_loss: Callable[[], Tensor],
                with_overflow: bool) -> StepStats:
        """Norms, total, flags and loss from the reduced vector."""
        p = self.norm_type
        dev = self.device
        codes = get_codes().select(1, 0)
        full = local
        if get_shards is not None:
            assert index is not None
            full = local.index_copy(0, index, root(get_shards(), p).to(local.dtype))
        norms = full.to(dev, torch.float32)
        if get_total is not None:
            members = self.cache.get(("members",), self._members, dev, torch.int64)
            blocks = get_total().select(1, 0).index_select(0, members)
            reduced = blocks.amax() if self.op_max else blocks.sum()
            total = root(reduced, p).to(torch.float32)
        else:
            total = torch.linalg.vector_norm(norms, p)
        ci = codes.to(torch.int64)
        flagged = (torch.bitwise_and(ci, GRAD_NONFINITE | LOCAL_NONFINITE) != 0).any()
        finite = torch.isfinite(total) & torch.logical_not(flagged)
        overflow = None
        if with_overflow:
            overflow = (torch.bitwise_and(ci, OVERFLOW) != 0).any()
        seen = torch.bitwise_and(ci, LOSS_OBSERVED) != 0
        losses = get_loss().select(1, 0)
        mean_loss = (torch.where(seen, losses, 0.0).sum() / seen.sum()).to(torch.float32)
        return StepStats(norms=norms, total=total, finite=finite, grads_finite=finite,
                         overflow=overflow, loss=mean_loss, codes=codes)

    # -- unit-wise ------------------------------------------------------------------------

    def _pack_units(
        self, pk: Packer, units: UnitNorms, groups: TensorGroups,
        g_rows: list[list[Tensor]], w_rows: list[list[Tensor]], policy: Any,
    ) -> UnitPlan:
        """Complete split units (in the vector, or by the engine) and pack row summaries."""
        plan = UnitPlan(units, self.cache, self.device)
        for i, info in groups.shards.items():
            nd = groups.local[i].ndim
            pairs = list(zip(info.mesh_dims, info.tensor_dims, strict=True))
            across = tuple(d for d, td in pairs if nd < 2 or td != 0)  # units split over
            along = tuple(d for d, td in pairs if nd >= 2 and td == 0)  # units spread over
            packable = self._mesh(info.mesh)[0]
            if across:
                if packable and not along:
                    plan.split.append(i)
                else:  # the engine completes them: one all-reduce per mesh dim
                    gi, k = plan.where[i]
                    for rows in (g_rows, w_rows):
                        sq = rows[gi][k] * rows[gi][k]
                        for d in across:
                            all_reduce_norm(sq, 2.0, info.mesh.get_group(d))
                        rows[gi][k] = sq.sqrt()
            if along and packable:
                plan.rows.append(i)
                plan.rows_contrib.append(self._contributes(info, along))
        if plan.split:
            pieces = []
            for rows in (g_rows, w_rows):
                for i in plan.split:
                    gi, k = plan.where[i]
                    sq = rows[gi][k].reshape(-1).square().to(self.dtype)
                    shard = groups.shards[i]
                    keep = self._contributes(shard, shard.mesh_dims)
                    pieces.append(sq if keep else torch.zeros_like(sq))
            plan.get_split = pk.reduce(torch.cat(pieces))
        if plan.rows:
            self._pack_row_summaries(pk, plan, g_rows, w_rows, policy)
        return plan

    def _pack_row_summaries(self, pk: Packer, plan: UnitPlan, g_rows: list[list[Tensor]],
                            w_rows: list[list[Tensor]], policy: Any) -> None:
        """Whole units spread over ranks: their coefficients are known before the
        collective (a unit policy's ``compute`` is a pure function of the unit norms);
        their summaries (min coefficient, clipped squared norm) ride in the vector."""
        g_units = [torch.stack(r) for r in g_rows]
        w_units = [torch.stack(r) for r in w_rows]
        zero = torch.zeros((), device=self.device)
        coefs, _ = policy.compute(StepNorms(
            norms=zero.reshape(1), total=zero, finite=torch.isfinite(zero),
            unit_norms=g_units, param_unit_norms=w_units))
        contrib = {i for i, c in zip(plan.rows, plan.rows_contrib, strict=True) if c}
        cmin, post_sq = plan.summary(g_units, coefs, skip_rows=False, only=set(plan.rows),
                                     contrib=contrib)
        plan.get_rows_min = pk.per_rank(cmin)
        plan.get_rows_post = pk.sum(post_sq)

    def unit_summary(self, stats: StepStats, coefs: list[Tensor], *,
                     ones_if_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
        """The smallest unit coefficient and the post-clip total norm, over every rank.

        Args:
            stats: the step's statistics (unit norms measured).
            coefs: the unit coefficients applied, one stacked tensor per unit group.
            ones_if_nonfinite: the coefficients were forced to 1 on non-finite steps
                (``Guard(nonfinite="ignore")``).

        Returns:
            ``(coef, post_norm)``, 0-d fp32 tensors on the Guard's device, the same on
            every rank.
        """
        g_units = stats.unit_norms
        assert g_units is not None
        plan = stats.unit_plan
        if plan is None:  # a world of size 1
            mins = [c.amin() for c in coefs if c.numel()]  # (FSDP2: shards may be empty)
            one = torch.ones((), device=self.device)
            coef = torch.stack(mins).amin().to(self.device) if mins else one
            if stats.units is not None and stats.units.shards:
                return coef, stats.total * coef
            post_sq = torch.stack([(n * c).square().sum().to(self.device)
                                   for n, c in zip(g_units, coefs, strict=True)]).sum()
            return coef, post_sq.sqrt()
        coef, post_sq = plan.summary(g_units, coefs, skip_rows=True)
        if plan.get_rows_min is not None and plan.get_rows_post is not None:
            coef = torch.minimum(coef, plan.get_rows_min().amin().to(coef.dtype))
            post_sq = post_sq + plan.get_rows_post().to(post_sq.dtype)
        coef = coef.to(self.device, torch.float32)
        post = post_sq.sqrt().to(self.device, torch.float32)
        if ones_if_nonfinite:
            finite = stats.grads_finite
            coef = torch.where(finite, coef, torch.ones_like(coef))
            post = torch.where(finite, post, stats.total)
        return coef, post

    # -- the parameter norm ----------------------------------------------------------------

    def _pack_param_norm(self, pk: Packer, params: Sequence[Tensor]) -> Callable[[], Tensor]:
        """Pack what the L2 norm of all parameters needs; return its getter."""
        pg = TensorGroups(list(params))
        local = pg.norms(2.0, reduce=False)
        fallback = {i: info for i, info in pg.shards.items() if not self._mesh(info.mesh)[0]}
        if fallback:
            local = reduce_shard_norms(local, fallback, 2.0)
        sharded = {i for i in pg.shards if i not in fallback}
        rep = [i for i in range(len(local)) if i not in sharded]
        contrib = [i for i in sorted(sharded)
                   if self._contributes(pg.shards[i], pg.shards[i].mesh_dims)]
        sq = local.to(self.dtype).square()

        def part(idx: list[int]) -> Tensor:
            if not idx:
                return torch.zeros((), dtype=self.dtype, device=self.device)
            return sq.index_select(0, self._index(idx)).sum()

        get = pk.sum(part(contrib))
        if self._members is None:
            local_sq = part(rep)
            return lambda: (local_sq + get()).sqrt()
        # Ranks holding disjoint parameters (process_group=): their plain parameters add
        # up over the members, in the same collective, so every rank sees one norm.
        get_rep = pk.per_rank(part(rep))
        members = self.cache.get(("members",), self._members, self.device, torch.int64)
        return lambda: (get_rep().select(1, 0).index_select(0, members).sum() + get()).sqrt()

    # -- events -------------------------------------------------------------------------------

    def origin(self, codes: Tensor) -> dict[str, Any]:
        """Which ranks saw a non-finite step, and the first of them (a host read).

        Returns:
            ``first_rank`` (global rank, or ``None``), ``evidence`` (``"loss"``,
            ``"gradient"``, ``"local"`` or ``"unknown"``) and the lists ``loss_ranks``,
            ``gradient_ranks``, ``local_ranks`` (global ranks), and ``world_size``.
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


def _global_rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


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
    sync = getattr(guard, "sync", None)
    if not isinstance(sync, GuardSync) or sync.world < 2:
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
