"""Helpers for users' tests of code that uses gradguard.

* :class:`CollectiveCounter` -- count the collectives a block of code issues (e.g. assert
  that a Guard step costs exactly one all-reduce under DDP or FSDP2).
"""

from __future__ import annotations

from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CollectiveCounter"]

_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")


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

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func.namespace in _COLLECTIVE_NAMESPACES and "wait" not in str(func):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        """How many collectives were issued."""
        return len(self.calls)
