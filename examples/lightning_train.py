"""PyTorch Lightning with a Guard: one line in ``Trainer(callbacks=[...])``.

A small MLP regression, trained with Lightning's automatic optimisation; one batch of
the data set is corrupted (a NaN feature, as a broken record would be). Without the
Guard that batch turns every weight into NaN; with it the step is skipped, the run
finishes, and the Guard's metrics are in Lightning's logger (here a CSV file).

Run (CPU, a few seconds after the imports)::

    pip install "gradguard[lightning]"
    python examples/lightning_train.py
"""

from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradguard.integrations.lightning import GuardCallback

BATCH = 16
STEPS = 60
BAD_BATCH = 25  # its first sample gets a NaN feature


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 8, generator=g)
    y = torch.sin(x[:, :1]) + 0.1 * x[:, 1:2]
    x[BAD_BATCH * BATCH, 3] = math.nan  # a corrupted record
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def main() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = Regression()
    guard_callback = GuardCallback(clip="auto", log_every=20)  # <- the one line
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1,
                             callbacks=[guard_callback],
                             logger=CSVLogger(folder, name="run"), log_every_n_steps=20,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(model, data())
        rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))

    guard = guard_callback.guard
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    print(f"\nfit finished: global_step={trainer.global_step}, weights finite: {finite}")
    print(f"Guard counters: {guard.stats()}")
    for event in guard.events:
        print(f"Guard event at step {event.step}: {event.kind}")
    print("gradguard metrics in Lightning's logger (one row per interval of 20 steps):")
    for row in rows:
        if row.get("gradguard/steps"):
            print(f"  step {row['step']:>3}: grad_norm {float(row['gradguard/grad_norm']):.3f}"
                  f"  clip_rate {float(row['gradguard/clip_rate']):.2f}"
                  f"  loss {float(row['gradguard/loss']):.4f}"
                  f"  skipped {float(row['gradguard/skipped']):.0f}")


if __name__ == "__main__":
    main()
