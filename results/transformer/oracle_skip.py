"""gpt:corrupt with an oracle that skips every faulty step whole (no update, no state
change): what discarding exactly the faulty steps costs against the clean run.

Usage:  python results/transformer/oracle_skip.py none,guard:auto [SEEDS] > oracle.jsonl

Prints one JSON line per run (task, method, lr, seed, score, diverged) over the
transformer grid (learning rates 1e-3 ... 0.1; SEEDS a comma list, default 0,1,2).
``corrupt_gap.py`` compares each with the same method's ``gpt:preln`` run (same seed:
same initialisation and clean batches).
"""

from __future__ import annotations

import json
import sys
from multiprocessing import Pool
from types import SimpleNamespace
from typing import Any

import gradguard.bench.run as run

LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
SEEDS = (0, 1, 2)
_TRAIN = run._train


def _train_with_oracle(t, model, optimizer, ctl, sample, faults, n_steps, lr):
    """The benchmark's loop, with the controller's step skipped at every fault step."""
    fault_steps, current = set(faults.steps), {"step": 0}
    batch, step = faults.batch, ctl.step

    def oracle_batch(s: int, b: Any) -> Any:
        current["step"] = s
        return batch(s, b)

    def oracle_step() -> Any:
        if current["step"] in fault_steps:
            optimizer.zero_grad(set_to_none=True)
            return SimpleNamespace(norm=0.0, clipped=False, skipped=True)
        return step()

    faults.batch, ctl.step = oracle_batch, oracle_step
    return _TRAIN(t, model, optimizer, ctl, sample, faults, n_steps, lr)


def _one(job: tuple[str, float, int]) -> dict[str, Any]:
    run.init_worker()
    run._train = _train_with_oracle
    method, lr, seed = job
    r = run.run_one("gpt:corrupt", method, lr, seed)
    return {k: r[k] for k in ("task", "method", "lr", "seed", "score", "diverged")}


if __name__ == "__main__":
    seeds = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else SEEDS
    jobs = [(m, lr, s) for m in sys.argv[1].split(",") for lr in LRS for s in seeds]
    with Pool(2) as pool:
        for result in pool.imap_unordered(_one, jobs):
            print(json.dumps(result), flush=True)
