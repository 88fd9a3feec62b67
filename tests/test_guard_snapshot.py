"""gradguard.guard.snapshot: what a rollback restores, exactly, and what it keeps."""

from __future__ import annotations

import copy

import torch

import gradguard as gg
from gradguard.guard.snapshot import Snapshot
from guard_utils import loss_of, mlp, state_equal


def _steps(model, opt, policy, start, n):
    params = list(model.parameters())
    policy.setup(len(params), "cpu")
    for i in range(start, start + n):
        opt.zero_grad()
        loss_of(model, i).backward()
        norms = gg.tensor_norms([p.grad for p in params])
        total = torch.linalg.vector_norm(norms)
        policy.compute(gg.StepNorms(norms, total, torch.isfinite(total)))
        opt.step()


def test_restore_puts_back_params_moments_and_statistics_but_keeps_the_lr():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    policy = gg.ZClip(warmup_steps=2)
    _steps(model, opt, policy, 0, 3)
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict()["state"])
    policy_state = policy.state_dict()
    snap = Snapshot.take(list(model.parameters()), [opt], policy)
    assert all(p.device.type == "cpu" for p in snap.params)
    _steps(model, opt, policy, 3, 4)
    opt.param_groups[0]["lr"] = 5e-3  # a scheduler moved it meanwhile
    restored = Snapshot.from_state_dict(snap.state_dict())
    restored.restore(list(model.parameters()), [opt], policy)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert state_equal(opt.state_dict()["state"], opt_state)
    assert state_equal(policy.state_dict(), policy_state)
    assert opt.param_groups[0]["lr"] == 5e-3
