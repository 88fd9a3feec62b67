"""Data-parallel training with a Guard: a NaN on one rank, and every rank skips that step.

Run on CPU (gloo), two processes::

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py

(``--standalone``: a one-node rendezvous on a port that the kernel picks, shared by the
workers, so no fixed port such as 29500 has to be free; torch 2.13 does the same for one
node when no ``--master-port`` is given.)

Each rank trains a small MLP on its own stream of synthetic regression data under
``DistributedDataParallel``. At step ``--nan-step`` one sample of rank 1's batch is NaN:
rank 1's loss is NaN, DDP's all-reduce spreads the NaN to every rank's gradients, and the
Guard (one all-reduce of a few numbers per step) makes every rank skip that step together:
no hang, no drift between the replicas. The event names rank 1, known from its loss
(``guard.observe_loss``) and from the DDP comm hook that checks each rank's own gradients
before they are averaged (``register_nonfinite_hook``). Only rank 0 writes the log.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradguard as gg
from gradguard.guard.sync import register_nonfinite_hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nan-step", type=int, default=30, help="rank 1 sees a NaN here")
    parser.add_argument("--clip", default="zclip", help="the Guard's clip policy")
    parser.add_argument("--log", default=None, help="also write a JSON Lines log (rank 0)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's)
    model = DDP(nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                              nn.Linear(64, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sinks = ["console"] + ([args.log] if args.log else [])
    guard = gg.Guard(model, clip=args.clip, sinks=sinks, log_every=50).attach(opt)
    register_nonfinite_hook(model, guard)  # optional: names the rank for backward-born NaNs

    w_true = torch.randn(20, 1, generator=torch.Generator().manual_seed(1234))
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for step in range(args.steps):
        x = torch.randn(64, 20, generator=data)
        y = torch.sin(x @ w_true / 4) + 0.1 * torch.randn(64, 1, generator=data)
        if step == args.nan_step and rank == 1:
            x[0, 0] = float("nan")  # one bad sample, on rank 1 only
        loss = F.mse_loss(model(x), y)
        guard.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the Guard runs here: clip, or skip on every rank together
        if rank == 0 and step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  "
                  f"grad norm {guard.last['pre_norm'].item():.3f}", flush=True)
    guard.flush()

    # Outside the Guard: check that the replicas are still bitwise identical.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    identical = all(torch.equal(every[0], t) for t in every)
    skipped = [None] * world
    dist.all_gather_object(skipped, guard.stats()["skipped"])

    if rank == 0:
        stats = guard.stats()
        print(f"\n{stats['steps']} steps on {world} ranks: {stats['clipped']} clipped, "
              f"{stats['nonfinite']} non-finite, skipped per rank: {skipped}")
        for event in guard.events:
            if event.kind == "nonfinite":
                print(f"step {event.step} skipped on every rank (event rank {event.rank}): "
                      f"{event.message}")
        print(f"replicas identical: {identical}")
    guard.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
