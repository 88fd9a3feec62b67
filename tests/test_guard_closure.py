"""gradguard.guard (attach with closures): ``optimizer.step(closure)`` runs the closure
first, the Guard on its fresh gradients, then the update with a replayed first
evaluation; LBFGS keeps its evaluation count; a skipped step still ran the closure once."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from guard_utils import loss_of, mlp


class Counted:
    """A closure that zeroes the gradients, runs forward and backward, and counts calls."""

    def __init__(self, model: nn.Module, i: int = 0, scale: float = 1.0,
                 nan: bool = False) -> None:
        self.model, self.i, self.scale, self.nan = model, i, scale, nan
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        self.model.zero_grad()
        loss = loss_of(self.model, self.i, scale=self.scale)
        if self.nan:
            loss = loss * float("nan")
        loss.backward()
        return loss


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_fresh_gradients_are_clipped_every_change_within_the_threshold():
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=1.0)
    guard = gg.Guard(model, clip=1e-3, sinks=[]).attach(opt)
    for i in range(5):
        before = flat(model)
        closure = Counted(model, i, scale=50.0)
        opt.step(closure)
        assert closure.calls == 1  # replayed: SGD asks once, the Guard's evaluation serves it
        change = torch.linalg.vector_norm(flat(model) - before).item()
        assert change <= 1e-3 * (1 + 1e-5)
        assert change > 0.9e-3  # and clipped to the threshold, not stale or zero
        # the same step by hand: clip the fresh gradient, then step
        opt_ref.zero_grad()
        loss_of(ref, i, scale=50.0).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
        opt_ref.step()
        assert torch.equal(flat(model), flat(ref))
    assert guard.stats() == {"steps": 5, "clipped": 5, "nonfinite": 0, "skipped": 0}


def test_nan_from_the_closure_leaves_parameters_bitwise_unchanged_on_that_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = gg.Guard(model, clip=1.0, sinks=[]).attach(opt)
    opt.step(Counted(model, 0))
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v["momentum_buffer"].clone() for k, v in enumerate(opt.state.values())}
    closure = Counted(model, 1, nan=True)
    out = opt.step(closure)
    assert closure.calls == 1  # ran exactly once though the step was skipped
    assert isinstance(out, torch.Tensor) and math.isnan(out.item())  # the closure's loss
    assert guard.last_step_skipped is True
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    for k, v in enumerate(opt.state.values()):
        assert torch.equal(v["momentum_buffer"], state[k])
    assert guard.stats()["skipped"] == 1 and guard.last["loss"].item() == math.inf
    # the next, healthy step goes through (the skip is not carried over)
    opt.step(Counted(model, 2))
    assert guard.last_step_skipped is False and guard.stats()["skipped"] == 1


def test_step_returns_the_loss_under_no_grad_and_with_a_keyword_closure():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, clip=None, sinks=[]).attach(opt)
    expected = loss_of(mlp(), 0).item()
    before = flat(model)
    with torch.no_grad():
        out = opt.step(Counted(model, 0))
    assert out.item() == expected and out.requires_grad
    assert not torch.equal(flat(model), before)
    expected = loss_of(model, 1).item()
    out = opt.step(closure=Counted(model, 1))
    assert out.item() == expected and guard.step_count == 2


def test_the_closures_loss_is_observed_unless_the_closure_observes_its_own():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=None, sinks=[]).attach(opt)
    out = opt.step(Counted(model, 0))
    assert guard.last["loss"].item() == out.item()

    def reporting() -> torch.Tensor:
        loss = Counted(model, 1)()
        guard.observe_loss(loss * 2)  # e.g. a framework callback reporting it
        return loss

    out = opt.step(reporting)
    assert guard.last["loss"].item() == (out * 2).item()
    assert guard.pending_loss is None


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_makes_as_many_evaluations_as_without_a_guard(line_search):
    ref, model = mlp(), mlp()
    opt_ref = torch.optim.LBFGS(ref.parameters(), lr=0.5, max_iter=5,
                                line_search_fn=line_search)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5,
                            line_search_fn=line_search)
    guard = gg.Guard(model, clip=None, sinks=[]).attach(opt)
    for i in range(2):
        c_ref, c = Counted(ref, i), Counted(model, i)
        out_ref = opt_ref.step(c_ref)
        out = opt.step(c)
        assert c.calls == c_ref.calls > 1
        assert torch.equal(out, out_ref)
        assert torch.equal(flat(model), flat(ref))
    assert guard.stats()["steps"] == 2
    # the losses of LBFGS's own re-evaluations are not the next step's
    assert guard.pending_loss is None


def test_lbfgs_with_a_nonfinite_first_evaluation_never_runs():
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    gg.Guard(model, clip=None, sinks=[]).attach(opt)
    before = flat(model)
    closure = Counted(model, 0, nan=True)
    opt.step(closure)
    assert closure.calls == 1
    assert torch.equal(flat(model), before)
    assert len(opt.state) == 0  # LBFGS kept no state: it never ran


class PerturbThenEvaluate(torch.optim.Optimizer):
    """SAM-like: moves the parameters, re-evaluates the closure there, moves back, steps."""

    def __init__(self, params, lr: float = 0.1, rho: float = 0.05) -> None:
        super().__init__(params, {"lr": lr, "rho": rho})

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        eps = [self.defaults["rho"] * p.grad.sign() for p in params]
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
        with torch.enable_grad():
            loss = closure()
        for p, e in zip(params, eps, strict=True):
            p.sub_(e)
            p.add_(p.grad, alpha=-self.defaults["lr"])
        return loss


def test_an_optimizer_that_moves_the_parameters_gets_a_real_evaluation():
    model = mlp()
    opt = PerturbThenEvaluate(model.parameters())
    model.zero_grad()
    loss_of(model, 0).backward()  # SAM needs a first gradient for its perturbation
    gg.Guard(model, clip=None, sinks=[]).attach(opt)
    # the loss at the point SAM moves to, from the gradient at the current parameters
    probe = mlp()
    probe.zero_grad()
    loss_of(probe, 0).backward()
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(0.05 * p.grad.sign())
    expected = loss_of(probe, 0).item()
    closure = Counted(model, 0)
    out = opt.step(closure)
    assert closure.calls == 2  # the Guard's, then one at the perturbed point
    assert out.item() == expected
