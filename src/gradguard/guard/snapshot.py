"""The rollback snapshot: what a rollback restores, copied to the CPU.

The parameters, the state of the optimizers (moments, step counts; not their
hyperparameters, so a scheduler's learning rate survives a rollback) and the threshold
policy's statistics. The Guard takes one when its remedies ask for it (at the end of a
clean monitor interval) and restores it when they roll back.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.policies.base import ThresholdPolicy

__all__ = ["Snapshot"]


class Snapshot:
    """A copy of parameters, optimizer state and policy statistics, on the CPU.

    Args:
        params: the parameters' values.
        optimizers: the optimizers' state dicts.
        policy: the policy's state dict, or ``None``.
    """

    def __init__(self, params: list[Tensor], optimizers: list[dict[str, Any]],
                 policy: dict[str, Any] | None) -> None:
        self.params, self.optimizers, self.policy = params, optimizers, policy

    @classmethod
    @torch.no_grad()
    def take(cls, params: Sequence[Tensor], optimizers: Sequence[torch.optim.Optimizer],
             policy: ThresholdPolicy | None) -> Snapshot:
        """Copy the current state (one device->host transfer of the model and moments)."""
        return cls(
            [p.detach().to("cpu", copy=True) for p in params],
            [_to_cpu(copy.deepcopy(o.state_dict())) for o in optimizers],
            None if policy is None else policy.state_dict(),
        )

    @torch.no_grad()
    def restore(self, params: Sequence[Tensor], optimizers: Sequence[torch.optim.Optimizer],
                policy: ThresholdPolicy | None) -> None:
        """Put the copied state back, in place. The optimizers keep their current
        hyperparameters (the learning rate a scheduler set); their moments go back."""
        for p, saved in zip(params, self.params, strict=True):
            p.copy_(saved)
        for opt, state in zip(optimizers, self.optimizers, strict=True):
            current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(copy.deepcopy(state))
            for group, hyper in zip(opt.param_groups, current, strict=True):
                group.update(hyper)
        if policy is not None and self.policy is not None:
            policy.load_state_dict(self.policy)

    def state_dict(self) -> dict[str, Any]:
        """The copies (CPU tensors), for the Guard's checkpoint."""
        return {"params": self.params, "optimizers": self.optimizers, "policy": self.policy}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Snapshot:
        """The snapshot saved by :meth:`state_dict`."""
        return cls(list(state["params"]), list(state["optimizers"]), state["policy"])


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
