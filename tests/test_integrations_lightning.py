"""gradguard.integrations.lightning.GuardCallback inside real Lightning fits (CPU, a
linear model, SGD): clipping of the step Lightning takes through its closure, a NaN batch
skipped without stopping fit, the gradient_clip_val refusal, interval metrics in the
logger, checkpoint/resume, manual optimisation, accumulation and a 2-rank DDP skip."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402

import gradguard as gg  # noqa: E402
from gradguard.integrations.common import DEFAULT_CLIP  # noqa: E402
from gradguard.integrations.lightning import GuardCallback  # noqa: E402

N_BATCHES = 30  # one epoch
BATCH = 8

pytestmark = pytest.mark.filterwarnings(
    # Lightning's advice for tiny CPU runs, not about what is tested
    "ignore:.*does not have many workers.*",
    "ignore:.*GPU available but not used.*",
    "ignore:.*smaller than the logging interval.*",
    # Lightning 2.6 against torch 2.13's pytree API, not about gradguard
    "ignore:.*LeafSpec.*",
)


def _data(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_BATCHES * BATCH, 4, generator=g)
    y = 3.0 * x.sum(dim=1, keepdim=True) + 5.0  # gradients far above the clip thresholds
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class Regression(pl.LightningModule):
    """Linear regression; the loss is NaN at the given global steps (on every rank)."""

    def __init__(self, nan_at: tuple[int, ...] = (), lr: float = 1.0,
                 manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.nan_at = set(nan_at)
        self.lr = lr
        self.automatic_optimization = not manual
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = (self.layer(x) - y).pow(2).mean()
        if self.global_step in self.nan_at:
            loss = loss * math.nan
        self.losses.append(loss.item())
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class StepChanges(pl.Callback):
    """The L2 norm of every batch's parameter change, and whether all stayed finite."""

    def __init__(self) -> None:
        self.changes: list[float] = []
        self._before: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = nn.utils.parameters_to_vector(pl_module.parameters()).detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = nn.utils.parameters_to_vector(pl_module.parameters()).detach()
        self.changes.append((after - self._before).norm().item())


