"""gpt:corrupt against its clean run, per learning rate: a method's own gap, the gap of the
oracle that skips every faulty step whole (``oracle_skip.py``), and the method against the
oracle, each a mean over seeds with its standard error.

Usage:  python results/transformer/corrupt_gap.py [RUNS.jsonl] [ORACLE.jsonl] [METHOD]

Defaults: the committed ``auto_corrupt_seeds0-9.jsonl`` (``guard:auto`` on gpt:preln and
gpt:corrupt, seeds 0-9, from ``gradguard bench --tasks gpt:corrupt --methods guard:auto
--seeds 10``) and ``oracle_auto_seeds0-9.jsonl`` (``python oracle_skip.py guard:auto
0,1,2,3,4,5,6,7,8,9``), method ``guard:auto``. A run (lr, seed) counts where all three
scores exist.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _scores(path: Path, method: str) -> dict[tuple[str, float, int], float]:
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {(r["task"], r["lr"], r["seed"]): r["score"] for r in rows if r["method"] == method}


def _mean_se(xs: list[float]) -> str:
    se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return f"{statistics.fmean(xs):+.4f} ± {se:.4f}"


def main(argv: list[str]) -> None:
    runs = Path(argv[0]) if argv else HERE / "auto_corrupt_seeds0-9.jsonl"
    oracle_path = Path(argv[1]) if len(argv) > 1 else HERE / "oracle_auto_seeds0-9.jsonl"
    method = argv[2] if len(argv) > 2 else "guard:auto"
    scores, oracle = _scores(runs, method), _scores(oracle_path, method)
    keys = sorted((lr, seed) for task, lr, seed in oracle
                  if ("gpt:preln", lr, seed) in scores and ("gpt:corrupt", lr, seed) in scores)
    columns: dict[str, list[float]] = {"gap": [], "oracle gap": [], "method - oracle": []}
    print(f"{method}: gpt:corrupt minus gpt:preln, mean ± standard error over seeds")
    print(f"{'lr':>6}  {'n':>3}  " + "  ".join(f"{c:>17}" for c in columns))
    for lr in [*sorted({lr for lr, _ in keys}), None]:
        rows = [k for k in keys if lr is None or k[0] == lr]
        cells = {
            "gap": [scores[("gpt:corrupt", *k)] - scores[("gpt:preln", *k)] for k in rows],
            "oracle gap": [oracle[("gpt:corrupt", *k)] - scores[("gpt:preln", *k)] for k in rows],
            "method - oracle": [scores[("gpt:corrupt", *k)] - oracle[("gpt:corrupt", *k)]
                                for k in rows],
        }
        label = "all" if lr is None else f"{lr:g}"
        print(f"{label:>6}  {len(rows):>3}  " + "  ".join(f"{_mean_se(v):>17}"
                                                      for v in cells.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
