"""gradguard.integrations.transformers.GuardCallback inside a real Hugging Face Trainer
(CPU, a one-layer GPT-2 built from a config, no download): HF's own optimizer, no
subclass; a NaN step skipped, the true pre-clip norm (HF's clipping turned off, said
once), the gradguard/... keys in logs and log_history, the loss under accumulation,
checkpoint/resume."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradguard.integrations.transformers import GuardCallback  # noqa: E402

transformers.logging.set_verbosity_error()


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # a wide initialisation: gradient norms well above HF's default clip of 1.0
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16,
                        initializer_range=0.5)
    return GPT2LMHeadModel(config)


def _args(folder, **kwargs) -> TrainingArguments:
    options = dict(output_dir=str(folder), max_steps=6, logging_steps=1, report_to="none",
                   use_cpu=True, save_strategy="no", disable_tqdm=True,
                   per_device_train_batch_size=4, seed=0, dataloader_num_workers=0)
    options.update(kwargs)
    return TrainingArguments(**options)


class NaNLossAt(TrainerCallback):
    """The model's loss is NaN at the given global steps (a forward hook)."""

    def __init__(self, *steps: int) -> None:
        self.steps = set(steps)
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        def poison(module, inputs, output):
            if module.training and state.global_step in self.steps:
                output.loss = output.loss * math.nan
            return output

        self.handle = model.register_forward_hook(poison)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.handle.remove()


