"""Hugging Face ``Trainer`` with a Guard: one line in ``callbacks=[...]``, no subclass.

A tiny GPT-2 built from a config (nothing downloaded) trains on random tokens with the
Trainer's default arguments (AdamW, linear schedule, ``max_grad_norm=1.0``). At step 5 a
fault is simulated (the loss turns NaN, as an overflow in a forward pass would make it).
The Guard skips that step (HF holds its LR schedule for it), turns HF's own clipping off
so that it sees the true gradient norm, and writes ``gradguard/...`` keys into the
Trainer's logs.

Run (CPU, a few seconds after the imports)::

    pip install "gradguard[transformers]"
    HF_HUB_OFFLINE=1 python examples/hf_trainer.py
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradguard.integrations.transformers import GuardCallback

FAULT_STEP = 5


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 256, length: int = 16) -> None:
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class SimulatedFault(TrainerCallback):
    """Not part of the recipe: makes the loss NaN during one optimizer step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        def poison(module, inputs, output):
            if module.training and state.global_step == FAULT_STEP:
                output.loss = output.loss * math.nan
            return output

        model.register_forward_hook(poison)


def main() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    # a wide initialisation, so that gradient norms start well above HF's clip of 1.0
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=128,
                                       n_positions=16, initializer_range=0.2))
    guard_callback = GuardCallback()  # <- the one line (the Guard's default policy)
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, max_steps=20, logging_steps=5,
                                 per_device_train_batch_size=8, use_cpu=True,
                                 report_to="none", save_strategy="no", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(),
                          callbacks=[SimulatedFault(), guard_callback])
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # quiet
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    for w in caught:
        if "GuardCallback" in str(w.message):
            print(f"warning: {w.message}")

    guard = guard_callback.guard
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    print(f"\ntrain finished: global_step={trainer.state.global_step}, weights finite: {finite}")
    print(f"Guard counters: {guard.stats()}")
    print("training logs (state.log_history), HF's values next to the Guard's (HF's loss at "
          "step 10 is its NaN filter's stand-in):")
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"  step {entry['step']:>2}: lr {entry['learning_rate']:.2e}"
                  f"  loss {entry['loss']:.4f}  gradguard/loss {entry['gradguard/loss']:.4f}"
                  f"  grad_norm {entry['grad_norm']:.3f}"
                  f"  gradguard/grad_norm {entry['gradguard/grad_norm']:.3f}"
                  f"  gradguard/skipped {entry['gradguard/skipped']:.0f}")


if __name__ == "__main__":
    main()
