"""What every benchmark task shares: the :class:`Task` interface, seeded generators, and a
run's fault schedule (:class:`Faults`).

The tasks themselves live in :mod:`gradguard.bench.tasks` (the SGD problems, the
registry) and :mod:`gradguard.bench.gpt` (the Transformer problems); the training loop
that drives them is :func:`gradguard.bench.run.run_one`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "BATCH_STREAM",
    "DATA_SEED",
    "DEFAULT_STEPS",
    "FAULT_STREAM",
    "Batch",
    "Faults",
    "Task",
    "seeded_generator",
]

DEFAULT_STEPS = 300
#: Data are drawn from this seed, whatever the run's seed: the test set is fixed.
DATA_SEED = 1234
#: Offsets that give a run's independent random streams (batches, corruption).
BATCH_STREAM = 1_000_003
FAULT_STREAM = 2_000_003

Batch = tuple[Tensor, Tensor]


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(int(seed))


@dataclass
class Faults:
    """What a task does wrong on purpose during one run, and when.

    The training loop calls :meth:`batch` on every batch (before the forward pass) and
    :meth:`gradients` right after ``loss.backward()`` (before any clipping method sees the
    gradients). The default corrupts the batches of ``steps`` with ``corrupt`` and leaves
    the gradients alone.

    Attributes:
        steps: the steps with a fault (reported with the run).
        corrupt: ``batch -> corrupted batch``, applied at ``steps``.
    """

    steps: frozenset[int] = frozenset()
    corrupt: Callable[[Batch], Batch] | None = field(default=None, repr=False)

    def batch(self, step: int, batch: Batch) -> Batch:
        """The batch the model trains on at ``step``."""
        if self.corrupt is not None and step in self.steps:
            return self.corrupt(batch)
        return batch

    def gradients(self, step: int, model: nn.Module) -> None:
        """Corrupt the gradients of ``model`` in place at ``step`` (nothing by default)."""


class Task(abc.ABC):
    """One benchmark problem. Subclasses set the class attributes and the abstract methods.

    Attributes:
        name: the task's spec name.
        metric_name: what ``evaluate`` returns first (e.g. ``"test_mse"``).
        higher_is_better: the metric's direction.
        steps: the default number of training steps.
        lrs: learning rates this task always runs at, overriding the grid (``None``: the
            grid's). ``spike-injection`` uses one learning rate at which it trains.
        default_lrs: the task's own learning-rate grid, used when the grid gives none
            (``None``: the benchmark's default grid).
        variants: the variants a ``name:variant`` spec may name (empty: none).
        references: the papers the task comes from.
    """

    name: ClassVar[str]
    metric_name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    steps: ClassVar[int] = DEFAULT_STEPS
    lrs: ClassVar[tuple[float, ...] | None] = None
    default_lrs: ClassVar[tuple[float, ...] | None] = None
    variants: ClassVar[tuple[str, ...]] = ()
    references: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> str:
        """The canonical spec string of this task (name, plus ``:variant`` if any)."""
        return self.name

    def companions(self) -> tuple[str, ...]:
        """Task specs that a grid with this task also runs, as its reference (the clean
        run of a corrupted task, so what the corruption cost can always be computed)."""
        return ()

    # -- data ---------------------------------------------------------------------------
    @abc.abstractmethod
    def data(self) -> dict[str, Any]:
        """The task's data, generated once per process from a fixed seed and cached."""

    @property
    def trivial_metric(self) -> float:
        """The metric of the best constant predictor on the fixed test set."""
        return float(self.data()["trivial_metric"])

    @property
    def loss_cap(self) -> float:
        """A final test loss above this marks the run as diverged (10x the zero output's)."""
        return 10.0 * float(self.data()["zero_loss"])

    # -- model and optimiser ------------------------------------------------------------
    @abc.abstractmethod
    def _make_model(self, gen: torch.Generator) -> nn.Module:
        """Build the model; draw every random number from ``gen`` or the global RNG."""

    def build_model(self, seed: int) -> nn.Module:
        """The model, initialised deterministically from ``seed`` (the global RNG is left as
        it was: modules that initialise from it are built under a forked, seeded RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._make_model(seeded_generator(seed))

    @abc.abstractmethod
    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The final (read-out) layer's parameters, which AGC leaves unclipped."""

    def build_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """SGD with momentum 0.9 (unless a task says otherwise)."""
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    def lr_factor(self, step: int, steps: int) -> float:
        """The learning-rate schedule: the factor applied to the run's learning rate at
        ``step`` of ``steps`` (1: a constant learning rate)."""
        return 1.0

    # -- training -----------------------------------------------------------------------
    def batch_generator(self, seed: int) -> torch.Generator:
        """The generator the run's batches are drawn from (independent of the init's)."""
        return seeded_generator(seed + BATCH_STREAM)

    @abc.abstractmethod
    def new_sampler(self, gen: torch.Generator) -> Callable[[int], Batch]:
        """A function ``step -> (inputs, targets)`` for one run, drawing from ``gen``."""

    def corruption_steps(self, seed: int, steps: int) -> frozenset[int]:
        """Steps whose batch is corrupted by :meth:`corrupt` (none for clean tasks)."""
        return frozenset()

    def corrupt(self, batch: Batch) -> Batch:
        """Return a corrupted copy of ``batch`` (only tasks with a corruption schedule)."""
        return batch

    def faults(self, seed: int, steps: int) -> Faults:
        """The fault schedule of one run: by default, :meth:`corrupt` on the batches of
        :meth:`corruption_steps`."""
        return Faults(self.corruption_steps(seed, steps), self.corrupt)

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training loss of ``model`` on ``batch`` (a 0-d tensor)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """``(metric, loss)`` on the fixed test set, in eval mode and without gradients."""

    def describe(self) -> dict[str, Any]:
        """The task's settings, for ``results.json``."""
        return {
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "trivial_metric": self.trivial_metric,
            "loss_cap": self.loss_cap,
            "steps": self.steps,
            "lrs": list(self.lrs) if self.lrs is not None else None,
            "default_lrs": list(self.default_lrs) if self.default_lrs is not None else None,
            "references": list(self.references),
        }