class Reporter(TrainerCallback):
    """Stands for TensorBoard/W&B: registered before the GuardCallback."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        self.seen.append({k: v for k, v in logs.items() if k.startswith("gradguard/")})


def _train_logs(trainer: Trainer) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_default_arguments_nan_step_skipped_true_norm_in_log_history(tmp_path) -> None:
    guard_callback, reporter = GuardCallback(), Reporter()
    args = _args(tmp_path)
    assert args.max_grad_norm == 1.0  # HF's default
    trainer = Trainer(model=_model(), args=args, train_dataset=Tokens(),
                      callbacks=[reporter, NaNLossAt(2), guard_callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    named = [w for w in caught if "max_grad_norm" in str(w.message)]
    assert len(named) == 1, [str(w.message) for w in caught]
    assert trainer.state.global_step == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    stats = guard_callback.guard.stats()
    assert (stats["steps"], stats["nonfinite"], stats["skipped"]) == (6, 1, 1)

    logs = _train_logs(trainer)
    assert [entry["gradguard/skipped"] for entry in logs] == [0, 0, 1, 1, 1, 1]
    assert [entry["gradguard/steps"] for entry in logs] == [1, 2, 3, 4, 5, 6]
    for entry in logs:
        if entry["step"] == 3:  # the NaN step (global_step 2 during it)
            assert not math.isfinite(entry["gradguard/grad_norm"])
            continue
        # HF measures the same gradients with its clipping off: the true norm, not 1.0
        assert entry["gradguard/grad_norm"] == pytest.approx(entry["grad_norm"], rel=1e-5)
        assert entry["gradguard/grad_norm"] > 1.5
    # AdamW's signals, at every logged step that had Adam state and a finite gradient
    adam = [entry["step"] for entry in logs if "gradguard/update_ratio_max" in entry]
    assert adam == [2, 4, 5, 6]  # step 1: no second moment yet; step 3: the NaN step
    for entry in logs:
        if entry["step"] in adam:
            assert 0 < entry["gradguard/update_ratio_median"] <= entry[
                "gradguard/update_ratio_max"] < math.inf
            assert 0 < entry["gradguard/grad_v_rms_median"] <= entry[
                "gradguard/grad_v_rms_max"] < math.inf
    # the keys reach callbacks registered before the GuardCallback (reporters)
    seen = [keys for keys in reporter.seen if keys]  # the final summary log has none
    assert [keys["gradguard/skipped"] for keys in seen] == [0, 0, 1, 1, 1, 1]
    # put back: HF's argument and the Trainer's own methods
    assert args.max_grad_norm == 1.0
    assert "training_step" not in vars(trainer) and "log" not in vars(trainer)


def test_skipped_step_holds_hf_learning_rate_schedule(tmp_path) -> None:
    trainer = Trainer(model=_model(), args=_args(tmp_path, lr_scheduler_type="linear"),
                      train_dataset=Tokens(), callbacks=[NaNLossAt(2), GuardCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no torch scheduler-order warning
        warnings.filterwarnings("ignore", message=".*max_grad_norm.*")
        trainer.train()
    rates = [entry["learning_rate"] for entry in _train_logs(trainer)]
    # linear decay: one decrement per step that happened; the skipped step (3) holds it
    assert rates[2] == rates[3] and rates[1] > rates[2] and rates[3] > rates[4]


def test_clip_none_keeps_hf_clipping_and_says_the_norms_are_post_clip(tmp_path) -> None:
    guard_callback = GuardCallback(clip=None)
    args = _args(tmp_path, max_steps=2)
    trainer = Trainer(model=_model(), args=args, train_dataset=Tokens(),
                      callbacks=[guard_callback])
    with pytest.warns(UserWarning, match="max_grad_norm"):
        trainer.train()
    assert args.max_grad_norm == 1.0
    # what the Guard measures is HF's clipped gradient
    assert guard_callback.guard.last["pre_norm"].item() == pytest.approx(1.0, rel=1e-4)


def test_accumulation_one_guard_step_per_update_loss_is_hfs(tmp_path) -> None:
    guard_callback = GuardCallback()
    trainer = Trainer(model=_model(), args=_args(tmp_path, max_steps=3,
                                                 gradient_accumulation_steps=4),
                      train_dataset=Tokens(), callbacks=[guard_callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert guard_callback.guard.step_count == 3
    logs = _train_logs(trainer)
    assert len(logs) == 3
    for entry in logs:  # log_every = logging_steps = 1: each record is that step's
        assert entry["gradguard/loss"] == pytest.approx(entry["loss"], rel=1e-6)


def _guard_state_equal(a: dict, b: dict) -> None:
    assert a["step_count"] == b["step_count"]
    assert torch.equal(a["counters"], b["counters"])
    for key, value in b["policy"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(a["policy"][key], value), key
        else:
            assert a["policy"][key] == value, key


@pytest.mark.parametrize("rebuilt", [False, True], ids=["kept", "rebuilt-by-hf"])
def test_checkpoint_resume_is_exact(tmp_path, rebuilt: bool) -> None:
    """Train 4 steps saving at 2; resume from checkpoint-2 with a new callback: the Guard
    ends exactly where the uninterrupted run's Guard ended."""
    def run(callback: GuardCallback, **kwargs) -> Trainer:
        args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2,
                     restore_callback_states_from_checkpoint=rebuilt)
        trainer = Trainer(model=_model(), args=args, train_dataset=Tokens(),
                          callbacks=[NaNLossAt(1), callback])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(**kwargs)
        return trainer

    straight = GuardCallback(log_every=3)
    run(straight)
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    entry = saved["stateful_callbacks"]["GuardCallback"]
    assert entry["args"] == {"clip": "auto", "nonfinite": "skip", "log_every": 3}
    assert entry["attributes"]["resume_state"]["global_step"] == 2

    resumed = GuardCallback(log_every=3)
    trainer = run(resumed, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    if rebuilt:  # HF replaced the instance with one built from the checkpoint
        (resumed,) = [c for c in trainer.callback_handler.callbacks
                      if isinstance(c, GuardCallback)]
    _guard_state_equal(resumed.guard.state_dict(), straight.guard.state_dict())
    assert resumed.guard.stats()["skipped"] == 1  # the skip before the checkpoint


@pytest.mark.filterwarnings("ignore:.*max_grad_norm")
def test_state_is_json_before_training_and_drops_non_json_arguments(tmp_path) -> None:
    from gradguard.policies import Fixed

    callback = GuardCallback(clip=Fixed(2.0), log_every=4)
    state = callback.state()  # HF calls it when the Trainer is built, before any Guard
    assert json.loads(json.dumps(state)) == {"args": {"nonfinite": "skip", "log_every": 4},
                                             "attributes": {"resume_state": None}}
    args = _args(tmp_path, max_steps=1, restore_callback_states_from_checkpoint=True)
    trainer = Trainer(model=_model(), args=args, train_dataset=Tokens(), callbacks=[callback])
    with pytest.warns(UserWarning, match=r"\['clip'\] are not JSON"):
        trainer.train()


def test_bad_arguments_fail_when_the_callback_is_built() -> None:
    with pytest.raises(ValueError, match="nonfinite"):
        GuardCallback(nonfinite="drop")
    with pytest.raises(TypeError, match="log_evry"):
        GuardCallback(log_evry=5)


def test_import_error_names_the_extra(monkeypatch) -> None:
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    monkeypatch.delitem(sys.modules, "gradguard.integrations.transformers", raising=False)
    with pytest.raises(ImportError, match=r'pip install "gradguard\[transformers\]"'):
        importlib.import_module("gradguard.integrations.transformers")
