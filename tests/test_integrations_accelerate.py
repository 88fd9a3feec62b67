"""accelerate: a Guard attached to the prepared optimizer runs once per real optimizer
step under ``accumulate()``, its skips show in ``step_was_skipped`` for that step only
(the prepared scheduler holds its LR there), and a GradScaler overflow still reaches the
scaler. Real accelerate on CPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradguard as gg

accelerate = pytest.importorskip("accelerate")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402


@pytest.fixture
def fresh_state():
    # accelerate keeps process-wide singletons; every test builds its own Accelerator
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(micro_batches: int, nan_at: set[int], clip=None):
    acc = accelerate.Accelerator(gradient_accumulation_steps=4, cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    data = torch.utils.data.TensorDataset(torch.randn(micro_batches * 2, 4),
                                          torch.randn(micro_batches * 2, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    guard = gg.Guard(model, clip=clip, sinks=[]).attach(opt)
    steps = []  # per real optimizer step: (skipped per accelerate, per the Guard, lr after)
    for i, (x, y) in enumerate(loader):
        with acc.accumulate(model):
            loss = (model(x) - y).pow(2).mean()
            if i in nan_at:
                loss = loss * float("nan")
            guard.observe_loss(loss)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            if acc.sync_gradients:
                steps.append((opt.step_was_skipped, guard.last_step_skipped,
                              sched.get_last_lr()[0], guard.last["loss"].item()))
    return guard, model, steps


def test_one_guard_step_per_real_optimizer_step(fresh_state):
    guard, _, steps = run(40, set())
    assert len(steps) == 10
    assert guard.stats() == {"steps": 10, "clipped": 0, "nonfinite": 0, "skipped": 0}
    assert [s[2] for s in steps] == [0.1 * 0.5 ** (k + 1) for k in range(10)]


def test_a_nan_micro_batch_is_one_skip_visible_for_that_step_only(fresh_state):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scheduler-order warning either
        guard, model, steps = run(40, {21})  # micro-batch 21: optimizer step 5
    assert guard.stats()["steps"] == 10 and guard.stats()["skipped"] == 1
    assert [s[0] for s in steps] == [k == 5 for k in range(10)]
    assert [s[1] for s in steps] == [k == 5 for k in range(10)]
    lrs = [s[2] for s in steps]
    assert lrs[5] == lrs[4]  # the prepared scheduler held the LR on the skipped step
    assert lrs == [0.1 * 0.5 ** (k + (k < 5)) for k in range(10)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the step's loss: a NaN in one of its micro-batches is seen (recorded as inf)
    assert [math.isinf(s[3]) for s in steps] == [k == 5 for k in range(10)]


def test_the_step_loss_is_the_mean_of_the_micro_batch_losses(fresh_state):
    acc = accelerate.Accelerator(gradient_accumulation_steps=4, cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    guard = gg.Guard(model, clip=None, sinks=[]).attach(opt)
    losses = []
    for i in range(4):
        with acc.accumulate(model):
            loss = model(torch.full((2, 4), float(i))).pow(2).mean()
            losses.append(loss.item())
            guard.observe_loss(loss)
            acc.backward(loss)
            opt.step()
    assert guard.step_count == 1
    assert guard.last["loss"].item() == pytest.approx(sum(losses) / 4, rel=1e-6)


def _scaled_step(model, opt, scaler, inf: bool, unscale_first: bool) -> None:
    opt.zero_grad()
    scaler.scale((model(torch.ones(2, 4)) - 1).pow(2).mean()).backward()
    if inf:
        model.weight.grad[0, 0] = float("inf")
    if unscale_first:  # what the Hugging Face Trainer does before optimizer.step()
        scaler.unscale_(opt.optimizer)
    opt.step()


@pytest.mark.parametrize("unscale_first", [False, True])
def test_a_gradscaler_overflow_reaches_the_scaler_and_is_not_a_guard_step(
        fresh_state, unscale_first):
    accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ref = torch.nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               device_placement=False, scaler=scaler)
    guard = gg.Guard(model, clip=0.5, sinks=[]).attach(opt)
    seen = []
    for inf in (True, True, False, False):
        _scaled_step(model, opt, scaler, inf, unscale_first)
        seen.append(opt.step_was_skipped)
    assert seen == [True, True, False, False]
    assert scaler.get_scale() == 256.0  # backed off twice
    assert guard.stats() == {"steps": 2, "clipped": 2, "nonfinite": 0, "skipped": 0}
    assert guard.events == [] and guard.last_step_skipped is False
    # the Guard saw unscaled gradients and clipped them: two clipped SGD steps by hand
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        ref_opt.zero_grad()
        (ref(torch.ones(2, 4)) - 1).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_deepspeed_wrapper_is_refused():
    class DeepSpeedOptimizerWrapper(torch.optim.SGD):
        pass

    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match="DeepSpeed"):
        gg.Guard(model, sinks=[]).attach(DeepSpeedOptimizerWrapper(model.parameters(), lr=0.1))


def test_auto_reads_the_optimizer_inside_the_accelerate_wrapper(fresh_state):
    """clip='auto' picks its rule from the AdamW that accelerate wraps (the HF Trainer's
    case): the Adam-family ramp clips the first steps, exactly as on the bare AdamW."""
    acc = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    model, opt = acc.prepare(model, opt)
    assert isinstance(opt, AcceleratedOptimizer)
    guard = gg.Guard(model, clip="auto", sinks=[]).attach(opt)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    thresholds = []
    for _ in range(5):
        opt.zero_grad()
        acc.backward((model(x) - y).pow(2).mean())
        opt.step()
        thresholds.append(guard.last["threshold"].item())
    assert guard.stats()["clipped"] == 5  # the ramp: threshold (n + 1) / 40 x typical
    assert thresholds[0] < guard.last["pre_norm"].item()
    assert all(math.isfinite(t) for t in thresholds)
