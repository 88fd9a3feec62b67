"""Tests of gradguard.monitor.buffer: the device ring buffer (write a row, read a block)."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from gradguard.monitor.buffer import RingBuffer


def test_write_rows_and_read_one_block():
    buf = RingBuffer(5, rows=3)
    assert buf.shape is None and buf.device is None and buf.read() is None  # lazy
    assert buf.write(10, torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])) == 1
    assert buf.shape == (3, 5) and buf.device == torch.device("cpu")
    # Any dtype is cast to fp32 by the copy; a tensor that requires grad is detached.
    w = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64, requires_grad=True)
    assert buf.write(11, torch.tensor([True, False]), w * 2) == 2
    assert buf.pending == 2 and buf.steps == [10, 11]
    values, steps = buf.read()
    assert values.dtype == torch.float64 and values.device.type == "cpu"
    assert values.tolist() == [[1, 2, 3, 4, 5], [1, 0, 1.0, 0.5, 0.25]]
    assert steps == [10, 11] and buf.pending == 0 and buf.read() is None


def test_full_buffer_refuses_a_row_until_read():
    buf = RingBuffer(2, rows=2)
    for step in range(2):
        buf.write(step, torch.ones(1), torch.ones(1))
    with pytest.raises(RuntimeError, match="full"):
        buf.write(2, torch.ones(1), torch.ones(1))
    buf.read()
    assert buf.write(2, torch.full((1,), 7.0), torch.ones(1)) == 1
    assert buf.read()[0].tolist() == [[7.0, 1.0]]


def test_unwritten_rows_are_nan_and_rows_beyond_the_view_cache_work():
    big = 4097  # above the cached-views limit: rows are made on the fly
    buf = RingBuffer(2, rows=big, device="cpu")
    assert buf.pending_rows().shape == (0, 2)
    for step in range(big):
        buf.write(step, torch.tensor([float(step)]), torch.zeros(1))
    values, steps = buf.read()
    assert values[-1].tolist() == [big - 1, 0.0] and steps[-1] == big - 1
    fresh = RingBuffer(3, rows=2, device="cpu")
    fresh.load(torch.ones(1, 3), [5])
    fresh_state = fresh.pending_rows()
    assert fresh_state.tolist() == [[1.0, 1.0, 1.0]]
    # the second row was never written: NaN, never mistaken for data
    fresh.write(6, torch.ones(1), torch.ones(2))
    assert fresh.read()[1] == [5, 6]
    empty = RingBuffer(3, rows=2, device="cpu")
    empty.load(torch.empty(0, 3), [])
    assert empty.pending == 0 and math.isnan(float(empty.pending_rows().sum().add(math.nan)))


def test_load_grows_the_buffer_and_checks_the_shape():
    buf = RingBuffer(2, rows=2)
    buf.load(torch.arange(8.0).reshape(4, 2), [1, 2, 3, 4])
    assert buf.shape == (4, 2) and buf.pending == 4
    assert buf.pending_rows().tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="shape"):
        buf.load(torch.zeros(2, 3), [1, 2])


def test_write_does_no_host_read_and_read_is_the_one_sync():
    with FakeTensorMode():
        buf = RingBuffer(4, rows=8, device="cuda")
        for step in range(8):
            buf.write(step, torch.rand(2, device="cuda"), torch.rand(2, device="cuda"))
        assert buf.pending == 8 and buf.pending_rows().device.type == "cuda"
        with pytest.raises(DataDependentOutputException):
            buf.read().__getitem__(0).tolist()
