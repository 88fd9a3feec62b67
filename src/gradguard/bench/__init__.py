"""The stability benchmark: tasks that blow up, methods that stop it, and the grid that runs them.

``gradguard bench --tasks ... --methods ... --seeds 3 --out DIR`` runs tasks x methods x
learning rates x seeds in parallel worker processes and writes ``results.json`` and
``table.md``. From Python::

    from gradguard.bench import GridConfig, run_grid
    results = run_grid(GridConfig(tasks=["deep-mlp-digits"], methods=["none", "tuned"]), "out")

Modules: :mod:`~gradguard.bench.tasks` (the problems), :mod:`~gradguard.bench.methods`
(the registry of clipping methods and the controller protocol), :mod:`~gradguard.bench.run`
(one run), :mod:`~gradguard.bench.grid` (the grid: plan, worker processes, resume),
:mod:`~gradguard.bench.table` (aggregation, ``results.json`` and ``table.md``),
:mod:`~gradguard.bench.diagnose` (is a task's failure a gradient explosion?) and
:mod:`~gradguard.bench.demo` (the experiment behind ``gradguard demo``). The command line
is :mod:`gradguard.cli.bench`.
"""

from gradguard.bench.grid import GridConfig, run_grid
from gradguard.bench.methods import (
    METHODS,
    Controller,
    MethodContext,
    StepInfo,
    get_method,
    register_alias,
    register_method,
)
from gradguard.bench.run import run_one
from gradguard.bench.table import aggregate
from gradguard.bench.tasks import TASKS, Task, get_task

__all__ = [
    "METHODS",
    "TASKS",
    "Controller",
    "GridConfig",
    "MethodContext",
    "StepInfo",
    "Task",
    "aggregate",
    "get_method",
    "get_task",
    "register_alias",
    "register_method",
    "run_grid",
    "run_one",
]
