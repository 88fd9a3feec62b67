"""Tests of gradguard.monitor.record: the host view of a flushed block and the record."""

from __future__ import annotations

import math

import pytest
import torch

from gradguard.monitor import FIELDS, RECORD_KEYS, Monitor
from gradguard.monitor.record import IntervalRows, build_record
from monitor_utils import fields as _fields

NAN = math.nan


def test_record_numbers_exact():
    mon = Monitor(["a", "b", "c"], log_every=4)
    rows = [
        (_fields(3.0, 2.0, 2.0, 2 / 3, 1, 0, 0, 5.0), [1.0, 0.0, 2.0]),
        (_fields(1.0, 1.0, 2.0, 1.0, 0, 0, 0, NAN), [0.5, 0.0, 0.25]),
        (_fields(NAN, NAN, 2.0, NAN, 0, 1, 1, NAN), [NAN, 0.0, 1.0]),
        (_fields(2.0, 2.0, 2.5, 1.0, 0, 0, 0, 4.0), [1.5, 0.0, 4.0]),
    ]
    for i, (f, p) in enumerate(rows):
        mon.observe(10 + i, f, torch.tensor(p))
    assert mon.pending == 0 and len(mon.records) == 1
    r = mon.records[-1]
    assert list(r) == list(RECORD_KEYS)
    assert (r["step_first"], r["step_last"], r["n_steps"]) == (10, 13, 4)
    assert r["pre_norm_min"] == 1.0 and r["pre_norm_max"] == 3.0
    assert r["pre_norm_max_step"] == 10
    assert r["pre_norm_mean"] == pytest.approx(2.0)
    assert r["pre_norm_last"] == 2.0
    assert r["post_norm_mean"] == pytest.approx(5 / 3) and r["post_norm_max"] == 2.0
    assert r["threshold_last"] == 2.5
    assert r["coef_min"] == pytest.approx(2 / 3)
    assert (r["clipped"], r["nonfinite"], r["skipped"]) == (1, 1, 1)
    assert r["clip_rate"] == pytest.approx(1 / 3)
    assert r["loss_mean"] == pytest.approx(4.5) and r["loss_last"] == 4.0
    # Per layer: finite, non-zero values only; "b" never had a gradient.
    assert r["layer_norm_mean"][0] == pytest.approx(1.0)
    assert math.isnan(r["layer_norm_mean"][1]) and math.isnan(r["layer_norm_max"][1])
    assert r["layer_norm_mean"][2] == pytest.approx((2 + 0.25 + 1 + 4) / 4)
    assert r["layer_norm_max"] == [1.5, NAN, 4.0] or r["layer_norm_max"][2] == 4.0
    assert r["layer_nonfinite"] == [1, 0, 0]
    assert r["top_layer"] == "c" and r["top_layer_norm"] == 4.0
    assert mon.totals == {
        "steps": 4,
        "clipped": 1,
        "nonfinite": 1,
        "skipped": 1,
        "spikes": 0,
        "flushes": 1,
    }


def test_unknown_loss_and_all_nonfinite_interval():
    mon = Monitor(["a"], log_every=2)
    mon.observe(1, _fields(NAN, nonfinite=1), torch.tensor([NAN]))
    mon.observe(2, _fields(math.inf, nonfinite=1), torch.tensor([math.inf]))
    r = mon.records[-1]
    assert math.isnan(r["loss_mean"]) and math.isnan(r["loss_last"])
    assert math.isnan(r["pre_norm_max"]) and r["pre_norm_max_step"] is None
    assert math.isnan(r["clip_rate"]) and r["top_layer"] is None
    assert r["nonfinite"] == 2


def _block(rows: list[tuple[list[float], list[float]]]) -> torch.Tensor:
    return torch.tensor([f + p for f, p in rows], dtype=torch.float64)


def test_interval_rows_classify_steps():
    # pre, post, thr, coef, clipped, nonfinite, skipped, loss | two layers
    block = _block([
        ([4.0, 2.0, 2.0, 0.5, 1, 0, 0, 1.0], [4.0, 0.0]),  # clipped
        ([NAN, NAN, 2.0, NAN, 0, 1, 1, NAN], [NAN, 1.0]),  # flagged non-finite, skipped
        ([NAN, NAN, NAN, NAN, 0, 0, 1, NAN], [0.0, 0.0]),  # skipped (rollback): no norms
        ([1.0, 1.0, 2.0, 1.0, 0, 0, 0, math.inf], [math.inf, 0.5]),  # a NaN/inf layer
        ([3.0, 2.0, 2.0, 0.7, 1, 0, 0, 2.0], [2.0, 2.0]),  # clipped
    ])
    rows = IntervalRows(block, [5, 6, 7, 8, 9])
    assert rows.n == 5 and rows.steps == [5, 6, 7, 8, 9]
    assert rows.bad == [False, True, False, True, False]
    assert rows.skipped == [False, True, True, False, False]
    assert rows.clipped == [True, False, False, False, True]
    assert (rows.n_bad, rows.n_good, rows.n_clipped, rows.n_skipped) == (2, 3, 2, 2)
    assert rows.clip_rate == pytest.approx(2 / 3)  # clipped finite steps / finite steps
    assert rows.valid.tolist() == [[True, False], [False, True], [False, False],
                                   [False, True], [True, True]]
    record = build_record(rows, ["w", "b"], spikes=1, rank=3)
    assert list(record) == list(RECORD_KEYS)
    assert record["spikes"] == 1 and record["rank"] == 3
    assert record["nonfinite"] == 2 and record["skipped"] == 2 and record["clipped"] == 2
    assert record["pre_norm_mean"] == pytest.approx((4 + 1 + 3) / 3)
    assert record["pre_norm_max_step"] == 5 and record["pre_norm_last"] == 3.0
    assert record["loss_mean"] == pytest.approx(1.5) and record["loss_nonfinite"] == 1
    assert record["layer_norm_mean"] == pytest.approx([3.0, (1.0 + 0.5 + 2.0) / 3])
    assert record["layer_norm_max"] == [4.0, 2.0] and record["layer_nonfinite"] == [2, 0]
    assert record["top_layer"] == "w" and record["top_layer_norm"] == 4.0


def test_record_of_the_monitor_is_build_record_of_its_rows():
    gen = torch.Generator().manual_seed(3)
    mon = Monitor(["a", "b", "c"], log_every=50)
    block = []
    for step in range(50):
        f = _fields(float(torch.rand((), generator=gen)) + 0.5, clipped=step % 3 == 0)
        per = torch.rand(3, generator=gen)
        block.append((f.double().tolist(), per.double().tolist()))
        interval = mon.observe(step, f, per)
    assert interval is not None
    # The buffer holds fp32: the record is built from the fp32 values, read as float64.
    expected = build_record(IntervalRows(_block(block).float().double(), list(range(50))),
                            ["a", "b", "c"], spikes=0, rank=0)
    assert {k: v for k, v in interval.record.items() if k != "time"} == {
        k: v for k, v in expected.items() if k != "time"}
    assert len(FIELDS) == 8
