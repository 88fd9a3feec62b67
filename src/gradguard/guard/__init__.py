"""The Guard: clipping, non-finite protection, monitoring and remedies in one object.

* :mod:`gradguard.guard.guard`: the :class:`Guard` (construction, ``attach``, the loss,
  introspection, checkpoints) and its act phase;
* :mod:`gradguard.guard.step`: one step, read top to bottom (measure -> decide -> apply ->
  record), :class:`StepStats`;
* :mod:`gradguard.guard.sync`: the one collective per step (a single process is a world of
  size 1), :func:`register_nonfinite_hook`;
* :mod:`gradguard.guard.remedies`: the remedy ladder, a decision function;
* :mod:`gradguard.guard.snapshot`: what a rollback restores.
"""

from gradguard.guard.guard import NONFINITE_POLICIES, Guard
from gradguard.guard.remedies import (
    Action,
    LRBackoff,
    Remedies,
    RemedyContext,
    Rollback,
    StepOutcome,
    TrainingDiverged,
)
from gradguard.guard.step import NonFiniteGradientError, StepStats
from gradguard.guard.sync import GuardSync, register_nonfinite_hook

__all__ = [
    "NONFINITE_POLICIES",
    "Action",
    "Guard",
    "GuardSync",
    "LRBackoff",
    "NonFiniteGradientError",
    "Remedies",
    "RemedyContext",
    "Rollback",
    "StepOutcome",
    "StepStats",
    "TrainingDiverged",
    "register_nonfinite_hook",
]
