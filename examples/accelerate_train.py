"""gradguard with accelerate: a Guard on the prepared optimizer, gradient accumulation.

A tiny regression model trained on CPU for 40 micro-batches with
``gradient_accumulation_steps=4`` (10 optimizer steps). Micro-batch 21 gets a NaN loss:
the Guard skips that optimizer step, accelerate reports it in
``optimizer.step_was_skipped``, and the prepared scheduler holds its learning rate there.
Runs in a few seconds::

    pip install gradguard accelerate
    python examples/accelerate_train.py
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

import gradguard as gg


def main() -> None:
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    x = torch.randn(80, 8)
    data = torch.utils.data.TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                              scheduler)
    # Attach to the *prepared* optimizer: the Guard then runs once per real optimizer
    # step, on the accumulated gradient, and its skips show in step_was_skipped.
    guard = gg.Guard(model, clip="auto", sinks=[], log_every=5).attach(optimizer)

    for i, (inputs, targets) in enumerate(loader):
        with accelerator.accumulate(model):
            loss = (model(inputs) - targets).pow(2).mean()
            if i == 21:
                loss = loss * math.nan  # a bad micro-batch
            guard.observe_loss(loss)  # each micro-batch; the step records their mean
            accelerator.backward(loss)
            optimizer.step()  # passes through until gradients are synchronised
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            print(f"micro-batch {i:2d}: optimizer step {guard.step_count:2d}, "
                  f"loss {guard.last['loss'].item():8.4f}, "
                  f"grad norm {guard.last['pre_norm'].item():8.4f}, "
                  f"step_was_skipped={optimizer.step_was_skipped!s:5}, "
                  f"lr {scheduler.get_last_lr()[0]:.5f}")
    guard.close()
    for event in guard.events:
        print(event)
    print("Guard:", guard.stats())
    print("parameters finite:", all(bool(torch.isfinite(p).all()) for p in model.parameters()))


if __name__ == "__main__":
    main()
