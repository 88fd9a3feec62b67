"""Run a function on N gloo processes (CPU), for the distributed tests.

The processes meet through a file in a fresh temporary directory (``init_method="file://"``,
a :class:`torch.distributed.FileStore`), not a TCP port: no port is chosen, released and bound
again later (another process could take it in between), so the tests do not depend on a
free port or on what else runs on the machine. Gloo then connects the ranks over sockets
that it binds itself (port 0, chosen by the kernel).
"""

from __future__ import annotations

import os
import queue as queue_module
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

# Only a guard against a hang (a rank blocked in a collective forever): it never decides a
# result, so it is generous: a loaded 2-core machine starts and imports torch in each
# process far slower than an idle one.
DEFAULT_TIMEOUT_S = 900.0


def _worker(rank: int, world: int, init_method: str, fn: Callable, args: tuple,
            results: Any) -> None:
    import torch
    import torch.distributed as dist

    # One thread per process: the ranks share the machine's cores.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", result))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world: int = 2, *args: Any,
                    timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; return the results by rank.

    Args:
        fn: the function each rank runs; it must be importable (defined at module level)
            and return picklable data.
        world: the number of processes.
        *args: further arguments of ``fn``, the same on every rank (picklable).
        timeout: seconds after which the run is abandoned as hung (a guard only).

    Returns:
        ``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``.

    Raises:
        RuntimeError: a rank raised (with its traceback) or died without a result (with its
            exit code); the other ranks are stopped at once rather than left to hang.
        TimeoutError: no result after ``timeout`` seconds.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="gradguard-dist-") as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world, init_method, fn, args, results_queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            results = _collect(procs, results_queue, timeout)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [results[r] for r in range(world)]


def _collect(procs: list, results_queue: Any, timeout: float) -> dict[int, Any]:
    """Gather one result per rank; fail fast when a rank errs or dies without a result."""
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    while len(results) < len(procs):
        try:
            rank, status, payload = results_queue.get(timeout=1.0)
        except queue_module.Empty:
            missing = [r for r in range(len(procs)) if r not in results]
            dead = [r for r in missing if procs[r].exitcode is not None]
            if not dead and time.monotonic() < deadline:
                continue
            if not dead:
                raise TimeoutError(f"no result from ranks {missing} after {timeout:.0f} s "
                                   "(hung)") from None
            # A process that put its result flushed it to the pipe before it exited, so one
            # more read tells a crash (no result) from a result that is still in the pipe.
            try:
                rank, status, payload = results_queue.get(timeout=1.0)
            except queue_module.Empty:
                raise RuntimeError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} "
                                   "without a result") from None
        if status != "ok":
            raise RuntimeError(f"rank {rank} failed:\n{payload}")
        results[rank] = payload
    return results
