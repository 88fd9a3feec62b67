"""gradguard.integrations.common: the metrics both callbacks log, and their argument checks.

The callbacks' end-to-end behaviour is in test_integrations_lightning.py and
test_integrations_transformers.py; this file pins the mapping from a monitor record and
the Guard's counters to the ``gradguard/...`` keys.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradguard import Guard
from gradguard.integrations.common import (
    PREFIX,
    check_guard_arguments,
    counter_metrics,
    missing_extra,
    record_metrics,
)
from gradguard.monitor.record import OPTIM_RECORD_KEYS, RECORD_KEYS

BASE_KEYS = {"grad_norm", "grad_norm_max", "grad_norm_mean", "clip_threshold",
             "clip_rate", "loss", "spikes"}
ADAM_KEYS = {"update_ratio_max", "update_ratio_median", "grad_v_rms_max",
             "grad_v_rms_median"}


def _records(optimizer_cls: type[torch.optim.Optimizer], steps: int = 6) -> list[dict]:
    """The interval records of a small Guarded run (log_every=3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    records: list[dict] = []
    opt = optimizer_cls(model.parameters(), lr=0.01)
    guard = Guard(model, log_every=3,
                  sinks=[lambda kind, p: records.append(p) if kind == "record" else None])
    guard.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
    guard.close()
    return records


def test_record_keys_are_real_record_keys() -> None:
    record = dict.fromkeys(RECORD_KEYS + OPTIM_RECORD_KEYS, 1.0)
    assert set(record_metrics(record)) == {PREFIX + k for k in BASE_KEYS | ADAM_KEYS}


def test_sgd_record_has_no_adam_keys_and_values_match() -> None:
    records = _records(torch.optim.SGD)
    assert len(records) == 2
    for record in records:
        metrics = record_metrics(record)
        assert set(metrics) == {PREFIX + k for k in BASE_KEYS}
        assert metrics[PREFIX + "grad_norm"] == record["pre_norm_last"]
        assert metrics[PREFIX + "grad_norm_max"] == record["pre_norm_max"]
        assert metrics[PREFIX + "clip_rate"] == record["clip_rate"]
        assert all(isinstance(v, float) for v in metrics.values())


def test_adam_record_adds_its_signals() -> None:
    records = _records(torch.optim.AdamW)
    for record in records:
        metrics = record_metrics(record)
        assert set(metrics) == {PREFIX + k for k in BASE_KEYS | ADAM_KEYS}
        for key in ADAM_KEYS:
            assert metrics[PREFIX + key] == record[key]
            assert 0 < metrics[PREFIX + key] < math.inf


def test_unknown_base_values_are_nan_unsampled_adam_values_absent() -> None:
    record = dict.fromkeys(RECORD_KEYS)
    record.update(dict.fromkeys(OPTIM_RECORD_KEYS))
    record["update_ratio_max"] = math.nan  # a NaN signal is "not measured", not a value
    metrics = record_metrics(record)
    assert set(metrics) == {PREFIX + k for k in BASE_KEYS}
    assert all(math.isnan(v) for v in metrics.values())


def test_counter_metrics() -> None:
    stats = {"steps": 7, "clipped": 3, "nonfinite": 1, "skipped": 1, "other": 5}
    assert counter_metrics(stats) == {"gradguard/steps": 7.0, "gradguard/clipped": 3.0,
                                      "gradguard/nonfinite": 1.0, "gradguard/skipped": 1.0}


def test_check_guard_arguments_names_what_is_wrong() -> None:
    check_guard_arguments("auto", "skip", {"log_every": 10})
    with pytest.raises(TypeError, match="log_every"):
        check_guard_arguments("auto", "skip", {"log_every": 10}, owned=("log_every",))
    with pytest.raises(TypeError, match="no_such_option"):
        check_guard_arguments("auto", "skip", {"no_such_option": 1})
    with pytest.raises(ValueError, match="nonfinite"):
        check_guard_arguments("auto", "ignore-it", {})
    with pytest.raises(ValueError):
        check_guard_arguments("no-such-policy", "skip", {})


def test_missing_extra_message() -> None:
    error = missing_extra("PyTorch Lightning", "lightning", ImportError("No module named x"))
    assert isinstance(error, ImportError)
    assert str(error) == ("gradguard.integrations.lightning needs PyTorch Lightning "
                          '(No module named x): pip install "gradguard[lightning]"')
