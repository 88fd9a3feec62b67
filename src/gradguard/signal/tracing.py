"""The tracer: one forward pass recorded as execution-ordered records, a value graph and the
activations around each layer.

:class:`Tracer` hooks the recorded modules (:func:`gradguard.signal.modules.select_modules`)
and intercepts torch functions (``TorchFunctionMode``) to see functional activations,
normalisations, pass-through views and additions. Every tensor it sees gets a
:class:`Provenance` (its value-graph node, the last parametrised layer and activation it came
through); an addition of two values of which one is an ancestor of the other is a
:class:`Residual` (``skip + branch``). Subclasses add measurements through the extension
points (the probe's gradient taps, ``init_model``'s layer-by-layer initialisation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gradguard.signal.activations import activation_of_call, phi
from gradguard.signal.inputs import tensors_in
from gradguard.signal.modules import (
    ADD_FUNCS,
    NORM_FUNCS,
    PASS_FUNCS,
    activation_spec_of,
    module_kind,
    select_modules,
)

__all__ = ["Provenance", "Rec", "Residual", "Tracer", "static_records"]


@dataclass
class Rec:
    """One call of a recorded module, or one functional activation."""

    index: int
    name: str
    type: str
    kind: str  # "param" | "act" | "norm" | "pass" | "other"
    module: nn.Module | None = None
    act: str | None = None
    act_param: Any = None
    src: int | None = None  # act: the record whose output it activates
    feed: int | None = None  # param: the act record whose output feeds it
    follow: int | None = None  # param: the act record applied to its output
    from_input: bool = False  # param: fed by the model input (through pass-through ops)
    normed_input: bool = False  # param: fed by a normalisation layer
    in_nodes: tuple[int, ...] = ()
    out_node: int = -1
    # measured on the batch (acts: the input z and output y; params: the input)
    q_in: float | None = None  # E[z^2] (act) or E[x^2] (param)
    dphi2: float | None = None  # E[phi'(z)^2] (act)
    residual_out: bool = False  # its output is added to a residual stream


@dataclass
class Provenance:
    """Where a traced value comes from (through pass-through operations)."""

    node: int
    src: int | None = None  # last param record reached through pass-through ops
    act: int | None = None  # act record whose output this is (through pass-through ops)
    normed: bool = False
    from_input: bool = False
    norm: int | None = None  # the normalisation record it last passed through


@dataclass
class Residual:
    """A residual addition ``skip + branch`` found by the tracer."""

    skip_node: int
    branch_node: int
    out_layer: int | None  # the param record whose output the branch ends with
    via_act: bool = False
    normed: bool = False
    members: list[int] = field(default_factory=list)
    root_node: int = -1  # where the branch starts (the skip, or a projection's input)
    out_node: int = -1  # the sum: the residual stream after this branch
    skip_normed: bool = False  # the skip is a normalisation's output (Post-LN)
    order: int = -1  # records executed before the addition


class Tracer(TorchFunctionMode):
    """Records the execution of a model: one :class:`Rec` per recorded module call and per
    functional activation, a value graph for residual detection, and measured statistics.

    Subclasses hook :meth:`tap_inputs` (replace a record's inputs), :meth:`on_output` and
    :meth:`on_param_start` (before a parametrised module runs).
    """

    def __init__(self, model: nn.Module, modules: tuple[type, ...] | None = None) -> None:
        super().__init__()
        self.model = model
        self.selected = select_modules(model, modules)
        # classified now, outside the trace (behavioural tests run the modules once)
        self.kinds = {id(m): (module_kind(m), activation_spec_of(m)) for _, m in self.selected}
        self.values: dict[int, Tensor] = {}  # value node -> its tensor (the last one set)
        self.recs: list[Rec] = []
        self.residuals: list[Residual] = []
        self.prov: dict[int, Provenance] = {}
        self.keep: list[Tensor] = []
        self.parents: list[tuple[int, ...]] = []
        self._depth = 0
        self._quiet = 0
        self._scope: list[str] = []
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        # per module: its open calls and the provenance of their first floating input
        self._open: dict[int, list[tuple[Rec, Provenance | None]]] = {}

    # -- graph -------------------------------------------------------------------------
    def _node(self, parents: Iterable[int]) -> int:
        self.parents.append(tuple(parents))
        return len(self.parents) - 1

    def _set(self, t: Tensor, prov: Provenance) -> None:
        self.prov[id(t)] = prov
        self.values[prov.node] = t
        self.keep.append(t)

    def provenance(self, t: Any) -> Provenance | None:
        """The provenance of a traced tensor (None for anything else)."""
        return self.prov.get(id(t)) if isinstance(t, Tensor) else None

    def is_ancestor(self, a: int, b: int) -> bool:
        """Whether value node ``a`` is an ancestor of (or equal to) node ``b``."""
        if a == b:
            return True
        seen, stack = set(), [b]
        while stack:
            n = stack.pop()
            for p in self.parents[n]:
                if p == a:
                    return True
                if p > a and p not in seen:  # ancestors are always created earlier
                    seen.add(p)
                    stack.append(p)
        return False

    def add_input(self, t: Tensor) -> None:
        self._set(t, Provenance(self._node(()), from_input=True))

    # -- context -----------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        chosen = {id(m) for _, m in self.selected}
        for name, m in self.model.named_modules():
            if id(m) in chosen:
                self._handles.append(m.register_forward_pre_hook(
                    self._make_pre(name), with_kwargs=True))
                self._handles.append(m.register_forward_hook(
                    self._make_post(name), with_kwargs=True, always_call=True))
            else:
                self._handles.append(m.register_forward_pre_hook(self._make_scope_pre(name)))
                self._handles.append(m.register_forward_hook(
                    self._make_scope_post(), always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_scope_pre(self, name: str) -> Callable:
        def pre(module: nn.Module, args: tuple) -> None:
            if not self._depth:
                self._scope.append(name)

        return pre

    def _make_scope_post(self) -> Callable:
        def post(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._depth and self._scope:
                self._scope.pop()

        return post

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Our own computations: not traced (and no interception overhead)."""
        self._quiet += 1
        try:
            with torch._C.DisableTorchFunction():
                yield
        finally:
            self._quiet -= 1

    # -- records -------------------------------------------------------------------------
    def _new_rec(self, name: str, type_: str, kind: str, module: nn.Module | None) -> Rec:
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        rec = Rec(len(self.recs), name if k == 0 else f"{name}#{k + 1}", type_, kind, module)
        self.recs.append(rec)
        return rec

    def _link_inputs(self, rec: Rec, tensors: list[Tensor]) -> Provenance | None:
        provs = [p for p in (self.provenance(t) for t in tensors) if p is not None]
        rec.in_nodes = tuple(p.node for p in provs)
        first = self.provenance(next((t for t in tensors if t.is_floating_point()), None))
        if first is None:
            return None
        if rec.kind == "act":
            rec.src = first.src
            if first.src is not None and self.recs[first.src].follow is None:
                self.recs[first.src].follow = rec.index
        elif rec.kind == "param":
            rec.feed = first.act
            rec.from_input = first.from_input
            rec.normed_input = first.normed
        return first

    def _out_prov(self, rec: Rec, first: Provenance | None) -> Provenance:
        node = self._node(rec.in_nodes)
        rec.out_node = node
        if rec.kind == "param" or rec.kind == "other":
            return Provenance(node, src=rec.index if rec.kind == "param" else None)
        if rec.kind == "act":
            return Provenance(node, act=rec.index)
        f = first or Provenance(node)
        if rec.kind == "norm":
            return Provenance(node, src=f.src, normed=True, norm=rec.index)
        return Provenance(node, src=f.src, act=f.act, normed=f.normed, from_input=f.from_input,
                     norm=f.norm)

    def _act_stats(self, rec: Rec, z: Tensor) -> None:
        with self.quiet(), torch.no_grad():
            zf = z.detach().float()
            rec.q_in = float(zf.pow(2).mean()) if zf.numel() else 0.0
            with torch.enable_grad():
                u = zf.clone().requires_grad_(True)
                (d,) = torch.autograd.grad(phi(rec.act or "", rec.act_param)(u).sum(), u)
            rec.dphi2 = float(d.pow(2).mean()) if d.numel() else 0.0

    def _make_pre(self, name: str) -> Callable:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if self._depth:
                self._depth += 1
                return None
            kind, spec = self.kinds.get(id(module)) or (module_kind(module), None)
            rec = self._new_rec(name, type(module).__name__, kind, module)
            if kind == "act" and spec is not None:
                rec.act, rec.act_param = spec
            tensors = tensors_in(args) + tensors_in(kwargs)
            first = self._link_inputs(rec, tensors)
            self._open.setdefault(id(module), []).append((rec, first))
            x = next((t for t in tensors if t.is_floating_point()), None)
            with self.quiet():
                if x is not None:
                    if kind == "act":
                        self._act_stats(rec, x)
                    else:
                        rec.q_in = float(x.detach().float().pow(2).mean()) if x.numel() else 0.0
                if kind == "param":
                    self.on_param_start(rec, x)
                new = self.tap_inputs(rec, args, kwargs)
            self._depth += 1
            return new

        return pre

    def _make_post(self, name: str) -> Callable:
        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._depth -= 1
            if self._depth:
                return None
            stack = self._open.get(id(module))
            if not stack:
                return None
            rec, first = stack.pop()
            prov = self._out_prov(rec, first)
            outs = tensors_in(output)
            for t in outs:
                self._set(t, prov)
            with self.quiet():
                self.on_output(rec, outs)
            return None

        return post

    # -- function interception ---------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._depth or self._quiet:
            return func(*args, **kwargs)
        fname = getattr(func, "__name__", "")
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.is_floating_point() and self.provenance(x) is not None:
            spec = activation_of_call(fname, args, kwargs)
            if spec is not None:
                return self._functional_activation(func, fname, spec, args, kwargs)
        out = func(*args, **kwargs)
        self._quiet += 1
        try:
            self._after(fname, args, kwargs, out)
        finally:
            self._quiet -= 1
        return out

    def _functional_activation(self, func: Any, fname: str, spec: tuple[str, Any],
                               args: tuple, kwargs: dict) -> Any:
        scope = self._scope[-1] if self._scope else ""
        label = f"{scope}.{spec[0]}" if scope else spec[0]
        rec = self._new_rec(label, f"F.{fname}", "act", None)
        rec.act, rec.act_param = spec
        x = args[0]
        first = self._link_inputs(rec, [x])
        with self.quiet():
            self._act_stats(rec, x)
            inplace = fname.endswith("_") or bool(kwargs.get("inplace", False))
            new_args = args if inplace else self.tap_inputs(rec, args, kwargs)[0]
        out = func(*new_args, **kwargs)
        prov = self._out_prov(rec, first)
        self._set(out, prov)
        with self.quiet():
            self.on_output(rec, [out])
        return out

    def _after(self, fname: str, args: tuple, kwargs: dict, out: Any) -> None:
        ins = [t for t in tensors_in(args) + tensors_in(kwargs) if isinstance(t, Tensor)]
        provs = [self.provenance(t) for t in ins]
        tracked = [(t, p) for t, p in zip(ins, provs, strict=True) if p is not None]
        outs = [t for t in tensors_in(out) if isinstance(t, Tensor)]
        if not tracked or not outs:
            return
        node = self._node(p.node for _, p in tracked)
        first = tracked[0][1]
        if fname in PASS_FUNCS:
            prov = Provenance(node, first.src, first.act, first.normed, first.from_input,
                              first.norm)
        elif fname in NORM_FUNCS:
            prov = Provenance(node, first.src, normed=True)
        else:
            prov = Provenance(node)
            if fname in ADD_FUNCS and len(tracked) == 2:
                self._residual(tracked[0], tracked[1], outs[0], node)
        for t in outs:
            self._set(t, prov)

    def _residual(self, a: tuple[Tensor, Provenance], b: tuple[Tensor, Provenance],
                  out_t: Tensor, out_node: int) -> None:
        (ta, pa), (tb, pb) = a, b
        if ta.shape != tb.shape or out_t.shape != ta.shape or pa.node == pb.node:
            return  # broadcasts (masks, position tables) and x + x are not residuals
        root = -1
        if self.is_ancestor(pa.node, pb.node):
            skip, branch = pa, pb
        elif self.is_ancestor(pb.node, pa.node):
            skip, branch = pb, pa
        else:  # projection shortcut: skip = proj(x) with x an ancestor of the branch
            skip = branch = None
            for u, v in ((pa, pb), (pb, pa)):
                hits = [n for n in (self.recs[u.src].in_nodes if u.src is not None else ())
                        if self.is_ancestor(n, v.node)]
                if hits:
                    skip, branch, root = u, v, hits[0]
                    break
            if skip is None or branch is None:
                return
        out, via_act = branch.src, False
        if branch.normed:  # the branch ends in a norm (BN ResNets): its affine is the scale
            out = branch.norm
        elif out is None and branch.act is not None:
            out, via_act = self.recs[branch.act].src, True
        residual = Residual(skip.node, branch.node, out, via_act, branch.normed,
                            root_node=root if root >= 0 else skip.node, out_node=out_node,
                            skip_normed=skip.normed, order=len(self.recs))
        self.residuals.append(residual)
        if out is not None:
            self.recs[out].residual_out = True
        self.on_residual(residual, ta if skip is pa else tb, out_t)

    def branch_members(self) -> None:
        """Fill each residual's ``members``: param records between its skip and its end."""
        for r in self.residuals:
            r.members = [
                rec.index for rec in self.recs
                if rec.kind == "param" and rec.out_node >= 0
                and self.is_ancestor(rec.out_node, r.branch_node)
                and any(self.is_ancestor(r.root_node, n) for n in rec.in_nodes)
            ]

    def branch_records(self) -> tuple[dict[int, int], set[int]]:
        """``(branch, internal)``: record index -> residual index for every record on a
        residual branch (its outputs are branch values, not the stream), and the records
        strictly before each branch's last layer (their gradients are the branch's)."""
        branch: dict[int, int] = {}
        internal: set[int] = set()
        for k, r in enumerate(self.residuals):
            for rec in self.recs:
                if rec.out_node < 0 or rec.index in branch:
                    continue
                if self.is_ancestor(rec.out_node, r.branch_node) and any(
                    self.is_ancestor(r.root_node, n) for n in rec.in_nodes
                ):
                    branch[rec.index] = k
                    if r.out_layer is not None and rec.index < r.out_layer:
                        internal.add(rec.index)
        return branch, internal

    # -- extension points ----------------------------------------------------------------
    def tap_inputs(self, rec: Rec, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The arguments ``rec`` runs on: ``None`` keeps a module's own (the default), a
        functional activation gets ``(args, kwargs)`` back."""
        return None if rec.module is not None else (args, kwargs)

    def on_output(self, rec: Rec, outs: list[Tensor]) -> None:
        """Called with the output tensors of each record (outside the trace)."""

    def on_param_start(self, rec: Rec, x: Tensor | None) -> None:
        """Called before a parametrised module runs, with its first floating input."""

    def on_residual(self, residual: Residual, skip: Tensor, out: Tensor) -> None:
        """Called when a residual addition is found, with the skip value and the sum."""


def static_records(model: nn.Module) -> list[Rec]:
    """Records in module registration order, linked as if the model were a Sequential."""
    recs: list[Rec] = []
    last_param: int | None = None
    last_act: int | None = None
    for name, m in select_modules(model):
        kind = module_kind(m)
        rec = Rec(len(recs), name, type(m).__name__, kind, m)
        if kind == "act":
            rec.act, rec.act_param = activation_spec_of(m)  # type: ignore[misc]
            rec.src = last_param
            if last_param is not None and recs[last_param].follow is None:
                recs[last_param].follow = rec.index
            last_act, last_param = rec.index, None
        elif kind == "param":
            rec.feed = last_act
            rec.from_input = last_act is None and not any(r.kind == "param" for r in recs)
            last_param, last_act = rec.index, None
        elif kind == "other":
            last_param = last_act = None
        recs.append(rec)
    return recs
