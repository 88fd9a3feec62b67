"""gradguard.engine.sharding through the norm engine: DTensor (FSDP2) gradients give the
norms of the full tensors, and ``process_group`` reduces totals over disjoint stages (2 gloo
processes)."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard as gg

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


# ----- DTensor / FSDP2 -----------------------------------------------------------------

def _fsdp2_norms(rank, world):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5), torch.nn.Linear(5, 3)
    )
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(8, 9)
    fully_shard(model[0])
    fully_shard(model)
    model(x).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(type(g).__name__ == "DTensor" for g in grads)
    out = {}
    for p in NORM_TYPES:
        t = gg.get_total_norm(grads, p)
        assert type(t) is torch.Tensor
        out[p] = (t.item(), gg.tensor_norms(grads, p).tolist())
    out["full_grads"] = [g.full_tensor().tolist() for g in grads]
    out["params"] = {k: v.tolist() for k, v in full.items()}
    dist.barrier()
    return out


@pytest.mark.slow
def test_fsdp2_total_norm_equals_single_process():
    from dist_utils import run_distributed

    r0, r1 = run_distributed(_fsdp2_norms, 2)
    full = [torch.tensor(g) for g in r0["full_grads"]]
    for p in NORM_TYPES:
        assert r0[p][0] == pytest.approx(r1[p][0])  # same plain-tensor answer on every rank
        assert r0[p][1] == pytest.approx(r1[p][1])
        ref_total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in full]), p).item()
        assert r0[p][0] == pytest.approx(ref_total, rel=1e-6)
        ref_each = [torch.linalg.vector_norm(g, p).item() for g in full]
        assert r0[p][1] == pytest.approx(ref_each, rel=1e-6)


def _pipeline_norm(rank, world):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(rank)
    local = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]
    res = {p: gg.get_total_norm(local, p, process_group=dist.group.WORLD).item()
           for p in NORM_TYPES}
    res["local"] = [t.tolist() for t in local]
    return res


@pytest.mark.slow
def test_process_group_reduces_total_over_disjoint_stages():
    from dist_utils import run_distributed

    r0, r1 = run_distributed(_pipeline_norm, 2)
    everything = torch.cat([torch.tensor(t).flatten() for r in (r0, r1) for t in r["local"]])
    for p in NORM_TYPES:
        ref = torch.linalg.vector_norm(everything, p).item()
        assert r0[p] == pytest.approx(ref, rel=1e-6)
        assert r1[p] == pytest.approx(ref, rel=1e-6)


