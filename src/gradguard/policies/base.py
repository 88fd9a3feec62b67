"""What every threshold policy shares: the step it sees, its state, its checkpoint.

A policy turns the norms of one step into clip coefficients. Its statistics live in device
tensors and are updated with ``torch.where`` on a device-side "finite" flag, so a step
whose gradient is NaN or infinite never enters them, and no decision needs a host read.
Every policy round-trips through ``state_dict()``/``load_state_dict()`` bitwise, and costs
the same at step 20,000 as at step 2.

A policy declares its statistics once, in :meth:`ThresholdPolicy.initial_state` (the idea
of torchmetrics' ``add_state``); moving them to a device, saving and loading them are
derived from that declaration. Host-side values a policy keeps between steps are declared
in :attr:`ThresholdPolicy.host_state`, with their defaults.

Coefficients come from the one rule in :mod:`gradguard.engine.scaling`. A policy says how
they apply with :attr:`ThresholdPolicy.granularity`: one for all tensors (``"global"``),
one per tensor (``"tensor"``), or one per unit (``"unit"``: rows of weight matrices, AGC).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["GRANULARITIES", "StepNorms", "ThresholdPolicy"]

#: How a policy's coefficients apply: one for all tensors, one per tensor, one per unit.
GRANULARITIES = ("global", "tensor", "unit")


@dataclass
class StepNorms:
    """What a policy sees of one step. All tensors live on the gradients' device.

    Attributes:
        norms: per-tensor gradient norms, one per guarded parameter (0 where absent).
        total: the total norm (0-d).
        finite: 0-d bool, whether the step's gradients are all finite. Statistics are only
            updated where it is true.
        present: per-tensor bool mask of parameters that have a gradient this step, or
            ``None`` when all do.
        params: the guarded parameters (for policies relative to parameter norms).
        optimizers: the optimizers the Guard is attached to (for policies that read the
            learning rate or the optimizer's kind); empty when the Guard is called by hand.
        param_norm: the norm of all parameters, when the policy asked for it with
            ``wants_param_norm(optimizers)`` (the Guard computes it, inside its one
            collective when distributed); ``None`` otherwise.
        unit_norms: for ``granularity == "unit"``: the gradients' unit norms, one stacked
            tensor per unit group (see :class:`gradguard.engine.units.UnitNorms`), whole
            units across ranks; ``None`` otherwise.
        param_unit_norms: the parameters' unit norms, shaped like ``unit_norms``.
    """

    norms: Tensor
    total: Tensor
    finite: Tensor
    present: Tensor | None = None
    params: Sequence[Tensor] = ()
    optimizers: Sequence[torch.optim.Optimizer] = field(default_factory=tuple)
    param_norm: Tensor | None = None
    unit_norms: list[Tensor] | None = None
    param_unit_norms: list[Tensor] | None = None


class ThresholdPolicy:
    """Base class of threshold policies.

    Subclasses declare their statistics in :meth:`initial_state` (device tensors, created
    by :meth:`setup`) and host-side values in :attr:`host_state`, and implement
    :meth:`compute`. The base class provides ``state_dict``, ``load_state_dict`` and
    device handling.

    Attributes:
        name: the policy's short name.
        granularity: ``"global"`` (one coefficient for all tensors), ``"tensor"`` (one per
            tensor) or ``"unit"`` (one per unit: ``compute`` gets unit norms and returns
            one stacked coefficient tensor per unit group).
        per_tensor: ``granularity == "tensor"`` (kept for subclasses that set it).
        host_state: host-side values saved with the statistics, name -> default; each is
            an attribute of that name.
    """

    name: ClassVar[str] = "base"
    granularity: ClassVar[str] = "global"
    per_tensor: ClassVar[bool] = False
    host_state: ClassVar[Mapping[str, Any]] = {}
    _state_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "per_tensor" in cls.__dict__ and "granularity" not in cls.__dict__:
            cls.granularity = "tensor" if cls.per_tensor else "global"
        if cls.granularity not in GRANULARITIES:
            raise TypeError(f"{cls.__name__}.granularity must be one of {GRANULARITIES}, got "
                            f"{cls.granularity!r}")
        cls.per_tensor = cls.granularity == "tensor"

    def __init__(self) -> None:
        self._num_tensors: int | None = None
        self._device: torch.device | None = None
        for k, default in self.host_state.items():
            setattr(self, k, default)

    # -- lifecycle -------------------------------------------------------------------

    def setup(self, num_tensors: int, device: torch.device | str) -> None:
        """Create the statistics for ``num_tensors`` tensors on ``device`` (idempotent)."""
        device = torch.device(device)
        if self._num_tensors == num_tensors and self._device == device:
            return
        if self._num_tensors is not None and self._num_tensors != num_tensors:
            raise ValueError(
                f"{type(self).__name__} was set up for {self._num_tensors} tensors, "
                f"got {num_tensors}; use one policy object per set of parameters"
            )
        if self._device is not None:  # moving: keep the statistics
            for k in self._state_names:
                setattr(self, k, getattr(self, k).to(device))
        else:
            self._init_state(num_tensors, device)
        self._num_tensors, self._device = num_tensors, device

    def initial_state(self, num_tensors: int, device: torch.device) -> dict[str, Tensor]:
        """The statistics, freshly allocated: attribute name -> device tensor.

        Override when there are any; this is their one declaration.
        """
        return {}

    def _init_state(self, num_tensors: int, device: torch.device) -> None:
        state = self.initial_state(num_tensors, device)
        self._state_names = tuple(state)
        for k, v in state.items():
            setattr(self, k, v)

    def compute(self, step: StepNorms) -> tuple[Any, Tensor]:
        """Return ``(coef, threshold)`` for this step and update the statistics.

        Args:
            step: the step's norms and flags.

        Returns:
            ``coef``: a 0-d tensor (``"global"``), one per tensor (``"tensor"``) or a list
            of stacked unit coefficients, one per unit group (``"unit"``), in ``[0, 1]``,
            by which gradients are multiplied; ``threshold``: the norm threshold in force
            (0-d, or per tensor), NaN where there is none.
        """
        raise NotImplementedError

    def wants_param_norm(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Whether this step's :meth:`compute` needs the norm of all parameters (the Guard
        then supplies it in ``StepNorms.param_norm``, within its one collective when
        distributed). ``False`` unless a policy overrides it."""
        return False

    # -- checkpointing ---------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The constructor arguments, for the checkpoint's sanity check and the report."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Statistics (cloned tensors), host-side state and configuration."""
        state = {k: getattr(self, k).detach().clone() for k in self._state_names
                 if self._num_tensors is not None}
        out = {"name": self.name, "config": self.config(), "num_tensors": self._num_tensors,
               "state": state}
        out.update({k: getattr(self, k) for k in self.host_state})
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict` (bitwise)."""
        if state_dict.get("name") != self.name:
            raise ValueError(
                f"state_dict is for policy {state_dict.get('name')!r}, not {self.name!r}"
            )
        saved = state_dict.get("config", {})
        differ = sorted(k for k in set(saved) | set(self.config())
                        if saved.get(k) != self.config().get(k))
        if differ:
            raise ValueError(
                f"state_dict was saved by {self.name} with "
                + ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
                + "; this policy has "
                + ", ".join(f"{k}={self.config().get(k)!r}" for k in differ)
            )
        self._load_statistics(state_dict)
        for k, default in self.host_state.items():
            setattr(self, k, type(default)(state_dict.get(k, default)))

    def _load_statistics(self, state_dict: Mapping[str, Any]) -> None:
        n = state_dict.get("num_tensors")
        if n is None:  # saved by a policy never set up: fresh statistics
            if self._num_tensors is not None:
                self._init_state(self._num_tensors, self._device)  # type: ignore[arg-type]
            return
        device = self._device or torch.device("cpu")
        if self._num_tensors is None:
            self._init_state(n, device)
            self._num_tensors, self._device = n, device
        elif self._num_tensors != n:
            raise ValueError(
                f"state_dict has statistics for {n} tensors, this policy for {self._num_tensors}"
            )
        for k in self._state_names:
            v = state_dict["state"][k]
            setattr(self, k, v.detach().clone().to(device))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
