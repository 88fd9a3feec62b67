"""``guard:auto`` with some of :class:`gradguard.policies.Auto`'s arguments changed, on the
benchmark's tasks: the experiments behind the README's notes on ``auto``'s defaults.

Usage:  python results/transformer/auto_variant.py ARGS TASKS LRS SEEDS > runs.jsonl

ARGS is a comma list of ``name=value`` (e.g. ``warmup_steps=1``), TASKS, LRS and SEEDS comma
lists. Prints one JSON line per run (task, method, lr, seed, score, diverged, the changed
arguments); ``corrupt_gap.py`` or a paired difference with the committed runs compares them.
"""

from __future__ import annotations

import ast
import json
import sys
from multiprocessing import Pool
from typing import Any


def _one(job: tuple[dict[str, Any], str, float, int]) -> dict[str, Any]:
    import gradguard.bench.run as run
    from gradguard.policies import auto

    run.init_worker()

    changed, task, lr, seed = job
    default_init = auto.Auto.__init__

    def init(self: auto.Auto, *args: Any, **kwargs: Any) -> None:
        default_init(self, *args, **{**changed, **kwargs})

    auto.Auto.__init__ = init  # type: ignore[method-assign]
    r = run.run_one(task, "guard:auto", lr, seed)
    return {**{k: r[k] for k in ("task", "method", "lr", "seed", "score", "diverged")},
            "auto_args": changed}


def _parse_args(text: str) -> dict[str, Any]:
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {name.strip(): ast.literal_eval(value.strip()) for name, value in pairs}


if __name__ == "__main__":
    changed = _parse_args(sys.argv[1])
    jobs = [(changed, task, float(lr), int(seed)) for task in sys.argv[2].split(",")
            for lr in sys.argv[3].split(",") for seed in sys.argv[4].split(",")]
    with Pool(2) as pool:
        for result in pool.imap_unordered(_one, jobs):
            print(json.dumps(result), flush=True)
