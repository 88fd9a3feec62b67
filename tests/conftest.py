import os
import sys
from pathlib import Path

# OpenMP threads that wait for work sleep instead of spinning. With 2 torch threads on a
# 2-core machine that other processes also use, spinning threads take turns with a descheduled
# partner: 50 Adam steps of a 20-layer MLP took 100 s instead of 1.8 s (45 CPU-s instead of
# 0.7). Read when OpenMP starts, hence before torch is imported; results do not change.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

# Tests import helpers from this folder (dist_utils); spawned workers need it on the path too.
sys.path.insert(0, str(Path(__file__).parent))

THREADS_VARIABLE = "GRADGUARD_TEST_THREADS"


def _test_threads() -> int:
    """The torch thread count of the test process: ``GRADGUARD_TEST_THREADS`` (default 1).

    One thread is the default because small ops on 2 cores run faster on one and are immune
    to contention with other processes; the suite must also pass with more (CI runs it with
    1 and 2), since results that hold for one thread count only are trajectory luck.
    """
    raw = os.environ.get(THREADS_VARIABLE, "1")
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{THREADS_VARIABLE} must be a positive integer, got {raw!r}")
    return threads


torch.set_num_threads(_test_threads())
torch.set_flush_denormal(True)


def pytest_report_header(config) -> str:
    return f"torch threads: {torch.get_num_threads()} (set by {THREADS_VARIABLE}, default 1)"
