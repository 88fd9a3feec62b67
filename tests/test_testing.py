"""gradguard.testing: the collective counter sees every collective, whoever issues it."""

from __future__ import annotations

import pytest
import torch

from gradguard.testing import CollectiveCounter


def _count(rank, world):
    import torch.distributed as dist

    t = torch.ones(3)
    with CollectiveCounter() as counter:
        dist.all_reduce(t)
        dist.broadcast(t, src=0)
        dist.barrier()
    with CollectiveCounter() as quiet:
        t.add_(1)  # no communication
    return counter.count, counter.calls, quiet.count


@pytest.mark.slow
def test_collective_counter_counts_c10d_collectives_only():
    from dist_utils import run_distributed

    for count, calls, quiet in run_distributed(_count, 2):
        assert count == 3 and quiet == 0
        assert any("allreduce" in c for c in calls) and any("broadcast" in c for c in calls)


def test_collective_counter_without_collectives_counts_nothing():
    with CollectiveCounter() as counter:
        torch.ones(2).sum()
    assert counter.count == 0 and counter.calls == []