class Captured(Logger):
    """A logger that keeps every log_metrics call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "captured"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))


def _trainer(max_steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _params(module: nn.Module) -> torch.Tensor:
    return nn.utils.parameters_to_vector(module.parameters()).detach()


def test_default_policy_is_the_guards() -> None:
    assert GuardCallback().clip == DEFAULT_CLIP == "auto"


def test_bad_arguments_fail_when_the_callback_is_built() -> None:
    with pytest.raises(ValueError, match="nonfinite"):
        GuardCallback(nonfinite="drop")
    with pytest.raises(TypeError, match="log_evry"):
        GuardCallback(log_evry=5)


def test_automatic_optimisation_every_step_clipped() -> None:
    """SGD lr 1, clip=1e-3: each update is the clipped gradient, of norm 1e-3 at most
    (float64 parameters, so that their rounding does not blur the bound; the Guard's
    clip coefficient is a float32, hence the 1e-6 relative slack)."""
    model, changes = Regression(lr=1.0), StepChanges()
    callback = GuardCallback(clip=1e-3, sinks=[])
    _trainer(N_BATCHES, [callback, changes], precision="64-true").fit(model, _data())
    assert len(changes.changes) == N_BATCHES
    assert max(changes.changes) <= 1e-3 * (1 + 1e-6)
    # every raw gradient is far above 1e-3, so every step was clipped to the threshold
    assert min(changes.changes) >= 1e-3 * (1 - 1e-6)
    assert callback.guard.stats() == {"steps": N_BATCHES, "clipped": N_BATCHES,
                                      "nonfinite": 0, "skipped": 0}


def test_nan_batch_skipped_fit_finishes_and_the_skip_is_logged() -> None:
    model, changes, logger = Regression(nan_at=(10,), lr=0.01), StepChanges(), Captured()
    callback = GuardCallback(clip="auto", log_every=5, sinks=[])
    trainer = _trainer(N_BATCHES, [callback, changes], logger=logger)
    trainer.fit(model, _data())
    assert trainer.global_step == N_BATCHES  # Lightning counts the skipped step (AMP's way)
    assert len(changes.changes) == N_BATCHES
    assert torch.isfinite(_params(model)).all()
    assert changes.changes[10] == 0.0  # the NaN step changed nothing
    assert all(c > 0 for i, c in enumerate(changes.changes) if i != 10)
    stats = callback.guard.stats()
    assert (stats["steps"], stats["nonfinite"], stats["skipped"]) == (30, 1, 1)
    assert callback.guard.last_step_skipped is False
    # interval metrics only, one call per interval of 5 Guard steps, at Lightning's step
    ours = [(step, m) for step, m in logger.calls if any(k.startswith("gradguard/") for k in m)]
    assert [step for step, _ in ours] == [4, 9, 14, 19, 24, 29]
    assert [m["gradguard/skipped"] for _, m in ours] == [0, 0, 1, 1, 1, 1]
    assert [m["gradguard/steps"] for _, m in ours] == [5, 10, 15, 20, 25, 30]
    last = ours[-1][1]
    assert math.isfinite(last["gradguard/grad_norm"])
    assert last["gradguard/loss"] == pytest.approx(sum(model.losses[25:]) / 5, rel=1e-6)
    # SGD has no second moment: no Adam-signal keys (not NaN columns)
    assert not [k for _, m in ours for k in m if "update_ratio" in k or "grad_v_rms" in k]


class AdamRegression(Regression):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def test_adam_signals_reach_the_logger() -> None:
    records: list[dict] = []
    model, logger = AdamRegression(), Captured()
    callback = GuardCallback(log_every=5, sinks=[lambda kind, payload: records.append(payload)
                                               if kind == "record" else None])
    _trainer(N_BATCHES, [callback], logger=logger).fit(model, _data())
    ours = [m for _, m in logger.calls if any(k.startswith("gradguard/") for k in m)]
    assert len(ours) == len(records) == N_BATCHES // 5
    for metrics, record in zip(ours, records, strict=True):
        for key in ("update_ratio_max", "update_ratio_median", "grad_v_rms_max",
                    "grad_v_rms_median"):
            assert metrics[f"gradguard/{key}"] == pytest.approx(record[key], rel=1e-12)
            assert 0 < metrics[f"gradguard/{key}"] < math.inf


def test_gradient_clip_val_refused_by_name() -> None:
    trainer = _trainer(2, [GuardCallback(sinks=[])], gradient_clip_val=0.5)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        trainer.fit(Regression(), _data())


def test_gradient_clip_val_with_clip_none_warns_norms_are_post_clip() -> None:
    callback = GuardCallback(clip=None, sinks=[])
    trainer = _trainer(2, [callback], gradient_clip_val=0.5)
    with pytest.warns(UserWarning, match="gradient_clip_val"):
        trainer.fit(Regression(lr=0.01), _data())
    # the Guard sees the gradient Lightning has already clipped to 0.5
    assert callback.guard.last["pre_norm"].item() == pytest.approx(0.5, rel=1e-5)


def test_manual_optimisation_nan_skipped_and_loss_observed() -> None:
    model, changes = Regression(nan_at=(2,), lr=0.01, manual=True), StepChanges()
    callback = GuardCallback(sinks=[])
    trainer = _trainer(6, [callback, changes])
    trainer.fit(model, _data())
    assert trainer.global_step == 6
    assert changes.changes[2] == 0.0 and torch.isfinite(_params(model)).all()
    assert callback.guard.stats()["skipped"] == 1 and callback.guard.stats()["steps"] == 6
    assert callback.guard.last["loss"].item() == pytest.approx(model.losses[-1], rel=1e-6)


def test_accumulation_one_guard_step_per_update_loss_is_the_steps_mean() -> None:
    model = Regression(lr=0.01)
    callback = GuardCallback(sinks=[])
    trainer = _trainer(4, [callback], accumulate_grad_batches=3)
    trainer.fit(model, _data())
    assert trainer.global_step == 4 and callback.guard.step_count == 4
    assert len(model.losses) == 12
    expected = sum(model.losses[-3:]) / 3  # Lightning divided each by 3; the callback undoes it
    assert callback.guard.last["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_checkpoint_resume_restores_the_guard(tmp_path) -> None:
    """Checkpoint after 30 steps, resume to 35 with a new callback: the Guard counts 35 and
    ends where an uninterrupted 35-step run ends."""
    first = GuardCallback(log_every=5, sinks=[])
    trainer = _trainer(30, [first])
    trainer.fit(Regression(lr=0.01), _data())
    path = tmp_path / "step30.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]["GuardCallback"]["guard"]
    assert saved["step_count"] == 30

    resumed = GuardCallback(log_every=5, sinks=[])
    _trainer(35, [resumed]).fit(Regression(lr=0.01), _data(), ckpt_path=str(path))
    assert resumed.guard.step_count == 35 and resumed.guard.stats()["steps"] == 35

    straight = GuardCallback(log_every=5, sinks=[])
    _trainer(35, [straight]).fit(Regression(lr=0.01), _data())
    a, b = resumed.guard.state_dict(), straight.guard.state_dict()
    assert torch.equal(a["counters"], b["counters"])
    for key, value in b["policy"].items():
        other = a["policy"][key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(other, value), key
        else:
            assert other == value, key


def test_second_fit_goes_on_from_the_first() -> None:
    callback = GuardCallback(sinks=[])
    model = Regression(lr=0.01)
    _trainer(3, [callback]).fit(model, _data())
    first = callback.guard
    _trainer(2, [callback]).fit(model, _data())  # a new trainer, the same callback
    assert callback.guard is not first and callback.guard.step_count == 5


class _PoisonRankOne(pl.Callback):
    """A NaN in rank 1's gradient after DDP's all-reduce: only rank 1 sees it."""

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == 2 and trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.layer.weight.grad[0, 0] = math.nan


class _Report(pl.Callback):
    def __init__(self, guard_callback: GuardCallback, folder) -> None:
        self.guard_callback, self.folder = guard_callback, folder

    def on_fit_end(self, trainer, pl_module) -> None:
        report = {"stats": self.guard_callback.guard.stats(),
                  "params": _params(pl_module).tolist()}
        path = self.folder / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(report))


def _ddp_fit(folder, **guard_kwargs) -> list[dict]:
    callback = GuardCallback(sinks=[], **guard_kwargs)
    trainer = _trainer(5, [callback, _PoisonRankOne(), _Report(callback, folder)],
                       devices=2, strategy="ddp_fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regression(lr=0.01), _data())
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.timeout(180)
def test_ddp_one_rank_nan_every_rank_skips(tmp_path) -> None:
    reports = _ddp_fit(tmp_path)
    for report in reports:
        assert report["stats"]["skipped"] == 1 and report["stats"]["steps"] == 5
        assert all(math.isfinite(v) for v in report["params"])
    assert reports[0]["params"] == reports[1]["params"]


@pytest.mark.timeout(180)
def test_ddp_control_ranks_part_without_the_guards_sync(tmp_path) -> None:
    """The control of the test above: each rank on its own, only rank 1 skips."""
    reports = _ddp_fit(tmp_path, sync_group=False)
    assert [r["stats"]["skipped"] for r in reports] == [0, 1]
    assert reports[0]["params"] != reports[1]["params"]


def test_import_error_names_the_extra(monkeypatch) -> None:
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # import fails
    monkeypatch.delitem(sys.modules, "gradguard.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r'pip install "gradguard\[lightning\]"'):
        importlib.import_module("gradguard.integrations.lightning")
    assert gg.Guard is not None


def test_fp16_mixed_precision_loss_is_unscaled() -> None:
    """Lightning hands on_before_backward the GradScaler-scaled loss; the Guard records
    the model's loss."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    model, callback = Regression(lr=0.001), GuardCallback(sinks=[])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = _trainer(2, [callback], plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(model, _data())
    assert callback.guard.step_count == 2
    assert callback.guard.last["loss"].item() == pytest.approx(model.losses[-1], rel=1e-3)


def test_import_gradguard_needs_no_framework() -> None:
    import subprocess
    import sys

    code = ("import sys, gradguard, gradguard.integrations, gradguard.integrations.common; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', "
            "'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


class LBFGSRegression(Regression):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


class _BatchStarts(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(len(pl_module.losses))


def test_lbfgs_one_guard_step_per_update_first_evaluations_loss() -> None:
    """LBFGS evaluates the closure several times per step: the Guard runs once, on the
    first evaluation, and records that evaluation's loss (not the re-evaluations')."""
    model, callback, starts = LBFGSRegression(), GuardCallback(clip=None, sinks=[]), \
        _BatchStarts()
    _trainer(3, [callback, starts]).fit(model, _data())
    assert callback.guard.step_count == 3
    assert len(model.losses) > 3 * 2  # LBFGS re-evaluated within each step
    assert torch.isfinite(_params(model)).all()
    first_of_last_step = model.losses[starts.starts[-1]]
    assert callback.guard.last["loss"].item() == pytest.approx(first_of_last_step, rel=1e-6)


class HoldLROnSkip(Regression):
    """The recipe of the module's docstring: a step-interval scheduler held on skips."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        guard = next(c.guard for c in self.trainer.callbacks if isinstance(c, GuardCallback))
        if not guard.last_step_skipped:
            scheduler.step()


class _LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_recipe_holds_the_learning_rate_on_a_skipped_step() -> None:
    rates = _LearningRates()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no scheduler-order warning either
        _trainer(5, [GuardCallback(sinks=[]), rates]).fit(HoldLROnSkip(nan_at=(0, 2)), _data())
    # steps 0 and 2 skipped: the LR halves only after steps 1, 3 (and 4)
    assert rates.rates == [0.01, 0.01, 0.005, 0.005, 0.0025]
